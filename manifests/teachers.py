"""The typed ``teachers`` of a manifest (issue 14): frozen teachers and their feature banks.

A teacher is recorded by hash and never kept: ``id`` binds its weights, config and tokenizer
files, ``weights`` is its safetensors weights' sha256, ``source`` where it was read from. Its
``data`` names the texts object (a JSON array of the texts, in order; the object's hash *is* the
data hash every feature bank is bound to) and ``features`` lists, per hidden-state layer, the
row-shard feature banks. Mirrors ``$defs/teacher`` of ``schemas/manifest-v1.schema.json``;
:class:`~scaler_wizard.manifests.model.Manifest` holds them under ``teachers``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from scaler_wizard.manifests.model import (
    BaseSource,
    JsonObject,
    _optional,
    freeze,
    source_from_dict,
    thaw,
)


@dataclass(frozen=True)
class TeacherFile:
    """One data file a teacher's texts were read from (schema ``teacher.data.files[]``)."""

    path: str
    sha256: str
    rows: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherFile:
        return cls(path=d["path"], sha256=d["sha256"], rows=d["rows"])

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "rows": self.rows}


@dataclass(frozen=True)
class TeacherData:
    """The texts a teacher ran over: the texts object (its hash is the data hash) and their count."""

    texts: str
    rows: int
    text_column: str | None = None
    files: tuple[TeacherFile, ...] | None = None

    def __post_init__(self) -> None:
        if self.files is not None:
            object.__setattr__(self, "files", tuple(self.files))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherData:
        files = d.get("files")
        return cls(
            texts=d["texts"],
            rows=d["rows"],
            text_column=d.get("text_column"),
            files=None if files is None else tuple(TeacherFile.from_dict(f) for f in files),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"texts": self.texts, "rows": self.rows}
        _optional(out, "text_column", self.text_column)
        _optional(out, "files", None if self.files is None else [f.to_dict() for f in self.files])
        return out


@dataclass(frozen=True)
class TeacherFeatures:
    """A teacher's pooled features at one hidden-state layer: its row-shard feature banks, in order."""

    layer: int
    dim: int
    banks: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "banks", tuple(self.banks))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherFeatures:
        return cls(layer=d["layer"], dim=d["dim"], banks=tuple(d["banks"]))

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "dim": self.dim, "banks": list(self.banks)}


@dataclass(frozen=True)
class TeacherAdapterEntry:
    """What ``scaler distill`` left for a teacher (schema ``teacher.adapter``; optional): the bank
    of its adapter (student pooled dim -> teacher dim, one projection per recorded layer), the
    trunk it was trained on, the feature loss, and the run's router (a gating plugin over the
    run's teachers, in ``router.teachers`` order; the same record under each of them)."""

    bank: str
    trunk: str
    loss: str
    router: JsonObject
    provenance: JsonObject | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", freeze(self.router))
        if self.provenance is not None:
            object.__setattr__(self, "provenance", freeze(self.provenance))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherAdapterEntry:
        return cls(
            bank=d["bank"],
            trunk=d["trunk"],
            loss=d["loss"],
            router=d["router"],
            provenance=d.get("provenance"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bank": self.bank,
            "trunk": self.trunk,
            "loss": self.loss,
            "router": thaw(self.router),
        }
        _optional(out, "provenance", thaw(self.provenance))
        return out

    @property
    def router_bank(self) -> str:
        return str(self.router["bank"])


@dataclass(frozen=True)
class TeacherEntry:
    """A frozen teacher (recorded by hash, never kept) and the feature banks it left (``teacher``)."""

    id: str
    weights: str
    source: BaseSource
    architecture: str
    hidden_size: int
    num_layers: int
    max_length: int
    pooling: str
    dtype: str
    data: TeacherData
    features: tuple[TeacherFeatures, ...]
    model_type: str | None = None
    provenance: JsonObject | None = None
    #: (``scaler distill``) its adapter and the router it was trained with; None before any
    adapter: TeacherAdapterEntry | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))
        if self.provenance is not None:
            object.__setattr__(self, "provenance", freeze(self.provenance))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherEntry:
        return cls(
            id=d["id"],
            weights=d["weights"],
            source=source_from_dict(d["source"]),
            architecture=d["architecture"],
            hidden_size=d["hidden_size"],
            num_layers=d["num_layers"],
            max_length=d["max_length"],
            pooling=d["pooling"],
            dtype=d["dtype"],
            data=TeacherData.from_dict(d["data"]),
            features=tuple(TeacherFeatures.from_dict(f) for f in d["features"]),
            model_type=d.get("model_type"),
            provenance=d.get("provenance"),
            adapter=None if d.get("adapter") is None else TeacherAdapterEntry.from_dict(d["adapter"]),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "weights": self.weights,
            "source": self.source.to_dict(),
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "max_length": self.max_length,
            "pooling": self.pooling,
            "dtype": self.dtype,
            "data": self.data.to_dict(),
            "features": [f.to_dict() for f in self.features],
        }
        _optional(out, "model_type", self.model_type)
        _optional(out, "provenance", thaw(self.provenance))
        _optional(out, "adapter", None if self.adapter is None else self.adapter.to_dict())
        return out

    @property
    def layers(self) -> tuple[int, ...]:
        """The hidden-state layers it has feature banks for, in recorded order."""
        return tuple(f.layer for f in self.features)

    def at_layer(self, layer: int) -> TeacherFeatures | None:
        """Its feature banks at ``layer``, or None."""
        return next((f for f in self.features if f.layer == layer), None)

    @property
    def banks(self) -> tuple[str, ...]:
        """Every object it names: the texts object, then each layer's feature banks."""
        return (self.data.texts, *(b for f in self.features for b in f.banks))


__all__ = ["TeacherAdapterEntry", "TeacherData", "TeacherEntry", "TeacherFeatures", "TeacherFile"]

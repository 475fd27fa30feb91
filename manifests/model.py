"""The typed manifest model: frozen dataclasses mirroring ``schemas/manifest-v1.schema.json``.

:func:`parse_manifest` is the one entry point from bytes or a JSON object to a
:class:`Manifest`: size/depth/number limits, the schema, and the pure semantic rules
(:func:`scaler_wizard.manifests.validation.validate_manifest`), then the typed model.
``Manifest.to_dict()`` gives back exactly the JSON that was parsed, so
``canonical_json(parse_manifest(raw).to_dict()) == raw`` for every canonical manifest.

Free-form JSON (plugin configs, ``provenance``, ``metrics``, ``fingerprint``) is kept
verbatim, deep-frozen: objects become read-only mappings and arrays tuples; ``to_dict``
(and :func:`thaw`) turn them back into plain ``dict`` / ``list``.

Unknown fields: format version 1 is closed (``additionalProperties: false`` everywhere
except the free-form objects above), so a field this model does not know is refused by the
schema with a one-line error; a future format adds fields under a new ``format_version``,
which this version refuses with "upgrade scaler-wizard". Nothing is ever dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from scaler_wizard.errors import ManifestError
from scaler_wizard.manifests.base_records import BaseGrowth, BaseInspection
from scaler_wizard.manifests.validation import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    parse_manifest_bytes,
    validate_manifest,
)
from scaler_wizard.names import BankHash

if TYPE_CHECKING:
    from scaler_wizard.manifests.teachers import TeacherEntry

#: A JSON object kept verbatim and read-only (nested objects are read-only too, arrays tuples).
JsonObject: TypeAlias = Mapping[str, Any]


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a manifest: its hash is its version's name.

    The same bytes as ``scaler_wizard.banks.store.canonical_json`` (which can delegate here:
    banks may import manifests, not the other way round).
    """
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def content_hash(data: bytes) -> BankHash:
    """``sha256:<hex>`` of ``data`` (the name a store gives an object or manifest)."""
    return BankHash.of_bytes(data)


def freeze(value: Any) -> Any:
    """A deep read-only copy of JSON: objects -> read-only mappings, arrays -> tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """A deep plain copy of (possibly frozen) JSON: mappings -> dict, tuples/lists -> list."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [thaw(v) for v in value]
    return value


def _optional(out: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


@dataclass(frozen=True)
class Provider:
    """The Python distribution that provides a plugin or wrote the manifest (schema ``provider``)."""

    distribution: str
    version: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Provider:
        return cls(distribution=d["distribution"], version=d["version"])

    def to_dict(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "version": self.version}


#: The ``library`` field (who wrote the manifest) has the provider's shape.
LibraryInfo = Provider


@dataclass(frozen=True)
class PluginRef:
    """A named factory from a plugin, its complete config and who provides it (``plugin_ref``)."""

    plugin: str
    config: JsonObject
    provider: Provider

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", freeze(self.config))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PluginRef:
        return cls(plugin=d["plugin"], config=d["config"], provider=Provider.from_dict(d["provider"]))

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "config": thaw(self.config), "provider": self.provider.to_dict()}

    def config_dict(self) -> dict[str, Any]:
        """The config as a plain (mutable, JSON-schema-checkable) dict."""
        out: dict[str, Any] = thaw(self.config)
        return out


@dataclass(frozen=True)
class PackageSource:
    """The base came from an installed Python package."""

    type: ClassVar[str] = "package"
    package: str
    version: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "package": self.package, "version": self.version}
        _optional(out, "sha256", self.sha256)
        return out


@dataclass(frozen=True)
class HubSource:
    """The base came from a Hub repository at a revision."""

    type: ClassVar[str] = "hub"
    repo_id: str
    revision: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "repo_id": self.repo_id, "revision": self.revision}
        _optional(out, "sha256", self.sha256)
        return out


@dataclass(frozen=True)
class PathSource:
    """The base came from a local folder."""

    type: ClassVar[str] = "path"
    path: str
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "path": self.path}
        _optional(out, "sha256", self.sha256)
        return out


BaseSource: TypeAlias = PackageSource | HubSource | PathSource


def source_from_dict(d: Mapping[str, Any]) -> BaseSource:
    kind = d["type"]
    if kind == "package":
        return PackageSource(package=d["package"], version=d["version"], sha256=d.get("sha256"))
    if kind == "hub":
        return HubSource(repo_id=d["repo_id"], revision=d["revision"], sha256=d.get("sha256"))
    if kind == "path":
        return PathSource(path=d["path"], sha256=d.get("sha256"))
    raise ManifestError(
        f"base.source.type: {kind!r:.80} is not one of 'package', 'hub', 'path'", field="base.source.type"
    )


@dataclass(frozen=True)
class BaseEntry:
    """The frozen base encoder: its weights bank, config/tokenizer files and where it came from."""

    bank: str
    files: Mapping[str, str]
    source: BaseSource
    architecture: str
    hidden_size: int
    max_length: int
    model_type: str | None = None
    inspection: BaseInspection | None = None  # (issue 13) absent in older manifests
    growth: tuple[BaseGrowth, ...] = ()  # (issue 13) inserted base layers, oldest first

    def __post_init__(self) -> None:
        object.__setattr__(self, "files", MappingProxyType(dict(self.files)))
        object.__setattr__(self, "growth", tuple(self.growth))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseEntry:
        inspection = d.get("inspection")
        return cls(
            bank=d["bank"],
            files=d["files"],
            source=source_from_dict(d["source"]),
            architecture=d["architecture"],
            hidden_size=d["hidden_size"],
            max_length=d["max_length"],
            model_type=d.get("model_type"),
            inspection=None if inspection is None else BaseInspection.from_dict(inspection),
            growth=tuple(BaseGrowth.from_dict(g) for g in d.get("growth") or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bank": self.bank,
            "files": dict(self.files),
            "source": self.source.to_dict(),
            "architecture": self.architecture,
            "hidden_size": self.hidden_size,
            "max_length": self.max_length,
        }
        _optional(out, "model_type", self.model_type)
        if self.inspection is not None:
            out["inspection"] = self.inspection.to_dict()
        if self.growth:
            out["growth"] = [g.to_dict() for g in self.growth]
        return out

    def inserted_layers(self) -> list[int]:
        """Indices (in this base) of the layers ``growth`` inserted, ascending."""
        inserted: list[int] = []
        for g in self.growth:
            inserted = [i + 1 if i >= g.at else i for i in inserted] + [g.at]
        return sorted(inserted)


@dataclass(frozen=True)
class TrunkLayer:
    """One MoE layer of the trunk: its bank, shape and gating plugin."""

    bank: str
    num_experts: int
    expert_hidden: int
    gating: PluginRef

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrunkLayer:
        return cls(
            bank=d["bank"],
            num_experts=d["num_experts"],
            expert_hidden=d["expert_hidden"],
            gating=PluginRef.from_dict(d["gating"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "bank": self.bank,
            "num_experts": self.num_experts,
            "expert_hidden": self.expert_hidden,
            "gating": self.gating.to_dict(),
        }


@dataclass(frozen=True)
class TrunkEntry:
    """The shared MoE trunk over the base: width, pooling and layers."""

    hidden_size: int
    pooling: str
    layers: tuple[TrunkLayer, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrunkEntry:
        return cls(
            hidden_size=d["hidden_size"],
            pooling=d["pooling"],
            layers=tuple(TrunkLayer.from_dict(x) for x in d["layers"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "pooling": self.pooling,
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass(frozen=True)
class BranchEntry:
    """One task: its strategy (adapter) and head plugins, their banks, its labels, and what
    it records about itself (the trunk it was trained on, provenance, metrics, fingerprint)."""

    strategy: PluginRef
    adapter_bank: str
    head: PluginRef
    head_bank: str
    labels: tuple[str, ...]
    trunk: str | None = None
    provenance: JsonObject | None = None
    metrics: JsonObject | None = None
    fingerprint: JsonObject | None = None

    def __post_init__(self) -> None:
        if isinstance(self.labels, str):
            raise TypeError("labels: a sequence of label strings, not one string")
        object.__setattr__(self, "labels", tuple(self.labels))
        for key in ("provenance", "metrics", "fingerprint"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, freeze(value))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BranchEntry:
        return cls(
            strategy=PluginRef.from_dict(d["strategy"]),
            adapter_bank=d["adapter_bank"],
            head=PluginRef.from_dict(d["head"]),
            head_bank=d["head_bank"],
            labels=tuple(d["labels"]),
            trunk=d.get("trunk"),
            provenance=d.get("provenance"),
            metrics=d.get("metrics"),
            fingerprint=d.get("fingerprint"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy.to_dict(),
            "adapter_bank": self.adapter_bank,
            "head": self.head.to_dict(),
            "head_bank": self.head_bank,
            "labels": list(self.labels),
        }
        _optional(out, "trunk", self.trunk)
        for key in ("provenance", "metrics", "fingerprint"):
            _optional(out, key, thaw(getattr(self, key)))
        return out

    @property
    def banks(self) -> tuple[str, str]:
        """(adapter bank, head bank)."""
        return self.adapter_bank, self.head_bank


@dataclass(frozen=True)
class Manifest:
    """One immutable version of a composed model (``format`` / ``format_version`` are constants)."""

    FORMAT: ClassVar[str] = MANIFEST_FORMAT
    FORMAT_VERSION: ClassVar[int] = MANIFEST_FORMAT_VERSION

    name: str
    version: int
    parent: str | None
    created: str
    base: BaseEntry
    trunk: TrunkEntry
    branches: Mapping[str, BranchEntry] = field(default_factory=dict)
    message: str | None = None
    library: LibraryInfo | None = None
    #: frozen teachers by name (issue 14); empty when there are none (then absent from the JSON)
    teachers: Mapping[str, TeacherEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", MappingProxyType(dict(self.branches)))
        object.__setattr__(self, "teachers", MappingProxyType(dict(self.teachers)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """The typed form of a manifest JSON object, NOT validated (use :func:`parse_manifest`)."""
        library = d.get("library")
        return cls(
            name=d["name"],
            version=d["version"],
            parent=d["parent"],
            created=d["created"],
            base=BaseEntry.from_dict(d["base"]),
            trunk=TrunkEntry.from_dict(d["trunk"]),
            branches={n: BranchEntry.from_dict(e) for n, e in d["branches"].items()},
            message=d.get("message"),
            library=None if library is None else LibraryInfo.from_dict(library),
            teachers=_teachers_from_dict(d.get("teachers")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest JSON object (fresh plain dicts and lists; the caller may change it)."""
        out: dict[str, Any] = {
            "format": self.FORMAT,
            "format_version": self.FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "parent": self.parent,
            "created": self.created,
            "base": self.base.to_dict(),
            "trunk": self.trunk.to_dict(),
            "branches": {n: e.to_dict() for n, e in self.branches.items()},
        }
        _optional(out, "message", self.message)
        _optional(out, "library", None if self.library is None else self.library.to_dict())
        if self.teachers:  # a manifest without teachers has no key (old manifests keep their bytes)
            out["teachers"] = {n: e.to_dict() for n, e in self.teachers.items()}
        return out

    def to_bytes(self) -> bytes:
        """The canonical bytes a store keeps (and names by their hash)."""
        return canonical_json(self.to_dict())

    @property
    def hash(self) -> BankHash:
        """``sha256:<hex>`` of the canonical bytes: the name this version has in any store."""
        return content_hash(self.to_bytes())


def _teachers_from_dict(d: Mapping[str, Any] | None) -> dict[str, TeacherEntry]:
    """The typed ``teachers`` (issue 14; ``manifests/teachers.py``), {} when the key is absent."""
    if not d:
        return {}
    from scaler_wizard.manifests.teachers import TeacherEntry

    return {n: TeacherEntry.from_dict(e) for n, e in d.items()}


def as_manifest(manifest: Manifest | Mapping[str, Any]) -> Manifest:
    """``manifest`` typed: a Manifest as it is, a JSON object converted WITHOUT validation
    (for callers that hold an already-validated dict)."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def parse_manifest(
    data: bytes | bytearray | memoryview | Mapping[str, Any],
    *,
    where: str = "manifest",
    canonical: bool = False,
) -> Manifest:
    """The one way from bytes or a JSON object to a valid :class:`Manifest`.

    Bytes: at most 64 MiB, JSON, nested at most 64 deep, integers within 2**53 (checked
    before anything walks it); with ``canonical=True`` the bytes must also be the canonical
    form (a manifest named by its hash, e.g. one pulled from a Hub). Then, for bytes and
    objects alike: the schema and the pure semantic rules, each refused with a one-line
    :class:`ManifestError` naming the field (``where`` starts it).
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        valid = validate_manifest(parse_manifest_bytes(raw, where), where=where)
        if canonical and canonical_json(valid) != raw:
            raise ManifestError(
                f"{where} is not in canonical form, so its hash would not be its name", field="(top level)"
            )
        return Manifest.from_dict(valid)
    obj: Any
    if isinstance(data, dict):
        obj = data
    elif isinstance(data, Mapping):
        obj = thaw(data)
    else:
        obj = data  # validate_manifest names the type
    valid = validate_manifest(obj, where=where)
    return Manifest.from_dict(valid)


__all__ = [
    "BaseEntry",
    "BaseGrowth",
    "BaseInspection",
    "BaseSource",
    "BranchEntry",
    "HubSource",
    "JsonObject",
    "LibraryInfo",
    "Manifest",
    "PackageSource",
    "PathSource",
    "PluginRef",
    "Provider",
    "TrunkEntry",
    "TrunkLayer",
    "as_manifest",
    "canonical_json",
    "content_hash",
    "freeze",
    "parse_manifest",
    "source_from_dict",
    "thaw",
]

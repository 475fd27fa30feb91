"""What a manifest records about its base beyond its banks (issue 13): ``base.inspection``
(what ``scaler inspect`` detected) and ``base.growth`` (base blocks inserted by
``scaler expand add-base-layer``). Both optional: manifests written before keep their bytes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class BaseInspection:
    """What ``scaler inspect`` detected about the base (schema ``inspection``; issue 13)."""

    family: str
    norm: str
    placement: str
    attention: str
    heads: int
    kv_heads: int
    positions: str
    activation: str
    hidden_size: int
    ffn_size: int
    layers: int
    parameters: int
    supported: bool
    reason: str

    FIELDS: ClassVar[tuple[str, ...]] = (
        "family",
        "norm",
        "placement",
        "attention",
        "heads",
        "kv_heads",
        "positions",
        "activation",
        "hidden_size",
        "ffn_size",
        "layers",
        "parameters",
        "supported",
        "reason",
    )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseInspection:
        return cls(**{k: d[k] for k in cls.FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}


@dataclass(frozen=True)
class BaseGrowth:
    """One base layer inserted by ``scaler expand add-base-layer`` (schema ``base_growth``)."""

    operator: str
    at: int
    copied_from: int
    layers: int  # the base's layers after the insertion
    since_version: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseGrowth:
        return cls(
            operator=d["operator"],
            at=d["at"],
            copied_from=d["copied_from"],
            layers=d["layers"],
            since_version=d["since_version"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "operator": self.operator,
            "at": self.at,
            "copied_from": self.copied_from,
            "layers": self.layers,
            "since_version": self.since_version,
        }


__all__ = ["BaseGrowth", "BaseInspection"]

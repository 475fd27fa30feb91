"""Manifests: the JSON Schema (package data), the typed model, parsing + validation, pure facts.

``parse_manifest(bytes_or_object) -> Manifest`` is the one door (limits, schema, semantics);
``scaler_wizard.manifests.facts`` derives what a manifest implies (``banks_of``, ``trunk_id``...).
Nothing here imports torch or the runtime.
"""

from scaler_wizard.manifests.model import (
    BaseEntry,
    BranchEntry,
    LibraryInfo,
    Manifest,
    PluginRef,
    TrunkEntry,
    TrunkLayer,
    canonical_json,
    parse_manifest,
)
from scaler_wizard.manifests.validation import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    load_schema,
    validate_manifest,
)

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "BaseEntry",
    "BranchEntry",
    "LibraryInfo",
    "Manifest",
    "PluginRef",
    "TrunkEntry",
    "TrunkLayer",
    "canonical_json",
    "load_schema",
    "parse_manifest",
    "validate_manifest",
]

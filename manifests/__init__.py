"""Manifests: the JSON Schema (package data), validation, and version history."""

from scaler_wizard.manifests.validation import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    load_schema,
    validate_manifest,
)

__all__ = ["MANIFEST_FORMAT", "MANIFEST_FORMAT_VERSION", "load_schema", "validate_manifest"]

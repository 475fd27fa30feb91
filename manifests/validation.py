"""Schema validation with errors that name the field: ``branches.spam.labels: [] is too short``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError, best_match

from scaler_wizard.errors import ManifestError

MANIFEST_FORMAT = "scaler-wizard/manifest"
MANIFEST_FORMAT_VERSION = 1


@cache
def load_schema() -> dict[str, Any]:
    """The manifest v1 JSON Schema (draft 2020-12) shipped with the package."""
    text = resources.files("scaler_wizard.manifests").joinpath("schemas/manifest-v1.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def _is_strict_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    # JSON Schema patterns are ECMA-262, where ``$`` matches only at the very end; Python's
    # ``$`` also matches before a final newline, which would let ``"demo\n"`` pass as a name.
    if validator.is_type(instance, "string"):
        anchored = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith("\\$") else pattern
        if not re.search(anchored, instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")


#: Draft 2020-12 counts 8.0 as an integer; the code sizing tensors with it would not, so a
#: manifest (or plugin config) must write integers without a fraction part.
StrictValidator = validators.extend(
    Draft202012Validator,
    validators={"pattern": _ecma_pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


@cache
def _validator() -> Any:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return StrictValidator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def field_path(path: Any) -> str:
    """``['branches', 'spam', 'labels', 0]`` -> ``branches.spam.labels[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: ValidationError) -> str:
    where = field_path(error.absolute_path)
    v = error.validator
    if v == "required":
        return f"{where}: {error.message.replace(' is a required property', '')} is required"
    if v == "additionalProperties":
        return f"{where}: {error.message}"
    if v == "pattern":
        return f"{where}: {_short(error.instance)} is not a valid {_pattern_name(str(error.validator_value))}"
    if v in ("oneOf", "anyOf"):
        # Prefer the alternative that got furthest, which names a deeper field.
        if error.context:
            deepest = max(error.context, key=lambda e: len(e.absolute_path))
            if len(deepest.absolute_path) > len(error.absolute_path):
                return describe(deepest)
        return f"{where}: {_short(error.instance)} matches none of the allowed forms"
    if v == "type":
        return f"{where}: expected {error.validator_value}, got {_short(error.instance)}"
    return f"{where}: {error.message if len(error.message) < 200 else error.message[:197] + '...'}"


def _pattern_name(pattern: str) -> str:
    if "sha256" in pattern:
        return "bank hash (sha256:<64 hex>)"
    if pattern.startswith("^[0-9]{4}-"):
        return "timestamp (RFC 3339, e.g. 2026-01-31T12:00:00Z)"
    if "A-Za-z0-9" in pattern:
        return "name (letters, digits, '.', '_', '-')"
    return f"value (pattern {pattern})"


def validate_manifest(manifest: Any, *, where: str = "manifest") -> dict[str, Any]:
    """Raise ManifestError naming the first bad field; return the manifest if valid."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{where}: top level must be a JSON object, got {type(manifest).__name__}")
    fmt = manifest.get("format")
    if fmt == MANIFEST_FORMAT and manifest.get("format_version") not in (None, MANIFEST_FORMAT_VERSION):
        raise ManifestError(
            f"{where}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"scaler-wizard (reads version {MANIFEST_FORMAT_VERSION}); upgrade scaler-wizard"
        )
    errors = list(_validator().iter_errors(manifest))
    if errors:
        err = best_match(errors)
        raise ManifestError(f"invalid {where}: {describe(err)}")
    _check_semantics(manifest, where)
    return manifest


def _check_semantics(m: dict[str, Any], where: str) -> None:
    if (m["version"] == 1) != (m["parent"] is None):
        raise ManifestError(
            f"invalid {where}: parent: version {m['version']} "
            + ("must have a parent" if m["version"] > 1 else "is the first and cannot have a parent")
        )
    if m["trunk"]["hidden_size"] != m["base"]["hidden_size"]:
        raise ManifestError(
            f"invalid {where}: trunk.hidden_size: {m['trunk']['hidden_size']} differs from "
            f"base.hidden_size {m['base']['hidden_size']}"
        )

"""Schema validation with errors that name the field: ``branches.spam.labels: [] is too short``."""

from __future__ import annotations

import calendar
import json
import math
import re
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker, validators
from jsonschema.exceptions import ValidationError, best_match

from scaler_wizard.errors import ManifestError
from scaler_wizard.names import name_problem

MANIFEST_FORMAT = "scaler-wizard/manifest"
MANIFEST_FORMAT_VERSION = 1
#: Limits for a manifest read from disk or the Hub, checked before anything walks it recursively.
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 64
#: I-JSON (RFC 7493): integers beyond 2**53 are not portable, and none sizes anything real.
MAX_SAFE_INTEGER = 2**53 - 1


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


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:[Zz]|[+-](\d{2}):(\d{2}))\Z"
)


def is_rfc3339(text: object) -> bool:
    """An RFC 3339 date-time with real calendar values (no month 13, no 31 April, no 25:00)."""
    if not isinstance(text, str):
        return True  # the format applies to strings only; "type" says the rest
    m = _RFC3339.match(text)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    off_h, off_m = int(m.group(8) or 0), int(m.group(9) or 0)
    return (
        1 <= month <= 12
        and 1 <= day <= calendar.monthrange(year, month)[1]
        and hour <= 23
        and minute <= 59
        and second <= 60  # a leap second
        and off_h <= 23
        and off_m <= 59
    )


#: jsonschema checks "date-time" only when optional packages are installed: check it ourselves.
FORMATS = FormatChecker(formats=())
FORMATS.checks("date-time")(is_rfc3339)


@cache
def _validator() -> Any:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return StrictValidator(schema, format_checker=FORMATS)


def check_shape(obj: Any, where: str = "manifest") -> None:
    """Refuse what would make walking ``obj`` recursive-deep or its numbers unusable.

    Iterative, so a manifest nested 100,000 deep is a one-line error, not a RecursionError.
    """
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(obj, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ManifestError(
                    f"invalid {where}: {field_path(path[:4])}...: nested deeper than {MAX_DEPTH} levels",
                    field=field_path(path[:4]),
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((v, depth + 1, (*path, k)) for k, v in items)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_SAFE_INTEGER:
                raise ManifestError(
                    f"invalid {where}: {field_path(path)}: integer {_short(str(value), 30)} is out of range "
                    f"(at most 2**53 - 1)",
                    field=field_path(path),
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ManifestError(
                    f"invalid {where}: {field_path(path)}: {value} is not a JSON number",
                    field=field_path(path),
                )
        else:
            raise ManifestError(
                f"invalid {where}: {field_path(path)}: {type(value).__name__} is not JSON",
                field=field_path(path),
            )


def parse_manifest_bytes(data: bytes, where: str = "manifest") -> Any:
    """JSON from a manifest file, within the size and depth limits (not yet schema-validated)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{where} is {len(data):,} bytes: larger than the {MAX_MANIFEST_BYTES >> 20} MiB a manifest may be"
        )
    try:
        obj = json.loads(data)
    except RecursionError:
        raise ManifestError(f"invalid {where}: nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise ManifestError(f"{where} is not JSON: {str(exc).splitlines()[0]}") from exc
    check_shape(obj, where)
    return obj


def field_path(path: Any) -> str:
    """``['branches', 'spam', 'labels', 0]`` -> ``branches.spam.labels[0]``."""
    out = ""
    for part in path:
        if isinstance(part, str) and (not part.isprintable() or len(part) > 100):
            part = repr(part[:100])  # a key from a hostile manifest must not break the one-line error
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
    if v == "pattern" and isinstance(error.instance, str) and name_problem(error.instance):
        return f"{where}: {name_problem(error.instance)}"
    if v == "format":
        return f"{where}: {_short(error.instance)} is not a valid {_pattern_name('^[0-9]{4}-')}"
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


def error_field(error: ValidationError) -> str:
    """The JSON path of the field ``describe(error)`` names (the same deepest alternative)."""
    if error.validator in ("oneOf", "anyOf") and error.context:
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return error_field(deepest)
    return field_path(error.absolute_path)


def _pattern_name(pattern: str) -> str:
    if "sha256" in pattern:
        return "bank hash (sha256:<64 hex>)"
    if pattern.startswith("^[0-9]{4}-"):
        return "timestamp (RFC 3339, e.g. 2026-01-31T12:00:00Z)"
    if "A-Za-z0-9.+!" in pattern:
        return "version (PEP 440)"
    if "._-]*" in pattern:
        return "distribution name (PEP 508, e.g. my-plugin; no version, URL or options)"
    if "A-Za-z0-9._-]{" in pattern:
        return "name (letters, digits, '.', '_', '-')"
    if "A-Za-z0-9_-]{" in pattern:
        return "branch name (letters, digits, '_', '-')"
    return f"value (pattern {pattern})"


def validate_manifest(manifest: Any, *, where: str = "manifest") -> dict[str, Any]:
    """Raise ManifestError naming the first bad field; return the manifest if valid."""
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"{where}: top level must be a JSON object, got {type(manifest).__name__}", field="(top level)"
        )
    fmt = manifest.get("format")
    if fmt == MANIFEST_FORMAT and manifest.get("format_version") not in (None, MANIFEST_FORMAT_VERSION):
        raise ManifestError(
            f"{where}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"scaler-wizard (reads version {MANIFEST_FORMAT_VERSION}); upgrade scaler-wizard",
            field="format_version",
        )
    check_shape(manifest, where)
    errors = list(_validator().iter_errors(manifest))
    if errors:
        err = best_match(errors)
        raise ManifestError(f"invalid {where}: {describe(err)}", field=error_field(err))
    _check_semantics(manifest, where)
    return manifest


def _check_semantics(m: dict[str, Any], where: str) -> None:
    if (m["version"] == 1) != (m["parent"] is None):
        raise ManifestError(
            f"invalid {where}: parent: version {m['version']} "
            + ("must have a parent" if m["version"] > 1 else "is the first and cannot have a parent"),
            field="parent",
        )
    if m["trunk"]["hidden_size"] != m["base"]["hidden_size"]:
        raise ManifestError(
            f"invalid {where}: trunk.hidden_size: {m['trunk']['hidden_size']} differs from "
            f"base.hidden_size {m['base']['hidden_size']}",
            field="trunk.hidden_size",
        )

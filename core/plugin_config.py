"""Plugin configs: a dataclass per factory, turned into a JSON Schema that validates the
manifest entry, and filled with defaults so a manifest never relies on a plugin's defaults."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from scaler_wizard.errors import PluginError

_SCALARS: dict[Any, str] = {int: "integer", float: "number", bool: "boolean", str: "string"}
_SCHEMA_KEYS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "enum",
    "pattern",
)


def _type_schema(tp: Any) -> dict[str, Any]:
    origin = get_origin(tp)
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        return {"anyOf": [{"type": "null"} if a is type(None) else _type_schema(a) for a in args]}
    if origin in (list, tuple, typing.Sequence):
        args = get_args(tp)
        return {"type": "array", "items": _type_schema(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object"}
    raise TypeError(f"config field type {tp!r} cannot be expressed in a manifest")


def config_schema(cls: type) -> dict[str, Any]:
    """JSON Schema of a config dataclass (field ``metadata`` may carry ``help`` and bounds)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):
        schema = _type_schema(hints[f.name])
        if f.metadata.get("help"):
            schema["description"] = f.metadata["help"]
        for key in _SCHEMA_KEYS:
            if key in f.metadata:
                schema[key] = f.metadata[key]
        if f.default is not dataclasses.MISSING:
            schema["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            schema["default"] = f.default_factory()
        else:
            required.append(f.name)
        props[f.name] = schema
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out["description"] = cls.__doc__.strip().splitlines()[0]
    return out


def build_config(
    config: type | dict[str, Any] | None, raw: Any, *, where: str, plugin: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Validate ``raw`` against the declared config; return (config object, complete dict).

    ``config`` is a dataclass type (the object is an instance), a JSON Schema dict (the
    object is the dict, defaults filled), or None (no options accepted). ``plugin`` (the
    registered name) is given to the PluginError raised for a bad config.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PluginError(f"{where}: expected an object, got {type(raw).__name__}", plugin=plugin)
    if config is None:
        if raw:
            raise PluginError(f"{where}: takes no options, got {sorted(raw)}", plugin=plugin)
        return None, {}
    # jsonschema only here: loading plugins (``scaler --help`` does) must not import it
    from jsonschema.exceptions import best_match

    from scaler_wizard.manifests.validation import StrictValidator, describe

    schema = config_schema(config) if isinstance(config, type) else config
    errors = list(StrictValidator(schema).iter_errors(raw))
    if errors:
        msg = describe(best_match(errors))
        text = f"{where}.{msg}" if not msg.startswith("(top level)") else f"{where}{msg[11:]}"
        raise PluginError(text, plugin=plugin)
    if isinstance(config, type):
        try:
            obj = config(**raw)
        except (TypeError, ValueError) as exc:
            raise PluginError(f"{where}: {exc}", plugin=plugin) from exc
        assert dataclasses.is_dataclass(obj) and not isinstance(obj, type)
        return obj, dataclasses.asdict(obj)
    filled = {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}
    filled.update(raw)
    return filled, filled

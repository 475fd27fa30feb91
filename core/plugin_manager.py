"""The one plugin manager: built-ins and third-party plugins register through the same hooks."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from scaler_wizard import hookspecs
from scaler_wizard.errors import PluginError, did_you_mean
from scaler_wizard.plugin_config import build_config, config_schema
from scaler_wizard.version import __version__

#: Built-in plugins, registered exactly like a third party's. Each module only registers: it
#: imports its implementation (torch) inside the hook, so loading plugins (``scaler --help``
#: does, for ``register_commands``) imports no torch (tests/test_startup.py).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "scaler_wizard.plugins.gating",
    "scaler_wizard.plugins.heads",
    "scaler_wizard.plugins.lora",
    "scaler_wizard.plugins.peft_lora",
    "scaler_wizard.plugins.stores",
    "scaler_wizard.plugins.token_tail",  # strategy attn-mlp (issue 12)
)
SELF_DISTRIBUTION = "scaler-wizard"
#: provider of a plugin registered in code rather than installed: nothing to tell users to install
UNKNOWN_DISTRIBUTION = "unknown"

#: hook name -> registry kind
KINDS: dict[str, str] = {
    "register_gating": "gating",
    "register_heads": "head",
    "register_branch_strategies": "strategy",
    "register_stores": "store",
}
KIND_HELP = {"gating": "gating", "head": "head", "strategy": "branch strategy", "store": "store backend"}


@dataclass(frozen=True)
class Registration:
    """One named factory and who provides it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type | dict[str, Any] | None
    plugin: str
    distribution: str
    version: str
    description: str = ""

    def schema(self) -> dict[str, Any]:
        if self.config is None:
            return {"type": "object", "additionalProperties": False, "properties": {}}
        return config_schema(self.config) if isinstance(self.config, type) else self.config

    def provider(self) -> dict[str, str]:
        return {"distribution": self.distribution, "version": self.version}

    def build_config(self, raw: Any, *, where: str) -> tuple[Any, dict[str, Any]]:
        return build_config(self.config, raw, where=where, plugin=self.name)


@dataclass
class LoadFailure:
    plugin: str
    distribution: str
    error: str


@dataclass
class PluginHost:
    """The pluggy manager plus what we learnt loading it."""

    pm: pluggy.PluginManager
    distributions: dict[str, tuple[str, str]] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)


_host: PluginHost | None = None
_registry_cache: tuple[tuple[int, ...], Registry] | None = None
_strict: bool | None = None  # set_strict(); None: SCALER_STRICT_PLUGINS decides


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, refusing plugins that declare an unsupported ``scaler_wizard_api``.

    Checked here so that a plugin registered in code (``pm.register(obj)``) is refused
    exactly like one found through an entry point.
    """

    def register(self, plugin: object, name: str | None = None) -> str | None:
        _check_api(plugin, name or self.get_canonical_name(plugin))
        return super().register(plugin, name)


def _new_host() -> PluginHost:
    pm = _PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    host = PluginHost(pm)
    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        pm.register(module, name=module_name)
        host.distributions[module_name] = (SELF_DISTRIBUTION, __version__)
    _load_entry_points(host)
    pm.check_pending()
    return host


def strict_mode() -> bool:
    """Whether a plugin that fails to load is an error rather than a warning."""
    if _strict is not None:
        return _strict
    return os.environ.get("SCALER_STRICT_PLUGINS", "") not in ("", "0", "false")


def set_strict(strict: bool | None = True) -> None:
    """Force strict loading on or off (``scaler --strict``); None follows SCALER_STRICT_PLUGINS.

    Call it before plugins are first loaded; if they already were, a failure recorded then
    is raised now, so the switch means the same whenever it is given.
    """
    global _strict
    _strict = strict
    if strict and _host is not None and _host.failures:
        f = _host.failures[0]
        raise PluginError(
            f"plugin {f.plugin!r} ({f.distribution}) failed to load: {f.error}", plugin=f.plugin
        )


def _load_entry_points(host: PluginHost) -> None:
    wanted_env = os.environ.get("SCALER_PLUGINS")
    wanted = None if wanted_env is None else {p.strip() for p in wanted_env.split(",") if p.strip()}
    for ep in metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if wanted is not None and ep.name not in wanted:
            continue
        dist = ep.dist.name if ep.dist else "unknown"
        version = ep.dist.version if ep.dist else "0"
        try:
            plugin = ep.load()
            _check_api(plugin, ep.name)
            host.pm.register(plugin, name=ep.name)
            host.distributions[ep.name] = (dist, version)
        except Exception as exc:  # a broken plugin must not take the CLI down
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if strict_mode():
                raise PluginError(
                    f"plugin {ep.name!r} ({dist} {version}) failed to load: {message}", plugin=ep.name
                ) from exc
            host.failures.append(LoadFailure(ep.name, f"{dist} {version}", message))
            print(
                f"warning: plugin {ep.name!r} ({dist} {version}) failed to load and is skipped: {message}",
                file=sys.stderr,
            )


def _check_api(plugin: object, name: str) -> None:
    spec = getattr(plugin, "scaler_wizard_api", None)
    if spec is None:
        return
    from packaging.specifiers import InvalidSpecifier, SpecifierSet  # packaging: only when needed
    from packaging.version import Version

    try:
        ok = Version(hookspecs.HOOKSPEC_VERSION) in SpecifierSet(str(spec))
    except InvalidSpecifier as exc:
        raise PluginError(
            f"plugin {name!r} declares an invalid scaler_wizard_api {spec!r}", plugin=name
        ) from exc
    if not ok:
        raise PluginError(
            f"plugin {name!r} supports hook API {spec}, this scaler-wizard has {hookspecs.HOOKSPEC_VERSION}",
            plugin=name,
        )


def get_host() -> PluginHost:
    global _host
    if _host is None:
        _host = _new_host()
    return _host


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (tests may ``register``/``unregister`` on it)."""
    return get_host().pm


def reset_plugins() -> None:
    """Forget the manager (and ``set_strict``) so the next use re-discovers plugins (for tests)."""
    global _host, _registry_cache, _strict
    _host = None
    _registry_cache = None
    _strict = None


class Registry:
    """Everything the installed plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS.values()}

    def add(self, reg: Registration) -> None:
        existing = self.entries[reg.kind].get(reg.name)
        if existing is not None:
            raise PluginError(
                f"{KIND_HELP[reg.kind]} {reg.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} ({existing.distribution}) and by plugin {reg.plugin!r} "
                f"({reg.distribution}); uninstall one of them",
                plugin=reg.plugin,
            )
        self.entries[reg.kind][reg.name] = reg

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(
        self, kind: str, name: str, *, provider: dict[str, str] | None = None, where: str = ""
    ) -> Registration:
        """Look up a factory; if missing, say which distribution to install."""
        reg = self.entries[kind].get(name)
        if reg is not None:
            return reg
        at = f"{where}: " if where else ""
        if provider and provider.get("distribution") not in (None, SELF_DISTRIBUTION, UNKNOWN_DISTRIBUTION):
            hint = install_hint(provider.get("distribution"), provider.get("version"))
            raise PluginError(f"{at}{KIND_HELP[kind]} plugin {name!r} is not installed{hint}", plugin=name)
        raise PluginError(
            f"{at}unknown {KIND_HELP[kind]} {name!r} {did_you_mean(name, self.names(kind))}", plugin=name
        )

    def __iter__(self) -> Iterator[Registration]:
        for kind in self.entries.values():
            yield from kind.values()


def install_hint(distribution: object, version: object) -> str:
    """``; install `name>=version``` from a manifest's provider, or a hint that echoes nothing.

    The provider comes from a manifest that may have been pulled from anyone: only a PEP 508
    name and a PEP 440 version are printed, never options such as ``--index-url``.
    """
    if not isinstance(distribution, str) or not isinstance(version, str):
        return "; its manifest names no valid distribution to install"
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        req = Requirement(distribution)
        valid_name = str(req) == distribution and req.name == distribution
    except InvalidRequirement:
        valid_name = False
    if not valid_name or len(distribution) > 200:
        return "; its manifest names no valid distribution to install"
    try:
        Version(version)
        valid_version = version.isascii() and version == version.strip() and len(version) <= 100
    except InvalidVersion:
        valid_version = False
    if not valid_version:
        return f"; install `{distribution}`"
    return f"; install `{distribution}>={version}`"


def _distribution_of(host: PluginHost, plugin_name: str, plugin: object) -> tuple[str, str]:
    if plugin_name in host.distributions:
        return host.distributions[plugin_name]
    for dist_name, (d, v) in ((p, host.distributions[p]) for p in host.distributions):
        if host.pm.get_plugin(dist_name) is plugin:
            return d, v
    return UNKNOWN_DISTRIBUTION, "0"


def build_registry(host: PluginHost | None = None) -> Registry:
    """Call every ``register_*`` hook, attributing each registration to its plugin."""
    host = host or get_host()
    registry = Registry()
    for hook_name, kind in KINDS.items():
        hook = getattr(host.pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order (pluggy calls LIFO), built-ins first
            dist, version = _distribution_of(host, impl.plugin_name, impl.plugin)

            def register(
                name: str,
                factory: Callable[..., Any],
                *,
                config: type | dict[str, Any] | None = None,
                description: str = "",
                _kind: str = kind,
                _impl: Any = impl,
                _dist: str = dist,
                _version: str = version,
            ) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(
                        f"plugin {_impl.plugin_name!r} registered a {_kind} with no name",
                        plugin=_impl.plugin_name,
                    )
                if isinstance(config, type):
                    try:
                        config_schema(config)
                    except TypeError as exc:
                        raise PluginError(
                            f"plugin {_impl.plugin_name!r}: {KIND_HELP[_kind]} {name!r} has an invalid config: {exc}",
                            plugin=_impl.plugin_name,
                        ) from exc
                doc = description or (getattr(factory, "__doc__", None) or "").strip().split("\n")[0]
                registry.add(
                    Registration(_kind, name, factory, config, _impl.plugin_name, _dist, _version, doc)
                )

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}",
                    plugin=impl.plugin_name,
                ) from exc
    return registry


def get_registry() -> Registry:
    """The registry for the currently registered plugins (rebuilt when that set changes)."""
    global _registry_cache
    host = get_host()
    key = tuple(sorted(id(p) for p in host.pm.get_plugins()))
    if _registry_cache is None or _registry_cache[0] != key:
        _registry_cache = (key, build_registry(host))
    return _registry_cache[1]

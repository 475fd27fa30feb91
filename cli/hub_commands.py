"""``scaler publish`` and ``scaler pull``: models to and from a bank-store backend (the Hub by default)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json
from scaler_wizard.errors import ScalerError

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
EndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--endpoint", help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co).", show_default=False
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token (default: HF_TOKEN, else the token saved by `hf auth login`). Never stored or printed.",
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    app.command("publish")(publish)
    app.command("pull")(pull)


def open_remote(location: str, **options: Any) -> Any:
    """A store backend by URL scheme (``hf://`` when there is none), through the plugin registry."""
    from scaler_wizard.plugin_manager import get_registry

    scheme, sep, _ = location.partition("://")
    if not sep:
        scheme, location = "hf", f"hf://{location}"
    reg = get_registry().get("store", scheme, where=location)
    given = {k: v for k, v in options.items() if v is not None}
    try:
        return reg.factory(location, **given)
    except TypeError as exc:
        flags = ", ".join(f"--{k}" for k in given)
        raise ScalerError(f"store backend {scheme!r} ({reg.plugin}) does not take {flags}") from exc


def _remote_for(location: str, action: str, **options: Any) -> Any:
    remote = open_remote(location, **options)
    if not callable(getattr(remote, action, None)):
        scheme = location.partition("://")[0] if "://" in location else "hf"
        raise ScalerError(f"store backend {scheme!r} cannot {action} models")
    return remote


def _say(message: str) -> None:
    err.print(message, style="dim", markup=False)


def publish(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo: namespace/name (or hf://namespace/name).")],
    tag: Annotated[
        str | None, typer.Option("--tag", help="Tag for the commit (default v<version>); tags are immutable.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (default main; created if missing).")
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    endpoint: EndpointOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish a model version: manifest, the banks the repo lacks, a model card; tag v<version>."""
    from scaler_wizard.remote.publishing import human_size

    store = open_store()
    remote = _remote_for(repo_id, "publish", endpoint=endpoint, token=token)
    result = remote.publish(store, model, tag=tag, revision=revision, private=private, progress=_say)
    if as_json:
        print_json(result.to_json())
    elif result.already_published:
        out.print(
            f"{result.repo_id}@{result.tag} already holds {result.model} v{result.version}: nothing to do"
        )
    else:
        out.print(
            f"published {result.model} v{result.version} to {result.repo_id}@{result.tag} "
            f"(commit {result.commit[:12]}): {len(result.uploaded)} banks uploaded "
            f"({human_size(result.uploaded_bytes)}), {len(result.reused)} already there, {result.seconds:.1f}s"
        )


def pull(
    spec: Annotated[str, typer.Argument(help="Hub repo and revision: namespace/name[@tag|branch|commit].")],
    as_name: Annotated[
        str | None, typer.Option("--as", help="Local model name (default: the published model's name).")
    ] = None,
    branches: Annotated[
        str | None, typer.Option("--branches", help="Only these branches (comma-separated), plus the trunk.")
    ] = None,
    into: Annotated[
        str | None,
        typer.Option("--into", help="Add the branches to this local model (their trunk must match it)."),
    ] = None,
    endpoint: EndpointOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Pull a model (or some of its branches): every bank's sha256 is checked before the store takes it."""
    from scaler_wizard.remote.publishing import human_size

    wanted = [b.strip() for b in branches.split(",") if b.strip()] if branches is not None else None
    if branches is not None and not wanted:
        raise typer.BadParameter("--branches needs at least one branch name")
    store = open_store(create=True)
    remote = _remote_for(spec, "pull", endpoint=endpoint, token=token)
    result = remote.pull(store, as_name=as_name, branches=wanted, into=into, progress=_say)
    if as_json:
        print_json(result.to_json())
        return
    what = {
        "created": "created",
        "fast-forward": "fast-forwarded",
        "added-branches": "added branches to",
        "up-to-date": "already up to date:",
    }.get(result.action, result.action)
    out.print(
        f"{what} {result.name} v{result.version} {result.manifest} from {result.repo_id}@{result.revision} "
        f"(commit {result.commit[:12]}): {len(result.downloaded)} files downloaded "
        f"({human_size(result.downloaded_bytes)}), {result.already_here} already here, {result.seconds:.1f}s",
        markup=False,
    )

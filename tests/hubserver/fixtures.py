"""pytest fixtures for a real Hugging Face Hub API on 127.0.0.1.

Two processes, both bound to 127.0.0.1 only:

* ``write_server.py`` (stdlib, run with this interpreter) is the front door: ``HubServer.endpoint``.
  It implements the Hub's write API and reverse-proxies every other request to
* olah (its own venv, created by ``setup_olah.sh``), which serves the same git folders read-only.

Use it with::

    def test_x(hub_server):                 # session-scoped server
        api = hub_server.api()              # HfApi(endpoint=..., token=...)

    def test_y(hub_env):                    # also points huggingface_hub's env/constants at it
        huggingface_hub.snapshot_download("hubtest/repo")

or, outside pytest, ``with start_hub_server(Path(tmpdir)) as server: ...``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from huggingface_hub import HfApi

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SETUP_SCRIPT = HERE / "setup_olah.sh"
WRITE_SERVER = HERE / "write_server.py"
REPO_TYPE_DIRS = {None: "models", "model": "models", "dataset": "datasets", "space": "spaces"}
_NO_PROXY = "127.0.0.1,localhost,::1"
# direct connections only: never let an http(s)_proxy variable route loopback traffic elsewhere
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HubServerError(RuntimeError):
    """The test Hub could not be set up or started."""


def olah_venv() -> Path:
    return Path(os.environ.get("HUBSERVER_OLAH_VENV") or (REPO_ROOT / ".venv-olah"))


def ensure_olah(timeout: float = 900) -> Path:
    """Return the olah-cli path, running setup_olah.sh first (it is a no-op when up to date)."""
    cli = olah_venv() / "bin" / "olah-cli"
    try:
        proc = subprocess.run(
            [shutil.which("bash") or "/bin/bash", str(SETUP_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HUBSERVER_OLAH_VENV": str(olah_venv())},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HubServerError(f"running {SETUP_SCRIPT} failed: {exc!r}") from exc
    if proc.returncode != 0 or not cli.exists():
        raise HubServerError(
            f"{SETUP_SCRIPT} failed (exit {proc.returncode}); olah is needed for the test Hub.\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return cli


@dataclass
class HubServer:
    """A running test Hub. ``endpoint`` is what HF_ENDPOINT / HfApi(endpoint=...) should be."""

    endpoint: str
    root: Path  # mirrors folder: root/{models,datasets,spaces}/<namespace>/<name> (git repos)
    token: str  # bearer token the write API requires
    user: str  # whoami name, default namespace of create_repo("name")
    olah_endpoint: str  # olah itself (read-only; normally not needed)
    workdir: Path  # configs and logs of both processes
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point a huggingface_hub client (e.g. a subprocess) here."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_TOKEN": self.token,
            "HF_HUB_DISABLE_XET": "1",  # the server speaks LFS, not Xet
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "NO_PROXY": _NO_PROXY,
            "no_proxy": _NO_PROXY,
        }

    def api(self, **kwargs: Any) -> HfApi:
        """``HfApi`` bound to this server (and its token unless ``token=`` is given)."""
        from huggingface_hub import HfApi

        kwargs.setdefault("token", self.token)
        return HfApi(endpoint=self.endpoint, **kwargs)

    def repo_dir(self, repo_id: str, repo_type: str | None = None) -> Path:
        return self.root / REPO_TYPE_DIRS[repo_type] / repo_id

    def stats(self) -> dict[str, int]:
        """Counters kept by the write server (LFS uploads, objects already present, commits, ...)."""
        with _OPENER.open(f"{self.endpoint}/_hubserver/stats", timeout=10) as resp:
            return json.load(resp)

    def logs(self, limit: int = 4000) -> str:
        out = []
        for name in ("write_server.log", "olah.log"):
            path = self.workdir / name
            if path.exists():
                out.append(f"--- {name} ---\n{path.read_text(errors='replace')[-limit:]}")
        return "\n".join(out)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: teardown signals the whole group
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # die with the test process even on SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)  # the group we created with setsid (pgid == pid)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    else:  # leader gone: still reap anything left in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _olah_config(path: Path, olah_port: int, front_port: int, root: Path, cache: Path) -> None:
    path.write_text(
        "\n".join(
            [
                "[basic]",
                'host = "127.0.0.1"',
                f"port = {olah_port}",
                'ssl-key = ""',
                'ssl-cert = ""',
                f"repos-path = {json.dumps(str(cache))}",
                # URLs olah builds (redirects, LFS) point at the front door
                'mirror-scheme = "http"',
                f'mirror-netloc = "127.0.0.1:{front_port}"',
                f'mirror-lfs-netloc = "127.0.0.1:{front_port}"',
                # "upstream" Hub = a closed loopback port: nothing ever leaves the machine
                'hf-scheme = "http"',
                'hf-netloc = "127.0.0.1:9"',
                'hf-lfs-netloc = "127.0.0.1:9"',
                f"mirrors-path = [{json.dumps(str(root))}]",
                "metadata-cache-ttl = 0",
                "",
                "[accessibility]",
                "offline = true",
                "",
            ]
        )
    )


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update(NO_PROXY=_NO_PROXY, no_proxy=_NO_PROXY, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _health(endpoint: str) -> bool:
    try:
        with _OPENER.open(f"{endpoint}/_hubserver/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def start_hub_server(
    workdir: Path,
    *,
    token: str | None = None,
    user: str = "hubtest",
    startup_timeout: float = 90.0,
    olah_cli: Path | None = None,
) -> Iterator[HubServer]:
    """Start write server + olah on free loopback ports; stop both on exit."""
    if shutil.which("git") is None:
        raise HubServerError("git is required by the test Hub")
    olah_cli = olah_cli or ensure_olah()
    workdir = Path(workdir)
    root = workdir / "mirrors"
    (workdir / "olah").mkdir(parents=True, exist_ok=True)
    (workdir / "olah-home").mkdir(exist_ok=True)
    for d in REPO_TYPE_DIRS.values():
        (root / d).mkdir(parents=True, exist_ok=True)
    token = token or f"hf_hubserver_{secrets.token_hex(12)}"

    last_error = ""
    for _attempt in range(3):  # retry only if a picked port was taken meanwhile
        front_port, olah_port = _free_ports(2)
        endpoint = f"http://127.0.0.1:{front_port}"
        config = workdir / "olah.toml"
        _olah_config(config, olah_port, front_port, root, workdir / "olah" / "cache")
        server = HubServer(
            endpoint=endpoint,
            root=root,
            token=token,
            user=user,
            olah_endpoint=f"http://127.0.0.1:{olah_port}",
            workdir=workdir,
        )
        logs = []
        try:
            for name, cmd, env, cwd in (
                (
                    "write_server.log",
                    [
                        sys.executable,
                        str(WRITE_SERVER),
                        "--root",
                        str(root),
                        "--port",
                        str(front_port),
                        "--upstream-port",
                        str(olah_port),
                        "--user",
                        user,
                    ],
                    _clean_env({"HUBSERVER_TOKEN": token}),
                    workdir,
                ),
                (
                    "olah.log",
                    [str(olah_cli), "-c", str(config)],
                    _clean_env({"HOME": str(workdir / "olah-home")}),
                    workdir / "olah",
                ),
            ):
                log = open(workdir / name, "ab")  # closed in the finally below
                logs.append(log)
                server._procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=cwd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        preexec_fn=_child_setup,
                    )
                )
            deadline = time.monotonic() + startup_timeout
            delay = 0.02
            while not _health(endpoint):
                dead = [p for p in server._procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    what = "exited early" if dead else f"not ready after {startup_timeout:.0f}s"
                    raise HubServerError(f"test Hub {what}\n{server.logs()}")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)
        except BaseException as exc:
            for p in server._procs:
                _stop(p)
            for log in logs:
                log.close()
            text = server.logs()
            if isinstance(exc, HubServerError) and "address already in use" in text.lower():
                last_error = str(exc)
                for name in ("write_server.log", "olah.log"):
                    (workdir / name).unlink(missing_ok=True)
                continue
            raise
        try:
            yield server
        finally:
            for p in server._procs:
                _stop(p)
            for log in logs:
                log.close()
        return
    raise HubServerError(f"could not start the test Hub (ports kept clashing)\n{last_error}")


# --------------------------------------------------------------------------------------
# pytest fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """A running test Hub (session scope). Skips only when git is missing."""
    if shutil.which("git") is None:
        pytest.skip("test Hub needs `git` (repos are stored as git repositories); install git to run it")
    ensure_olah()
    with start_hub_server(tmp_path_factory.mktemp("hubserver")) as server:
        yield server


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """Point huggingface_hub at the test Hub in this process: env vars *and* the already-imported
    ``huggingface_hub.constants`` (read at import time), with a private HF_HOME under tmp_path."""
    hf_home = tmp_path / "hf_home"
    env = {**hub_server.env, "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from huggingface_hub import constants

    patches: dict[str, object] = {
        "ENDPOINT": hub_server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"),
    }
    for attr, new in patches.items():
        if hasattr(constants, attr):
            monkeypatch.setattr(constants, attr, new)
    yield hub_server

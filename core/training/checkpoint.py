"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder ``checkpoints/step-00000500/`` holding

* ``model.safetensors``   the trainable state (trunk layers, branch adapters and heads)
* ``optimizer.safetensors`` the optimizer's per-parameter tensors (``state/<i>/<name>``) and
  the torch RNG state
* ``state.json``           step, optimizer param groups, scheduler, sampler, monitor, the
  Python and NumPy RNG states, and anything else the trainer keeps

It is written into a temporary folder (every file fsynced), renamed into place, and only
then does ``checkpoints/latest`` (itself written atomically) point at it: a crash at any
moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from scaler_wizard.banks.atomic import atomic_write_bytes, fsync_path
from scaler_wizard.errors import CheckpointError

FORMAT = "scaler-wizard/train-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"


@dataclass
class Checkpoint:
    step: int
    path: Path
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]


# -- optimizer ---------------------------------------------------------------------------
def optimizer_to_parts(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_parts(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split("/", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# -- RNG ---------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON) of the Python, NumPy and torch (CPU, and CUDA if any) generators."""
    version, internal, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# -- files -------------------------------------------------------------------------------
def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically; keep only the newest ``keep``. Returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / step_name(step)
    tmp = folder / f".tmp-{step_name(step)}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        opt_tensors, opt_meta = optimizer_to_parts(optimizer)
        rng_tensors, rng_meta = capture_rng()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.items()}, str(tmp / "model.safetensors")
        )
        save_file({**opt_tensors, **rng_tensors}, str(tmp / "optimizer.safetensors"))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "optimizer": opt_meta,
            "rng": rng_meta,
            **state,
        }
        (tmp / "state.json").write_text(json.dumps(doc), encoding="utf-8")
        for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
            fsync_path(tmp / name)
        fsync_path(tmp)
        if final.exists():  # the same step written again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(folder / LATEST, (final.name + "\n").encode())
    _prune(folder, keep)
    return final


def _prune(folder: Path, keep: int) -> None:
    done = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp-*"):  # left by a crash mid-write
        with contextlib.suppress(OSError):
            if stale.is_dir() and not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the highest step."""
    pointer = folder / LATEST
    if pointer.is_file():
        candidate = folder / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "state.json").is_file():
            return candidate
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        doc = json.loads((path / "state.json").read_text(encoding="utf-8"))
        model = load_file(str(path / "model.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}".splitlines()[0], path=path) from exc
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint", path=path)
    rng_tensors = {k: v for k, v in opt.items() if k.startswith("rng/")}
    opt_tensors = {k: v for k, v in opt.items() if k.startswith("state/")}
    state = {k: v for k, v in doc.items() if k not in ("format", "format_version", "optimizer", "rng")}
    return Checkpoint(
        step=int(doc["step"]),
        path=path,
        model=model,
        optimizer=optimizer_from_parts(opt_tensors, doc["optimizer"]),
        rng={"tensors": rng_tensors, "meta": doc["rng"]},
        state=state,
    )

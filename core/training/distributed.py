"""Hugging Face ``accelerate`` for ``scaler train``: one process, or many under ``accelerate
launch``; plus the little a run needs across processes and devices."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.errors import ScalerError
from scaler_wizard.training.plan import RunPlan, default_run_dir, write_plan


def make_accelerator() -> Any:
    """One Accelerator per process; global batches are split across processes (split_batches),
    so N processes see exactly the batches one process would."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def broadcast_text(accelerator: Any, text: str | None) -> str:
    """The main process's string, on every process (as bytes in a tensor: no pickle)."""
    if accelerator.num_processes == 1:
        assert text is not None
        return text
    from accelerate.utils import broadcast

    buf = torch.zeros(4096, dtype=torch.uint8)
    if accelerator.is_main_process:
        data = (text or "").encode()
        if len(data) > buf.numel() - 4:
            raise ScalerError("run folder path is too long")
        buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
        buf[4 : 4 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    buf = broadcast(buf.to(accelerator.device), from_process=0).cpu()
    n = int.from_bytes(bytes(buf[:4].tolist()), "little")
    return bytes(buf[4 : 4 + n].tolist()).decode()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def start_run(
    store: ContentStore,
    plan: RunPlan | None,
    *,
    run_dir: Path | None,
    accelerator: Any,
) -> Path:
    """On the main process write the plan into a new run folder; every process gets its path."""
    path: str | None = None
    if accelerator.is_main_process:
        assert plan is not None
        target = run_dir or default_run_dir(store, plan.model)
        write_plan(target, plan)
        path = str(target.resolve())
    path = broadcast_text(accelerator, path)
    accelerator.wait_for_everyone()
    return Path(path)


def reduce_step(
    acc: Any, out: dict[str, torch.Tensor], loss: torch.Tensor, branch: torch.Tensor
) -> dict[str, Any]:
    """A step's values every process agrees on: one all-reduce for the scalars and expert
    loads, one all-gather for the per-example values."""
    load = out["load"].to(torch.float64)
    losses = torch.stack([loss.detach(), out["loss"].detach(), out["aux"].detach(), out["tokens"]])
    scalars = torch.cat([losses.to(torch.float64), load.flatten()])
    examples = torch.stack([out["example_loss"], out["correct"], branch.to(out["correct"].dtype)], 1).to(
        torch.float64
    )
    if acc.num_processes > 1:
        scalars = acc.reduce(scalars, reduction="sum")
        examples = acc.gather(examples)
    scalars = scalars.cpu()
    nproc = acc.num_processes
    total_loss, task_loss, aux_loss = (float(scalars[i]) / nproc for i in range(3))
    return {
        "loss": total_loss,
        "task_loss": task_loss,
        "aux_loss": aux_loss,
        "tokens": float(scalars[3]),
        "load_counts": scalars[4:].reshape(load.shape).tolist(),
        "examples": examples.cpu(),
    }

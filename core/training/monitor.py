"""Monitoring for ``scaler train``: the JSONL + TensorBoard log and the source's quality checks.

Quality checks (source documents, "quality assurance"), each a warning while training:

* **expert collapse**: over a window of steps, an expert receives less than
  ``collapse_threshold`` of its fair share (1/E) of the token assignments;
* **aux loss not decreasing**: the load-balancing loss of the last window is above the
  previous window's and above its balanced value (1.0 per layer);
* **branch accuracy dropping**: a branch's eval accuracy falls ``accuracy_drop`` below its best;
* **gradient-norm spike**: the pre-clip gradient norm exceeds ``grad_spike_factor`` times the
  median of the recent steps.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.training.config import TrainConfig

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL (one record per line, ``event`` says what) plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / METRICS_FILE
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = _tensorboard(run_dir, purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        if self._tb is None:
            return
        step = int(record.get("step", 0))
        for key, value in _flatten(record):
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self._tb.add_scalar(key, value, step)
        if record.get("event") == "warning":
            self._tb.add_text("warnings", str(record.get("message", "")), step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """TensorBoard tags: ``train/loss``, ``train/branch/spam/accuracy``, ``train/experts/layer0/e3``."""
    event = record.get("event", "train")
    if event not in ("train", "eval"):
        return []
    out: list[tuple[str, Any]] = []
    for key, value in record.items():
        if key in ("event", "step"):
            continue
        if key == "branches" and isinstance(value, dict):
            for bname, metrics in value.items():
                out += [(f"{event}/branch/{bname}/{m}", v) for m, v in metrics.items()]
        elif key == "expert_load" and isinstance(value, list):
            for li, row in enumerate(value):
                out += [(f"{event}/experts/layer{li}/e{e}", v) for e, v in enumerate(row)]
        elif key == "lr" and isinstance(value, dict):
            out += [(f"{event}/lr/{g}", v) for g, v in value.items()]
        else:
            out.append((f"{event}/{key}", value))
    return out


def _tensorboard(run_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional ([train] extra); the JSONL log is always written
        return None
    return SummaryWriter(str(run_dir), purge_step=purge_step)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics log (a torn last line, after a kill, is skipped)."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def truncate_after(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (a killed run got past its last checkpoint)."""
    if not path.is_file():
        return
    kept = [r for r in read_records(path) if int(r.get("step", 0)) <= step and r.get("event") != "summary"]
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())


@dataclass
class QualityChecks:
    """The source's training checks; state is JSON so a resumed run warns exactly as before."""

    config: TrainConfig
    num_layers: int
    grad_norms: list[float] = field(default_factory=list)
    load_window: list[list[float]] = field(default_factory=list)  # (L, E) assignment counts
    window_steps: int = 0
    aux_window: list[float] = field(default_factory=list)
    aux_previous: float | None = None
    best_accuracy: dict[str, float] = field(default_factory=dict)
    collapsed: list[str] = field(default_factory=list)  # "layer/expert" currently warned about
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "grad_norms": self.grad_norms,
            "load_window": self.load_window,
            "window_steps": self.window_steps,
            "aux_window": self.aux_window,
            "aux_previous": self.aux_previous,
            "best_accuracy": self.best_accuracy,
            "collapsed": self.collapsed,
            "warnings": self.warnings,
        }

    def load_json(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def _warn(self, step: int, check: str, message: str) -> dict[str, Any]:
        record = {"event": "warning", "step": step, "check": check, "message": message}
        self.warnings.append(record)
        return record

    def after_step(
        self, step: int, *, grad_norm: float, aux_loss: float, load_counts: list[list[float]]
    ) -> list[dict[str, Any]]:
        """Feed one step; returns the warnings it raised."""
        cfg = self.config
        out: list[dict[str, Any]] = []
        recent = self.grad_norms[-50:]
        if len(recent) >= 10:
            median = statistics.median(recent)
            if median > 0 and grad_norm > cfg.grad_spike_factor * median:
                out.append(
                    self._warn(
                        step,
                        "grad_spike",
                        f"gradient norm spike at step {step}: {grad_norm:.3g} is "
                        f"{grad_norm / median:.1f}x the recent median {median:.3g} (clipped to {cfg.grad_clip})",
                    )
                )
        self.grad_norms = [*recent, grad_norm][-50:]
        if not self.load_window:
            self.load_window = [list(row) for row in load_counts]
        else:
            for acc_row, row in zip(self.load_window, load_counts, strict=True):
                for e, v in enumerate(row):
                    acc_row[e] += v
        self.aux_window.append(aux_loss)
        self.window_steps += 1
        if self.window_steps >= cfg.check_window:
            out += self._close_window(step)
        return out

    def _close_window(self, step: int) -> list[dict[str, Any]]:
        cfg = self.config
        out = []
        now_collapsed = []
        for li, row in enumerate(self.load_window):
            total, experts = sum(row), len(row)
            if total <= 0 or experts < 2:
                continue
            for e, count in enumerate(row):
                utilisation = count / total * experts  # 1.0 = exactly its fair share
                key = f"{li}/{e}"
                if utilisation < cfg.collapse_threshold:
                    now_collapsed.append(key)
                    if key not in self.collapsed:
                        out.append(
                            self._warn(
                                step,
                                "expert_collapse",
                                f"expert collapse: layer {li} expert {e} got {count / total:.1%} of the token "
                                f"assignments over the last {self.window_steps} steps (fair share {1 / experts:.1%}, "
                                f"utilisation {utilisation:.2f} < {cfg.collapse_threshold}); raise aux_loss_weight "
                                "or lower top-k",
                            )
                        )
        self.collapsed = now_collapsed
        aux = sum(self.aux_window) / len(self.aux_window)
        balanced = float(self.num_layers)  # the balance loss is 1.0 per layer when uniform
        if (
            self.aux_previous is not None
            and self.num_layers
            and aux > self.aux_previous * 1.001
            and aux > balanced * 1.05
        ):
            out.append(
                self._warn(
                    step,
                    "aux_not_decreasing",
                    f"aux loss not decreasing: {self.aux_previous:.4f} -> {aux:.4f} over the last "
                    f"{self.window_steps} steps (balanced: {balanced:.1f}); raise aux_loss_weight",
                )
            )
        self.aux_previous = aux
        self.aux_window = []
        self.load_window = []
        self.window_steps = 0
        return out

    def after_eval(self, step: int, accuracy: dict[str, float]) -> list[dict[str, Any]]:
        out = []
        for name, acc in accuracy.items():
            best = self.best_accuracy.get(name)
            if best is not None and acc < best - self.config.accuracy_drop:
                out.append(
                    self._warn(
                        step,
                        "accuracy_drop",
                        f"branch {name}: eval accuracy dropped to {acc:.3f} (best {best:.3f}); "
                        "consider a lower adapter learning rate",
                    )
                )
            self.best_accuracy[name] = max(acc, best if best is not None else acc)
        return out

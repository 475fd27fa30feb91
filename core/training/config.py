"""What ``scaler train`` is asked to do: the recipe (hyper-parameters) and the branches' data.

Defaults are the source documents' recipe: learning rates per parameter group (MoE experts
1e-4, gating 5e-4, adapters 5e-4, heads 1e-3), AdamW with weight decay 0.01, gradient clip
1.0, load-balancing loss weight 0.01, 500 warm-up steps (capped at 10% of a short run), and
batch 64 mixing every branch with temperature sampling (p_i ∝ n_i^(1/T), T = 2).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaler_wizard.errors import TrainConfigError
from scaler_wizard.names import validate_name


@dataclass
class TrainConfig:
    """The training recipe. Every field can be set in ``--config`` (JSON or YAML) by its name."""

    steps: int = field(default=1000, metadata={"help": "optimizer steps", "minimum": 1})
    batch_size: int = field(
        default=64, metadata={"help": "global batch (split across processes)", "minimum": 1}
    )
    lr_experts: float = field(default=1e-4, metadata={"help": "MoE experts (and their layer norm)"})
    lr_gating: float = field(default=5e-4, metadata={"help": "gating (router) weights"})
    lr_adapters: float = field(default=5e-4, metadata={"help": "branch adapters"})
    lr_heads: float = field(default=1e-3, metadata={"help": "branch heads"})
    lr_base_layers: float = field(
        default=1e-4, metadata={"help": "base blocks inserted by add-base-layer (with train_base_layers)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=500, metadata={"help": "linear warm-up, then linear decay to 0"})
    warmup_fraction: float = field(
        default=0.1, metadata={"help": "cap the warm-up at this fraction of the run's steps"}
    )
    grad_clip: float = field(default=1.0, metadata={"help": "max global gradient norm"})
    aux_loss_weight: float = field(
        default=0.01, metadata={"help": "weight of the summed load-balancing losses"}
    )
    temperature: float = field(
        default=2.0,
        metadata={"help": "dataset sampling temperature: p_i ∝ n_i^(1/T); 1 = proportional, large = uniform"},
    )
    eval_split: float = field(default=0.1, metadata={"help": "fraction held out per branch for eval"})
    eval_every: int | None = field(default=None, metadata={"help": "steps between evals (default steps/10)"})
    eval_max_rows: int = field(default=2000, metadata={"help": "cap on eval rows per branch"})
    checkpoint_every: int | None = field(
        default=None, metadata={"help": "steps between checkpoints (default 500); always one at the end"}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept in the run folder"})
    base_cache: bool = field(default=True, metadata={"help": "cache the frozen base's token states on disk"})
    cache_float16: bool = field(default=False, metadata={"help": "store cached base states as float16"})
    train_base_layers: bool = field(
        default=False,
        metadata={
            "help": "also train the base blocks `scaler expand add-base-layer` inserted (the rest stays frozen)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for splits, new branches, sampling and noise"})
    # quality checks (the source documents' checklist), reported as warnings while training
    collapse_threshold: float = field(
        default=0.2,
        metadata={"help": "warn when an expert gets less than this share of its fair load (1/E)"},
    )
    check_window: int = field(
        default=50, metadata={"help": "steps per window for the collapse and aux-loss checks"}
    )
    grad_spike_factor: float = field(
        default=5.0, metadata={"help": "warn when the grad norm exceeds this x the recent median"}
    )
    accuracy_drop: float = field(
        default=0.05, metadata={"help": "warn when a branch's eval accuracy falls this far below its best"}
    )

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "keep_checkpoints", "check_window", "eval_max_rows")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {value}", field=name)
        if not 0 < self.eval_split < 1:
            raise TrainConfigError(
                f"eval_split must be between 0 and 1, got {self.eval_split}", field="eval_split"
            )
        if self.temperature <= 0:
            raise TrainConfigError(f"temperature must be > 0, got {self.temperature}", field="temperature")
        if self.warmup_steps < 0 or not 0 <= self.warmup_fraction <= 1:
            raise TrainConfigError(
                "warmup_steps must be >= 0 and warmup_fraction in [0, 1]",
                field="warmup_steps" if self.warmup_steps < 0 else "warmup_fraction",
            )

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used: the default 500 would be the whole of a short run."""
        return min(self.warmup_steps, max(1, int(self.steps * self.warmup_fraction)))

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or 500

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BranchSpec:
    """One branch of a run: its data and, for a new branch, its plugins."""

    name: str
    data: Path
    text_column: str = "text"
    label_column: str = "label"
    eval_data: Path | None = None
    strategy: str = "lora"
    strategy_config: dict[str, Any] | None = None
    head: str = "linear"
    head_config: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"] = str(self.data)
        out["eval_data"] = str(self.eval_data) if self.eval_data else None
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BranchSpec:
        raw = dict(raw)
        raw["data"] = Path(raw["data"])
        raw["eval_data"] = Path(raw["eval_data"]) if raw.get("eval_data") else None
        return cls(**raw)


def parse_branch_option(text: str) -> BranchSpec:
    """``NAME=FILE[:TEXT_COL:LABEL_COL]``. A FILE that exists is taken whole, colons and all."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise TrainConfigError(
            f"--branch {text!r}: expected NAME=FILE[:TEXT_COL:LABEL_COL]", field="--branch"
        )
    validate_name(name, what="branch")
    path, text_col, label_col = rest, "text", "label"
    if not Path(rest).exists():
        parts = rest.rsplit(":", 2)
        if len(parts) == 3 and all(parts):
            path, text_col, label_col = parts
        elif ":" in rest:
            raise TrainConfigError(
                f"--branch {text!r}: give both columns (FILE:TEXT_COL:LABEL_COL) or neither", field="--branch"
            )
    return BranchSpec(name=name, data=Path(path), text_column=text_col, label_column=label_col)


_SPEC_KEYS = {f.name for f in dataclasses.fields(BranchSpec)} - {"name"}
_CONFIG_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: Path) -> tuple[dict[str, Any], list[BranchSpec]]:
    """(recipe fields, branches) from a JSON or YAML file.

    ``branches`` maps a name to ``{data, text_column, label_column, eval_data, strategy,
    strategy_config, head, head_config}`` (or just to the data path); data paths are relative
    to the config file. Every other key is a :class:`TrainConfig` field.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TrainConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            yaml = importlib.import_module("yaml")  # PyYAML comes with accelerate ([train] extra)
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:  # both parsers' errors: one line naming the file
        raise TrainConfigError(
            f"{path}: not valid {path.suffix[1:].upper() or 'JSON'}: {exc}".splitlines()[0]
        ) from exc
    if not isinstance(raw, dict):
        raise TrainConfigError(f"{path}: must hold an object (mapping)")
    specs: list[BranchSpec] = []
    branches = raw.pop("branches", {}) or {}
    if not isinstance(branches, dict):
        raise TrainConfigError(f"{path}: branches: must map branch names to data", field="branches")
    for bname, entry in branches.items():
        where = f"{path}: branches.{bname}"
        validate_name(str(bname), what="branch")
        entry = {"data": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "data" not in entry:
            raise TrainConfigError(f"{where}: needs at least 'data'", field=f"branches.{bname}")
        unknown = sorted(set(entry) - _SPEC_KEYS)
        if unknown:
            raise TrainConfigError(
                f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_SPEC_KEYS))})",
                field=f"branches.{bname}.{unknown[0]}",
            )
        fields = dict(entry)
        for key in ("data", "eval_data"):
            if fields.get(key):
                p = Path(str(fields[key]))
                fields[key] = p if p.is_absolute() else path.parent / p
        specs.append(BranchSpec.from_json({"name": str(bname), **fields}))
    unknown = sorted(set(raw) - _CONFIG_KEYS)
    if unknown:
        raise TrainConfigError(f"{path}: unknown setting {unknown[0]!r}", field=unknown[0])
    return raw, specs


def build_config(fields: dict[str, Any], *, where: str = "config") -> TrainConfig:
    try:
        return TrainConfig(**fields)
    except TypeError as exc:
        raise TrainConfigError(f"{where}: {exc}") from exc

"""Benchmark 2: predict 10 branches on one batch vs PEFT running 10 LoRA adapters.

Ours: a model composed from a temporary store (``init_model`` + ``new_branch`` x 10 +
``save_version`` + ``compose``), then ``model(**batch, branches=[10 names])``: one base +
MoE trunk pass, then 10 pooled-LoRA adapters and linear heads.

Reference: stock PEFT on the same base: ``peft.get_peft_model`` on a fresh
``AutoModel`` from the base folder with 10 LoRA adapters (r=8, alpha=16, target
query/value), and for each adapter ``set_adapter`` + one forward + mean pooling + a
linear head: 10 full encoder passes. That is how PEFT serves several adapters on one
input (its mixed-batch ``adapter_names=`` path would need the batch repeated 10 times:
the same 10x work).

Figures: speed-up = t(PEFT, 10 passes) / t(ours); its limit = 10 x t(one PEFT pass) /
t(one trunk pass of ours) (what a model whose branches cost nothing would reach);
efficiency = speed-up / limit, goal >= 0.9.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from common import (
    BenchResult,
    Row,
    base_model_path,
    cpu_ratio,
    load_sentences,
    loadavg,
    measure_interleaved,
)
from torch import Tensor, nn

NAME = "branches"
N_BRANCHES = 10
GOAL = ">= 0.9"


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def build_ours(root: Path, names: list[str]) -> Any:
    """A stored model with ``names`` branches, composed back from the store (branches loaded)."""
    from scaler_wizard.banks import ContentStore
    from scaler_wizard.modeling.compose import compose, init_model, new_branch, save_version

    store = ContentStore.open(root, create=True)
    init_model(store, "bench")
    model = compose(store, "bench")
    hidden = int(model.origin.base_entry["hidden_size"])
    for i, name in enumerate(names):
        labels = [f"c{j}" for j in range(2 + i % 4)]
        model.add_branch(name, new_branch(hidden_size=hidden, labels=labels))
    save_version(store, model, message=f"{len(names)} benchmark branches")
    model = compose(store, "bench")
    model.load_all_branches()  # bank loading is benchmark 3's business, not this one's
    return model.eval()


def build_peft(names: list[str]) -> tuple[Any, dict[str, nn.Linear]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    def config() -> Any:
        return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])

    base = AutoModel.from_pretrained(str(base_model_path()), local_files_only=True)
    peft_model = get_peft_model(base, config(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config())
    hidden = int(base.config.hidden_size)
    heads = {name: nn.Linear(hidden, 2 + i % 4) for i, name in enumerate(names)}
    peft_model.eval()
    return peft_model, heads


def run(*, quick: bool, threads: int) -> BenchResult:
    n_texts = 16 if quick else 64
    warmup, repeats = (1, 2) if quick else (1, 5)
    names = [f"task{i:02d}" for i in range(N_BRANCHES)]
    texts = load_sentences(n_texts)
    with tempfile.TemporaryDirectory(prefix="bench-branches-") as tmp:
        ours = build_ours(Path(tmp) / "store", names)
        peft_model, heads = build_peft(names)
        batch = ours.base.tokenize(texts)
        attn = {
            "ours": getattr(ours.base.model.config, "_attn_implementation", None),
            "peft": getattr(peft_model.base_model.model.config, "_attn_implementation", None),
        }

        def run_ours() -> object:
            with torch.inference_mode():
                return ours(**batch, branches=names).logits

        def run_trunk() -> object:
            with torch.inference_mode():
                return ours.encode(**batch).pooled

        def peft_pass(name: str) -> Tensor:
            peft_model.set_adapter(name)
            hidden = peft_model(**batch).last_hidden_state
            out: Tensor = heads[name](mean_pool(hidden, batch["attention_mask"]))
            return out

        def run_peft_one() -> object:
            with torch.inference_mode():
                return peft_pass(names[0])

        def run_peft_all() -> object:
            with torch.inference_mode():
                return {name: peft_pass(name) for name in names}

        load_before = loadavg()
        res = measure_interleaved(
            {"ours_10": run_ours, "ours_trunk": run_trunk, "peft_1": run_peft_one, "peft_10": run_peft_all},
            warmup=warmup,
            repeats=repeats,
            inner={"ours_10": 3, "ours_trunk": 3, "peft_1": 3, "peft_10": 1},
        )
        out = run_ours()
        assert isinstance(out, dict) and sorted(out) == names
    t_ours, t_trunk = res["ours_10"].median, res["ours_trunk"].median
    t_p1, t_p10 = res["peft_1"].median, res["peft_10"].median
    speedup = t_p10 / t_ours
    limit = N_BRANCHES * t_p1 / t_trunk
    efficiency = speedup / limit
    cpu_speedup = cpu_ratio(res["peft_10"], res["ours_10"])
    cpu_limit = cpu_ratio(res["peft_1"], res["ours_trunk"])
    cpu_limit = N_BRANCHES * cpu_limit if cpu_limit is not None else None
    cpu_eff = cpu_speedup / cpu_limit if cpu_speedup is not None and cpu_limit else None
    tokens = batch["input_ids"].shape
    rows = [
        Row(
            name="branches10.speedup",
            ours=t_ours * 1e3,
            reference=t_p10 * 1e3,
            unit="ms",
            ratio=speedup,
            ratio_definition="t(PEFT 10 adapters = 10 passes) / t(ours: 1 trunk pass + 10 branches)",
            goal=None,
            cpu_ratio=cpu_speedup,
            ours_label="ours, 10 branches",
            reference_label="PEFT, 10 adapters",
        ),
        Row(
            name="branches10.limit",
            ours=t_trunk * 1e3,
            reference=N_BRANCHES * t_p1 * 1e3,
            unit="ms",
            ratio=limit,
            ratio_definition="10 x t(one PEFT pass) / t(one trunk pass of ours)",
            goal=None,
            cpu_ratio=cpu_limit,
            ours_label="ours, trunk pass only",
            reference_label="10 x one PEFT pass",
        ),
        Row(
            name="branches10.efficiency",
            ours=speedup,
            reference=limit,
            unit="x",
            ratio=efficiency,
            ratio_definition="speed-up / limit",
            goal=GOAL,
            cpu_ratio=cpu_eff,
            ours_label="speed-up",
            reference_label="limit",
        ),
    ]
    return BenchResult(
        name=NAME,
        title="10 branches on one batch: one trunk pass + 10 heads vs PEFT 10 LoRA adapters (10 passes)",
        rows=rows,
        measurements=dict(res),
        details={
            "texts": n_texts,
            "source": "data/sms_spam.csv column text, first rows",
            "padded_batch_shape": list(tokens),
            "real_tokens": int(batch["attention_mask"].sum()),
            "attn_implementation": attn,
            "peft_lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
            "head": "linear on mean-pooled last hidden state (same as our linear head on pooled output)",
            "speedup": speedup,
            "limit": limit,
            "efficiency": efficiency,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
        },
        notes=[
            f"torch threads = {threads}; batch of {n_texts} real SMS texts"
            + (" (quick mode: 16 instead of 64)" if quick else ""),
            "branch banks loaded before timing (lazy loading is measured by the cold benchmark)",
        ],
    )

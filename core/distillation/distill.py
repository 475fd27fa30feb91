"""``scaler distill``: train the model's trunk to reproduce its teachers' cached features.

The student is the model's MoE trunk over its frozen base (whose states come from the
base-state cache, so the base runs at most once per text). Each teacher gets an adapter (the
trunk's pooled representation -> the teacher's features at each of its recorded layers) and a
router (a gating plugin over the teachers) weights the teachers per example. The loss is the
router-weighted feature loss (MSE or 1 - cosine; each teacher's scaled by its batch mean, and
each adapter trained on every row), a balance term on the router's mean probabilities
(``balance_weight``), plus the trunk's MoE aux loss and the gating's own balance loss, each
weighted (``distill_module.DistillModule.forward``). Teachers given with ``--freeze-teachers``
take part (predict, are routed) but keep their adapters: their adapter banks are carried byte for
byte.

Logged like ``scaler train`` (``metrics.jsonl``, TensorBoard when installed): per step the
per-teacher loss and router weight (mean and a 10-bin histogram); a ``router-collapse`` warning
when one teacher holds more than ``collapse_threshold`` of the router weight over a whole
window; the held-out feature loss (``eval_split`` of the texts) before and after. Checkpoints are
``training.checkpoint``'s (safetensors), and the steps draw their rows from a generator seeded by
the step number, so ``--resume`` continues exactly where the killed run stopped.

The new version is made by the one builder (``versions.builder.new_version``; ``with_trunk``
takes no teachers): the new trunk banks, and for each teacher of the run an ``adapter`` record
(its bank, the trunk, the loss and the router record: plugin, config, bank, teacher order).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.caches.base_states import cached_states
from scaler_wizard.distillation.distill_branches import (
    BranchTasks,
    branch_batch,
    branch_lower,
    branch_records,
    evaluate_branches,
    load_branch_tasks,
)
from scaler_wizard.distillation.distill_module import (
    DistillModule,
    ExplainedVariance,
    TeacherAdapter,
    build_router,
)
from scaler_wizard.distillation.distill_plan import (
    RESULT_FILE,
    DistillConfig,
    DistillPlan,
    check_plan,
    held_out_split,
    load_features,
    new_run_dir,
    read_plan,
    start_manifest,
    write_plan,
)
from scaler_wizard.distillation.distill_save import load_adapter, load_router, save_distilled
from scaler_wizard.errors import DistillError, ScalerError
from scaler_wizard.modeling.compose import compose, trunk_id
from scaler_wizard.training.branch_fit import check_finite_weights, finite_loss
from scaler_wizard.training.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from scaler_wizard.training.config import BranchSpec
from scaler_wizard.training.events import TrainEvents
from scaler_wizard.training.monitor import MetricsLog
from scaler_wizard.training.multitask import base_digest
from scaler_wizard.training.sampler import derived_seed
from scaler_wizard.training.schedule import warmup_linear_schedule

HIST_BINS = 10


@dataclass
class DistillResult:
    run_dir: Path
    model: str
    manifest: str
    version: int
    steps: int
    seconds: float
    teachers: dict[str, dict[str, Any]]
    eval_before: dict[str, Any]
    eval_after: dict[str, Any]
    warnings: list[dict[str, Any]]
    trunk: dict[str, Any]
    resumed_from: int | None
    branches: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out


def start_distill(
    store: ContentStore, model: str, config: DistillConfig, *, run_dir: Path | None = None
) -> Path:
    """Check the request against the model's head and write the run's plan; its folder."""
    head, manifest = start_manifest(store, model)
    plan = DistillPlan(model=model, start_manifest=head, config=config)
    check_plan(manifest, plan)
    target = run_dir or new_run_dir(store, model)
    write_plan(target, plan)
    return target.resolve()


def distill_run(
    store: ContentStore,
    run_dir: Path,
    *,
    events: TrainEvents | None = None,
    resume: bool = False,
    device: str = "cpu",
) -> DistillResult:
    """Run (or continue) the distillation of ``run_dir/run.json``; save the new version."""
    run = DistillRun(store, run_dir, events or TrainEvents(), resume=resume, device=device)
    run.prepare()
    try:
        run.train()
    finally:
        run.log.close()
    return run.save()


class DistillRun:
    def __init__(
        self, store: ContentStore, run_dir: Path, events: TrainEvents, *, resume: bool, device: str
    ) -> None:
        self.store, self.run_dir, self.ev, self.resume = store, run_dir, events, resume
        self.device = torch.device(device)
        self.plan: DistillPlan = read_plan(run_dir)
        self.cfg: DistillConfig = self.plan.config
        self.started = time.perf_counter()
        self.step = 0
        self.resumed_from: int | None = None
        self.warnings: list[dict[str, Any]] = []
        self.recent: deque[list[float]] = deque(maxlen=self.cfg.collapse_window)
        self.collapsed: str | None = None
        self.train_seconds = 0.0
        self.eval_before: dict[str, Any] = {}
        self.eval_after: dict[str, Any] = {}
        self.tasks: BranchTasks | None = None
        self.branch_final: dict[str, dict[str, Any]] = {}

    # -- 1. model, data, module, optimizer (and the checkpoint's state when resuming) ---------
    def prepare(self) -> None:
        cfg, plan, store = self.cfg, self.plan, self.store
        head = store.get_ref(plan.model)
        if head is None or str(head) != plan.start_manifest:
            raise DistillError(
                f"model {plan.model!r} moved on since this run started from {plan.start_manifest[:19]}…: "
                "start a new distillation",
                model=plan.model,
            )
        self.manifest = store.manifest(plan.start_manifest)
        self.entries = check_plan(self.manifest, plan)
        self.texts, self.features = load_features(store, self.entries)
        self.train_rows, self.eval_rows = held_out_split(len(self.texts), cfg.eval_split, cfg.seed)
        self.model = compose(store, plan.model, device=self.device)
        assert self.model.origin is not None
        self.old_trunk = trunk_id(self.manifest)
        self.digest_before, trainable = base_digest(self.model.base)
        if trainable:
            raise ScalerError(f"the base encoder has {trainable} trainable parameters: it must be frozen")
        specs = [BranchSpec.from_json(b) for b in cfg.branches]
        lower = branch_lower(self.model, specs)
        tick = self.ev.phase("base states", len(self.texts))
        self.states, hit = cached_states(
            store,
            self.model.base,
            self.model.origin.base_entry,
            self.texts,
            float16=cfg.cache_float16,
            device=self.device,
            progress=tick,
            lower=lower,
        )
        if hit:
            self.ev.message("base states from cache")
        self.tasks = load_branch_tasks(
            store,
            self.model,
            specs,
            seed=cfg.seed,
            float16=cfg.cache_float16,
            device=self.device,
            phase=self.ev.phase,
        )
        self.ev.message(
            f"{len(self.texts)} texts: {len(self.train_rows)} train / {len(self.eval_rows)} held out; "
            f"teachers {', '.join(cfg.teachers)}"
            + (f" (frozen: {', '.join(cfg.frozen)})" if cfg.frozen else "")
        )
        self._build_module()
        self._load_checkpoint()
        self.log = MetricsLog(
            self.run_dir, resume_step=(self.step if self.resumed_from else -1) if self.resume else None
        )

    def _build_module(self) -> None:
        cfg, store = self.cfg, self.store
        torch.manual_seed(derived_seed(cfg.seed, "distill-init"))
        d = self.model.trunk_hidden_size()
        adapters: dict[str, TeacherAdapter] = {}
        for name in cfg.order:
            entry = self.entries[name]
            adapter = TeacherAdapter(d, {f.layer: f.dim for f in entry.features})
            if entry.adapter is not None:
                load_adapter(store, adapter, entry.adapter.bank, name=name)
            elif name in cfg.frozen:  # (check_plan refuses this; kept as an assertion of intent)
                raise DistillError(f"teacher {name!r} has no adapter to keep frozen", teacher=name)
            adapters[name] = adapter
        router, self.router_ref = build_router(
            cfg.router, cfg.router_config, hidden_size=d, teachers=cfg.order
        )
        load_router(store, router, self.entries, cfg.order, self.router_ref)
        self.module = DistillModule(self.model.trunk, adapters, router, cfg.order, cfg.loss).to(self.device)
        # What a checkpoint holds: the distillation module and the branches trained along.
        self.everything = torch.nn.ModuleDict({"distill": self.module})
        if self.tasks is not None:
            self.tasks.module.to(self.device)
            self.everything["branches"] = self.tasks.module.branches
        for p in self.model.trunk.parameters():
            p.requires_grad_(not cfg.freeze_trunk)
        for name in cfg.frozen:
            for p in self.module.adapters[name].parameters():
                p.requires_grad_(False)
        self.frozen_before = {n: _state_bytes(self.module.adapters[n]) for n in cfg.frozen}
        groups = []
        if not cfg.freeze_trunk:
            groups.append(
                {"params": list(self.model.trunk.parameters()), "lr": cfg.lr_trunk, "name": "trunk"}
            )
        heads = [p for n in cfg.teachers for p in self.module.adapters[n].parameters()]
        groups.append({"params": heads + list(router.parameters()), "lr": cfg.lr, "name": "adapters"})
        if self.tasks is not None:
            branch_params = list(self.tasks.module.branches.parameters())
            for p in branch_params:
                p.requires_grad_(True)
            groups.append({"params": branch_params, "lr": cfg.lr_branches, "name": "branches"})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.scheduler = warmup_linear_schedule(self.optimizer, cfg.warmup, cfg.steps)

    def _load_checkpoint(self) -> None:
        if not self.resume:
            return
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            self.ev.message("no checkpoint yet: starting from step 0")
            return
        ckpt = load_checkpoint(path)
        self.everything.load_state_dict(ckpt.model, strict=True)
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        restore_rng(ckpt.rng["tensors"], ckpt.rng["meta"])
        self.step = self.resumed_from = ckpt.step
        self.train_seconds = float(ckpt.state.get("train_seconds", 0.0))
        self.recent.extend(ckpt.state.get("recent", []))
        self.collapsed = ckpt.state.get("collapsed")
        self.warnings = list(ckpt.state.get("warnings", []))
        self.eval_before = dict(ckpt.state.get("eval_before") or {})
        self.ev.message(f"resuming from checkpoint {path.name} (step {self.step} of {self.cfg.steps})")

    # -- 2. steps, evals, checkpoints ---------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        if self.step == 0:
            self.eval_before = self.evaluate(0)
        self.ev.start(cfg.steps, self.step)
        while self.step < cfg.steps:
            self.step += 1
            t0 = time.perf_counter()
            record = self._train_step()
            seconds = time.perf_counter() - t0
            self.train_seconds += seconds
            record["seconds"] = round(seconds, 6)
            self.log.write(record)
            self.ev.step(record)
            self._collapse_check(record)
            if self.step % cfg.checkpoint_interval == 0 or self.step == cfg.steps:
                self._checkpoint()
        self.eval_after = self.evaluate(cfg.steps)

    def _batch(
        self, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[int, torch.Tensor]]]:
        states, mask = self.states.batch(rows)
        idx = torch.tensor(rows, dtype=torch.long)
        targets = {
            n: {layer: f.index_select(0, idx).to(self.device) for layer, f in fs.items()}
            for n, fs in self.features.items()
        }
        return states.to(self.device), mask.to(self.device), targets

    def _train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        # The step's rows and noise are drawn from its own seed: a resumed run draws what the
        # uninterrupted one drew.
        g = torch.Generator().manual_seed(derived_seed(cfg.seed, "distill-step", self.step))
        pick = torch.randperm(len(self.train_rows), generator=g)[: cfg.batch_size].tolist()
        torch.manual_seed(derived_seed(cfg.seed, "distill-noise", self.step))
        self.module.train()
        states, mask, targets = self._batch([self.train_rows[i] for i in pick])
        out = self.module(states, mask, targets)
        loss = (
            out["objective"]
            + cfg.balance_weight * out["balance"]
            + cfg.aux_loss_weight * out["aux"]
            + cfg.router_aux_weight * out["router_aux"]
        )
        task_loss = None
        if self.tasks is not None:
            self.tasks.module.train()
            b = branch_batch(self.tasks, seed=cfg.seed, step=self.step, batch_size=cfg.batch_size)
            tout = self.tasks.module(
                b["states"].to(self.device), b["mask"].to(self.device), b["branch"], b["target"]
            )
            task_loss = tout["loss"]
            loss = loss + cfg.task_weight * task_loss + cfg.aux_loss_weight * tout["aux"]
        loss.backward()
        params = [p for g_ in self.optimizer.param_groups for p in g_["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        lrs = {g_["name"]: g_["lr"] for g_ in self.optimizer.param_groups}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        finite_loss(float(loss.detach()), self.step)
        return {
            "event": "train",
            "step": self.step,
            "loss": float(loss.detach()),
            "feature_loss": float(out["feature"].detach()),
            "aux_loss": float(out["aux"].detach()),
            "router_aux": float(out["router_aux"].detach()),
            "router_balance": float(out["balance"].detach()),
            **({} if task_loss is None else {"task_loss": float(task_loss.detach())}),
            "grad_norm": grad_norm,
            "lr": lrs,
            **_teacher_stats(self.cfg.order, out["per_teacher"], out["weights"]),
        }

    def _collapse_check(self, record: dict[str, Any]) -> None:
        """A warning when one teacher held > threshold of the router weight over a whole window."""
        order = self.cfg.order
        if len(order) < 2:
            return
        self.recent.append([record["router_weight"][n] for n in order])
        if len(self.recent) < self.recent.maxlen:  # type: ignore[operator]
            return
        shares = torch.tensor(list(self.recent)).mean(0)
        share = shares / shares.sum().clamp(min=1e-12)
        top = int(share.argmax())
        if float(share[top]) > self.cfg.collapse_threshold:
            if self.collapsed != order[top]:
                self.collapsed = order[top]
                warning = {
                    "event": "warning",
                    "check": "router-collapse",
                    "step": self.step,
                    "teacher": order[top],
                    "share": round(float(share[top]), 4),
                    "message": f"router collapse: teacher {order[top]} got {float(share[top]):.1%} of the router "
                    f"weight over the last {len(self.recent)} steps (the others learn nothing from those rows)",
                }
                self.warnings.append(warning)
                self.log.write(warning)
                self.ev.warning(warning)
        else:
            self.collapsed = None

    @torch.no_grad()
    def evaluate(self, at: int) -> dict[str, Any]:
        """Held-out feature loss: per teacher (unweighted), and router-weighted; router weights."""
        self.module.eval()
        per, weights, fit = [], [], ExplainedVariance()
        rows = self.eval_rows
        for lo in range(0, len(rows), 64):
            states, mask, targets = self._batch(rows[lo : lo + 64])
            out = self.module(states, mask, targets)
            fit.add(out["preds"], targets)
            per.append(out["per_teacher"])
            weights.append(out["weights"])
        p, w = torch.cat(per), torch.cat(weights)
        stats = _teacher_stats(self.cfg.order, p, w)
        record = {
            "event": "eval",
            "step": at,
            "rows": len(rows),
            "feature_loss": float(p.mean()),
            "weighted_loss": float((p * w).sum(1).mean()),
            "explained": fit.result(),
            **stats,
        }
        if self.tasks is not None:
            self.branch_final = evaluate_branches(self.tasks, self.model, self.device)
            record["branches"] = {
                n: {"accuracy": m["accuracy"], "loss": m["loss"]} for n, m in self.branch_final.items()
            }
        self.log.write(record)
        self.ev.evaluated(record)
        return record

    def _checkpoint(self) -> None:
        path = save_checkpoint(
            self.run_dir / "checkpoints",
            step=self.step,
            model=self.everything.state_dict(),
            optimizer=self.optimizer.state_dict(),
            state={
                "scheduler": self.scheduler.state_dict(),
                "train_seconds": self.train_seconds,
                "recent": list(self.recent),
                "collapsed": self.collapsed,
                "warnings": self.warnings,
                "eval_before": self.eval_before,
            },
            keep=self.cfg.keep_checkpoints,
        )
        self.log.write({"event": "checkpoint", "step": self.step, "path": str(path)})
        self.ev.checkpoint(self.step, path)

    # -- 3. checks, then the new version ------------------------------------------------------
    def save(self) -> DistillResult:
        cfg, plan = self.cfg, self.plan
        digest_after, trainable = base_digest(self.model.base)
        if digest_after != self.digest_before or trainable:
            raise ScalerError(
                "the base encoder's weights changed during distillation: refusing to save (a bug)"
            )
        check_finite_weights(self.everything, "the distilled model")
        for name, before in self.frozen_before.items():
            if _state_bytes(self.module.adapters[name]) != before:
                raise ScalerError(f"frozen teacher {name!r}'s adapter changed during distillation (a bug)")
        self.module.eval()
        provenance = {
            "run": self.run_dir.name,
            "start_manifest": plan.start_manifest,
            "steps": cfg.steps,
            "seed": cfg.seed,
            "teachers": cfg.order,
            "frozen": cfg.frozen,
            "eval_loss_before": self.eval_before["per_teacher_loss"],
            "eval_loss_after": self.eval_after["per_teacher_loss"],
        }
        records = {}
        if self.tasks is not None:
            self.model.eval()
            run = {"command": "scaler distill", **provenance}
            records = branch_records(self.tasks, self.model, self.branch_final, run)
        saved = save_distilled(
            self.store,
            plan,
            self.manifest,
            self.module,
            self.router_ref,
            base_entry=self.manifest.base,
            provenance=provenance,
            branches={n: self.model.branch(n) for n in records},
            records=records,
        )
        result = DistillResult(
            run_dir=self.run_dir,
            model=plan.model,
            manifest=saved[0],
            version=saved[1].version,
            steps=cfg.steps,
            seconds=time.perf_counter() - self.started,
            teachers={
                n: {
                    "frozen": n in cfg.frozen,
                    "adapter": saved[1].teachers[n].adapter.bank,  # type: ignore[union-attr]
                    "eval_loss_before": self.eval_before["per_teacher_loss"][n],
                    "eval_loss_after": self.eval_after["per_teacher_loss"][n],
                    "explained_before": self.eval_before.get("explained", {}).get(n),
                    "explained_after": self.eval_after.get("explained", {}).get(n),
                    "router_weight": self.eval_after["router_weight"][n],
                }
                for n in cfg.order
            },
            eval_before=self.eval_before,
            eval_after=self.eval_after,
            warnings=self.warnings,
            trunk={"old": self.old_trunk, "new": trunk_id(saved[1]), "frozen": cfg.freeze_trunk},
            resumed_from=self.resumed_from,
            branches={
                n: b.get("branches", {})
                for n, b in (("before", self.eval_before), ("after", self.eval_after))
            },
        )
        atomic_write_bytes(self.run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=2).encode())
        return result


def _teacher_stats(order: list[str], per: torch.Tensor, weights: torch.Tensor) -> dict[str, Any]:
    """Per-teacher mean loss, mean router weight and a histogram of the weights (10 bins on [0, 1])."""

    def hist(w: torch.Tensor) -> list[int]:
        counts: list[int] = torch.histc(w.float(), bins=HIST_BINS, min=0.0, max=1.0).int().tolist()
        return counts

    return {
        "per_teacher_loss": {n: float(per[:, i].mean()) for i, n in enumerate(order)},
        "router_weight": {n: float(weights[:, i].mean()) for i, n in enumerate(order)},
        "router_hist": {n: hist(weights[:, i]) for i, n in enumerate(order)},
    }


def _state_bytes(module: torch.nn.Module) -> bytes:
    return b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in module.state_dict().values())


__all__ = ["DistillConfig", "DistillResult", "DistillRun", "distill_run", "start_distill"]

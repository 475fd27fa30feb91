"""``scaler train``: multi-task training of the MoE trunk, gating, adapters and heads.

The base stays frozen (checked: no base parameter requires grad, and its bytes hash the same
after the run as before). Every batch mixes all the run's branches (temperature sampling,
``mixed_sampler``); the loss is the mean over the batch's examples of each example's own
branch loss, plus ``aux_loss_weight`` times the summed load-balancing losses of the MoE
layers. Runs on Hugging Face ``accelerate``: one process, or many under ``accelerate launch``
(gloo on CPU, NCCL on GPUs). Only the main process writes the run folder, the caches' files
it owns, the banks and the manifest.

**Stale branches.** Training the trunk changes every branch's outputs. A branch the run does
not train would silently start answering differently, so the run is refused while such
branches exist, unless ``allow_stale_branches``: then their banks are kept as they were, their
``trunk`` field keeps the trunk they were trained on (so it no longer matches the model's), and
their ``provenance.stale`` says which version and run left them behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from scaler_wizard.banks import ContentStore
from scaler_wizard.banks.atomic import atomic_write_bytes
from scaler_wizard.branch import Branch, shared_base_layers
from scaler_wizard.caches.base_states import TokenStates, cached_states
from scaler_wizard.errors import ScalerError
from scaler_wizard.manifests.facts import mark_stale
from scaler_wizard.modeling.compose import compose, save_version, trunk_id
from scaler_wizard.modeling.fingerprint import fingerprint_of, probe_logits
from scaler_wizard.modeling.model import ScalerModel
from scaler_wizard.training.base_layers import BaseBlocks, base_entry_after, inserted_layers
from scaler_wizard.training.batches import BranchData, Collate, MixedDataset, load_branch_data
from scaler_wizard.training.branch_fit import check_finite_weights, finite_loss
from scaler_wizard.training.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from scaler_wizard.training.config import BranchSpec, TrainConfig, TrainConfigError
from scaler_wizard.training.distributed import make_accelerator, peak_memory_mb, reduce_step, start_run
from scaler_wizard.training.evaluate import evaluate
from scaler_wizard.training.events import TrainEvents
from scaler_wizard.training.finish import check_head, plan_digest
from scaler_wizard.training.monitor import MetricsLog, QualityChecks
from scaler_wizard.training.multitask import MultiTaskModule, base_digest, base_states, parameter_groups
from scaler_wizard.training.plan import (
    RUN_FILE,
    RunPlan,
    check_data_unchanged,
    plan_run,
    read_plan,
)
from scaler_wizard.training.preflight import branch_for_run
from scaler_wizard.training.provenance import stale_record, train_run_record, trained_record
from scaler_wizard.training.records import eval_record, start_record, step_record
from scaler_wizard.training.result import (
    RESULT_FILE,
    TrainResult,
    branch_summary,
    first_eval,
    last_window,
    read_result,
)
from scaler_wizard.training.sampler import MixedBatchSampler, derived_seed, sampling_probabilities
from scaler_wizard.training.schedule import warmup_linear_schedule
from scaler_wizard.versions.history import next_version


def train_run(
    store: ContentStore,
    run_dir: Path,
    *,
    accelerator: Any = None,
    events: TrainEvents | None = None,
    resume: bool = False,
) -> TrainResult:
    """Run (or continue) the training described by ``run_dir/run.json``; save the new version.

    ``evaluate`` and ``atomic_write_bytes`` are looked up in this module when called (tests
    replace them here to poison a weight or to kill the run before ``result.json``)."""
    run = TrainRun(store, run_dir, accelerator or make_accelerator(), events, resume=resume)
    run.check_inputs()
    run.build_model()
    run.load_base_states()
    run.prepare()
    run.train()
    run.check_weights()
    if not run.main:
        return run.worker_result()
    manifest = run.save_new_version()
    result = run.result(manifest)
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(result.to_json(), indent=2).encode())
    return result


class TrainRun:
    """One process's part of a run, step by step (``train_run`` calls them in order)."""

    def __init__(
        self, store: ContentStore, run_dir: Path, acc: Any, events: TrainEvents | None, *, resume: bool
    ) -> None:
        self.store, self.run_dir, self.acc, self.resume = store, run_dir, acc, resume
        self.main: bool = acc.is_main_process
        self.ev = events if (events is not None and self.main) else TrainEvents()
        self.plan: RunPlan = read_plan(run_dir)
        self.cfg: TrainConfig = self.plan.config
        self.started = time.perf_counter()
        self.parts: list[BranchData] = []
        self.branches: dict[str, Branch] = {}
        self.ckpt: Checkpoint | None = None
        self.log: MetricsLog | None = None
        self.totals = {"tokens": 0.0, "train_seconds": 0.0}
        self.step = 0
        self.final: dict[str, dict[str, Any]] = {}

    # 1. Checks that need no model: data unchanged, the model not moved on since the start.
    def check_inputs(self) -> None:
        check_data_unchanged(self.plan)
        self.digest = plan_digest(self.run_dir / RUN_FILE)
        self.head, self.saved = check_head(self.store, self.plan, self.digest, resume=self.resume)

    # 2. The model: composed from the run's starting version; new branches built (seeded).
    def build_model(self) -> None:
        self.model: ScalerModel = compose(self.store, self.plan.start_manifest, device=self.acc.device)
        assert self.model.origin is not None
        self.old_trunk = trunk_id(self.model.origin.manifest)
        self.base = self.model.base
        torch.manual_seed(derived_seed(self.cfg.seed, "init"))
        for spec in self.plan.branches:
            self._add_branch(spec)
        self.model.to(self.acc.device)
        self.blocks: BaseBlocks | None = None
        self.trained_names: frozenset[str] = frozenset()
        if self.cfg.train_base_layers:
            entry = self.model.origin.manifest.base
            self.blocks = BaseBlocks(self.base, inserted_layers(entry, self.plan.model), self.lower)
            self.blocks.check(self.parts[0].train.texts[:8])
            self.trained_names = self.blocks.trained_names()
            self.ev.message(f"base blocks {self.blocks.inserted} train too (lr {self.cfg.lr_base_layers:g})")
        self.digest_before, trainable_in_base = base_digest(self.base, self.trained_names)
        if trainable_in_base:
            raise ScalerError(
                f"the base encoder has {trainable_in_base} trainable parameters: it must be frozen"
            )
        self.probs = sampling_probabilities([len(p.train) for p in self.parts], self.cfg.temperature)
        for p, prob in zip(self.parts, self.probs, strict=True):
            self.ev.message(
                f"{p.name}: {len(p.train)} train / {len(p.eval)} eval rows, {len(p.labels)} classes, "
                f"{'new' if p.name in self.plan.new else 'continued'}, sampled with p={prob:.3f}"
            )

    def _add_branch(self, spec: BranchSpec) -> None:
        """The branch's data, and the branch: the model's own, or a new one (added to it)."""
        existing = spec.name not in self.plan.new
        labels = list(self.model.branch(spec.name).labels) if existing else None
        part = load_branch_data(spec, labels, self.cfg)
        branch = branch_for_run(self.model, spec, part.labels, existing=existing)
        if not existing:
            self.model.add_branch(spec.name, branch)
        self.branches[spec.name] = branch
        self.parts.append(part)

    @property
    def lower(self) -> int:
        """Base layers below the last the states carry: those the run's branches read, or with
        trained base blocks as many as hold the lowest one's input."""
        blocks = getattr(self, "blocks", None)
        return blocks.lower if blocks is not None else shared_base_layers(self.branches.values())

    # 3. Base states: computed once (local main process first), then read from the cache file.
    def load_base_states(self) -> None:
        if not self.cfg.base_cache:
            return
        acc = self.acc
        assert self.model.origin is not None
        for p in self.parts:
            texts = p.train.texts + p.eval.texts
            with acc.local_main_process_first():
                tick = self.ev.phase(f"base states: {p.name}", len(texts))
                states, hit = cached_states(
                    self.store,
                    self.base,
                    self.model.origin.base_entry,
                    texts,
                    float16=self.cfg.cache_float16,
                    write=acc.is_local_main_process,
                    device=acc.device,
                    progress=tick,
                    lower=self.lower,
                )
            n = len(p.train)
            p.train_states = TokenStates(states.flat, states.offsets[: n + 1])
            p.eval_states = TokenStates(states.flat, states.offsets[n:])
            if hit:
                self.ev.message(f"{p.name}: base states from cache")

    # 4. Module, optimizer, schedule, data (and, resuming, the checkpoint's state of each).
    def prepare(self) -> None:
        cfg, acc = self.cfg, self.acc
        order = [p.name for p in self.parts]
        self.module = MultiTaskModule(self.model.trunk, self.branches, order, self.blocks)
        self.module.train()
        self.optimizer = torch.optim.AdamW(parameter_groups(self.module, cfg), weight_decay=cfg.weight_decay)
        self.scheduler = warmup_linear_schedule(self.optimizer, cfg.warmup, cfg.steps)
        self.checkpoints = self.run_dir / "checkpoints"
        self._load_checkpoint()
        sizes = [len(p.train) for p in self.parts]
        self.sampler = MixedBatchSampler(
            sizes,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            seed=cfg.seed,
            total_steps=cfg.steps,
            state=self.ckpt.state["sampler"] if self.ckpt else None,
        )
        loader = torch.utils.data.DataLoader(
            MixedDataset(sizes),
            batch_sampler=self.sampler,
            collate_fn=Collate(self.parts, self.base, cached=cfg.base_cache),
        )
        if cfg.batch_size % acc.num_processes:
            raise TrainConfigError(
                f"batch size {cfg.batch_size} does not split evenly across {acc.num_processes} processes"
            )
        self.wrapped, self.optimizer, self.loader = acc.prepare(self.module, self.optimizer, loader)
        self.group_names = [g["name"] for g in self.optimizer.param_groups]
        self.checks = QualityChecks(cfg, num_layers=len(self.model.trunk.layers))
        if self.ckpt is not None:
            self._restore_state(self.ckpt)
        # A resumed run drops what the killed one logged after its last checkpoint (all of it if none).
        if self.main:
            resume_step = (self.step if self.ckpt else -1) if self.resume else None
            self.log = MetricsLog(self.run_dir, resume_step=resume_step)

    def _load_checkpoint(self) -> None:
        if self.resume:
            path = latest_checkpoint(self.checkpoints)
            if path is None:
                self.ev.message("no checkpoint yet: starting from step 0")
            else:
                self.ckpt = load_checkpoint(path)
                self.module.load_state_dict(self.ckpt.model, strict=True)
        if self.saved is not None and (self.ckpt is None or self.ckpt.step < self.cfg.steps):
            raise ScalerError(
                f"model {self.plan.model!r} moved to {self.head} but this run has no final checkpoint"
            )

    def _restore_state(self, ckpt: Checkpoint) -> None:
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.state["scheduler"])
        self.checks.load_json(ckpt.state["monitor"])
        self.totals = dict(ckpt.state["totals"])
        restore_rng(ckpt.rng["tensors"], ckpt.rng["meta"])
        self.step = ckpt.step
        self.ev.message(f"resuming from checkpoint {ckpt.path.name} (step {self.step} of {self.cfg.steps})")

    # 5. The steps, with evals and checkpoints; then the final eval and checkpoint.
    def train(self) -> None:
        try:
            if self.step == 0 and self.main:
                rows = {p.name: len(p.train) for p in self.parts}
                self._write(start_record(rows, self.probs, self.acc.num_processes))
                self.evaluate_at(0)
            self.ev.start(self.cfg.steps, self.step)
            self._steps()
            finished_before = self.ckpt is not None and self.ckpt.step >= self.cfg.steps
            if self.main:
                # Logged before the final checkpoint, so a run killed after that checkpoint has it.
                if finished_before:
                    self.final = evaluate(self.module, self.parts, self.base, self.acc.device)
                else:
                    self.final = self.evaluate_at(self.cfg.steps)
            if not finished_before:
                self.checkpoint_at(self.cfg.steps)
        finally:
            if self.log is not None:
                self.log.close()

    def _steps(self) -> None:
        cfg = self.cfg
        tick_start = time.perf_counter()
        for batch in self.loader:
            self.step += 1
            stats = self._train_step(batch)
            seconds = time.perf_counter() - tick_start
            self.totals["tokens"] += stats["tokens"]
            self.totals["train_seconds"] += seconds
            if self.main:
                self._log_step(stats, seconds)
                if self.step % cfg.eval_interval == 0 and self.step < cfg.steps:
                    self.evaluate_at(self.step)
            # Every process takes part (the checkpoint ends with a barrier).
            if self.step % cfg.checkpoint_interval == 0 and self.step < cfg.steps:
                self.checkpoint_at(self.step)
            if self.step >= cfg.steps:
                break
            tick_start = time.perf_counter()  # eval and checkpoint time is not step time

    def _train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One optimizer step on this process's share of the batch; the values every process
        agrees on (reduced across processes)."""
        cfg, acc = self.cfg, self.acc
        # Noise and dropout are seeded per step (and process): a resumed run draws exactly
        # what the uninterrupted one drew, whatever happened before.
        torch.manual_seed(derived_seed(cfg.seed, "step", self.step, acc.process_index))
        states, mask = self._states(batch)
        out = self.wrapped(states, mask, batch["branch"], batch["target"])
        loss = out["loss"] + cfg.aux_loss_weight * out["aux"]
        acc.backward(loss)
        grad_norm = float(acc.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip))
        lrs = {name: g["lr"] for name, g in zip(self.group_names, self.optimizer.param_groups, strict=True)}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = reduce_step(acc, out, loss, batch["branch"])
        finite_loss(stats["loss"], self.step)  # every process sees the same reduced value
        return {"grad_norm": grad_norm, "lr": lrs, **stats}

    def _states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's base states and mask: cached ones, or the frozen base run on its tokens."""
        if "states" in batch:
            return batch["states"], batch["mask"]
        tokens = {k: v for k, v in batch.items() if k not in ("branch", "target")}
        return base_states(self.base, tokens, self.lower), batch["attention_mask"].bool()

    def _log_step(self, stats: dict[str, Any], seconds: float) -> None:
        """The step's record, and the quality checks on it."""
        names = [p.name for p in self.parts]
        record = step_record(self.step, stats, seconds, names, peak_memory_mb(self.acc.device))
        self._write(record)
        self.ev.step(record)
        grad_norm, aux_loss, load_counts = stats["grad_norm"], stats["aux_loss"], stats["load_counts"]
        self._warn(
            self.checks.after_step(self.step, grad_norm=grad_norm, aux_loss=aux_loss, load_counts=load_counts)
        )

    def _write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)

    def _warn(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self._write(r)
            self.ev.warning(r)

    def evaluate_at(self, at: int) -> dict[str, dict[str, Any]]:
        """Evaluate every branch, log it and run the checks on it (main process)."""
        results = evaluate(self.acc.unwrap_model(self.wrapped), self.parts, self.base, self.acc.device)
        record = eval_record(at, results)
        self._write(record)
        self.ev.evaluated(record)
        self._warn(self.checks.after_eval(at, {n: m["accuracy"] for n, m in results.items()}))
        return results

    def checkpoint_at(self, at: int) -> None:
        """The main process saves a checkpoint; every process waits for it."""
        if self.main:
            path = save_checkpoint(
                self.checkpoints,
                step=at,
                model=self.acc.unwrap_model(self.wrapped).state_dict(),
                optimizer=self.optimizer.state_dict(),
                state={
                    "sampler": self.sampler.state_after(at),
                    "scheduler": self.scheduler.state_dict(),  # lr_lambdas: None for plain functions
                    "monitor": self.checks.to_json(),
                    "totals": self.totals,
                },
                keep=self.cfg.keep_checkpoints,
            )
            self._write({"event": "checkpoint", "step": at, "path": str(path)})
            self.ev.checkpoint(at, path)
        self.acc.wait_for_everyone()

    # 6. Nothing is saved unless the base is unchanged and every trained weight is finite.
    def check_weights(self) -> None:
        digest_after, trainable_after = base_digest(self.base, self.trained_names)
        if digest_after != self.digest_before or trainable_after:
            raise ScalerError("the base encoder's weights changed during training: refusing to save (a bug)")
        check_finite_weights(self.module, "the trained model")

    def worker_result(self) -> TrainResult:
        """What a process other than the main one returns (it saves nothing)."""
        plan = self.plan
        seconds = time.perf_counter() - self.started
        return TrainResult(
            self.run_dir, plan.model, None, None, self.cfg.steps, seconds, {}, {}, [], plan.stale
        )

    # 7. The new version: trained trunk banks + branches, with provenance and metrics.
    def save_new_version(self) -> str:
        plan, cfg, model = self.plan, self.cfg, self.model
        assert model.origin is not None
        model.eval()
        record = train_run_record(
            run=self.run_dir.name,
            start_manifest=plan.start_manifest,
            plan_sha256=self.digest,
            config=cfg.to_json(),
            steps=cfg.steps,
            seed=cfg.seed,
            processes=self.acc.num_processes,
            data={p.name: p.full.source["sha256"] for p in self.parts},
            seconds=self.totals["train_seconds"],
            tokens=self.totals["tokens"],
        )
        fps = probe_logits(model, [p.name for p in self.parts])
        trained = {
            p.name: trained_record(p, self.final[p.name], record, fingerprint_of(fps[p.name]))
            for p in self.parts
        }
        new_version = next_version(self.store, plan.model, plan.start_version)  # unique after a rollback
        left = model.origin.manifest.branches
        stale = {
            name: mark_stale(
                left[name],
                stale_record(
                    since_version=new_version,
                    run=self.run_dir.name,
                    trained_on_trunk=left[name].trunk or self.old_trunk,
                ),
            )
            for name in plan.stale
        }
        names = ", ".join(p.name for p in self.parts)
        message = f"train trunk with {names}: {cfg.steps} steps, seed {cfg.seed} (run {self.run_dir.name})"
        if plan.stale:
            message += f"; stale: {', '.join(plan.stale)}"
        if self.saved is not None:
            return self.saved
        base = None
        if self.blocks is not None:
            message += f"; base blocks {', '.join(map(str, self.blocks.inserted))} trained"
            base = base_entry_after(self.store, model.origin.manifest.base, self.base)
        saved = save_version(
            self.store, model, message=message, records=trained, entries=stale, base_entry=base
        )
        return str(saved)

    def result(self, manifest: str) -> TrainResult:
        """The run's summary, for ``result.json`` and the CLI's table."""
        plan, totals = self.plan, self.totals
        first = first_eval(self.run_dir)
        windows = last_window(self.run_dir, self.cfg.check_window)
        saved = self.store.manifest(manifest)
        return TrainResult(
            run_dir=self.run_dir,
            model=plan.model,
            manifest=str(manifest),
            version=saved.version,
            steps=self.cfg.steps,
            seconds=time.perf_counter() - self.started,
            branches={
                p.name: branch_summary(
                    self.final[p.name], windows, first, name=p.name, new=p.name in plan.new
                )
                for p in self.parts
            },
            trunk={
                "old": self.old_trunk,
                "new": trunk_id(saved),
                "aux_loss": windows["aux_loss"],
                "expert_load": windows["expert_load"],
                "tokens_per_s": totals["tokens"] / totals["train_seconds"]
                if totals["train_seconds"]
                else 0.0,
                "peak_memory_mb": peak_memory_mb(self.acc.device),
                "processes": self.acc.num_processes,
                "base_unchanged": self.blocks is None,
                "base_layers_trained": [] if self.blocks is None else self.blocks.inserted,
            },
            warnings=self.checks.warnings,
            stale=plan.stale,
            resumed_from=self.ckpt.step if self.ckpt is not None else None,
        )


__all__ = [
    "RESULT_FILE",
    "RUN_FILE",
    "BranchSpec",
    "MultiTaskModule",
    "RunPlan",
    "TrainConfig",
    "TrainEvents",
    "TrainResult",
    "TrainRun",
    "evaluate",
    "load_branch_data",
    "make_accelerator",
    "parameter_groups",
    "plan_run",
    "read_plan",
    "read_result",
    "start_run",
    "train_run",
]

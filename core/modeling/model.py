"""The composed model: frozen base -> MoE trunk (run once) -> any set of branches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import Tensor, nn

from scaler_wizard.branch import Branch, Prediction, TrunkOutput, shared_base_layers
from scaler_wizard.errors import BranchNotFoundError, did_you_mean
from scaler_wizard.manifests.model import Manifest
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.row_routing import (
    RowBranches,
    RowRoutes,
    in_given_order,
    length_order,
    predict_routed,
    run_rows,
)
from scaler_wizard.moe import MoELayer


class Trunk(nn.Module):
    """The shared MoE layers and the pooling."""

    def __init__(self, layers: Iterable[MoELayer], *, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', not {pooling!r}")
        self.layers = nn.ModuleList(layers)
        self.pooling = pooling

    def forward(self, hidden: Tensor, mask: Tensor) -> TrunkOutput:
        """hidden (B, T, d) base states, mask (B, T) bool."""
        aux = hidden.new_zeros(())
        stats = []
        for layer in self.layers:
            hidden, layer_aux, layer_stats = layer(hidden, mask)
            aux = aux + layer_aux
            stats.append(layer_stats)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)
        return TrunkOutput(pooled=pooled, hidden=hidden, mask=mask, aux_loss=aux, stats=stats)


@dataclass
class Origin:
    """Which stored version a composed model came from (``manifest``: its typed manifest).

    ``base_entry`` is that manifest's ``base`` as a JSON object (what the base-state cache
    keys on).
    """

    name: str
    manifest_hash: str
    manifest: Manifest
    base_entry: dict[str, Any]

    @classmethod
    def of(cls, name: str, manifest_hash: str, manifest: Manifest) -> Origin:
        return cls(name, manifest_hash, manifest, manifest.base.to_dict())


@dataclass
class ModelOutput:
    logits: dict[str, Tensor]  # branch -> (B, num_labels)
    trunk: TrunkOutput


@dataclass
class RowsOutput(ModelOutput):
    """``forward(..., row_branches=...)``: ``logits[b]`` holds branch ``b``'s logits for its
    rows only, ``(len(rows[b]), num_labels)``, in the order of ``rows[b]`` (row indices into
    the batch, int64)."""

    rows: dict[str, Tensor] = field(default_factory=dict)


BranchLoader = Callable[[str], Branch]


class ScalerModel(nn.Module):
    """Base + trunk + branches. Branches load lazily: composing 100 reads none of them."""

    def __init__(
        self,
        base: BaseEncoder,
        trunk: Trunk,
        *,
        branch_names: Sequence[str] = (),
        branch_loader: BranchLoader | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.trunk = trunk
        self.branches = nn.ModuleDict()
        self._pending: list[str] = list(branch_names)
        self._order: list[str] = list(branch_names)
        self._loader = branch_loader
        #: the stored version this model was composed from (None for one built in memory)
        self.origin: Origin | None = None

    # -- branches -------------------------------------------------------------------
    @property
    def branch_names(self) -> list[str]:
        """Manifest order, then branches added since; loading a branch does not reorder them."""
        known = [n for n in self._order if n in self.branches or n in self._pending]
        return known + [n for n in self.branches if n not in known]

    def is_loaded(self, name: str) -> bool:
        return name in self.branches

    def branch(self, name: str) -> Branch:
        """The branch module, loading its banks on first use."""
        if name in self.branches:
            return self.branches[name]  # type: ignore[return-value]
        if name in self._pending and self._loader is not None:
            # A branch first used inside ``predict`` (inference mode) must not become inference
            # tensors, or a later ``model(...)`` with autograd on cannot use it.
            with torch.inference_mode(False):
                loaded = self._loader(name)
                device = next(self.trunk.parameters(), torch.empty(0)).device
                # A branch follows the model's mode, whenever it happens to be loaded.
                self.branches[name] = loaded.to(device).train(self.training)
            self._pending.remove(name)
            return loaded
        raise BranchNotFoundError(
            f"no branch named {name!r} {did_you_mean(name, self.branch_names)}",
            branch=name,
            model=self.origin.name if self.origin is not None else None,
            available=self.branch_names,
        )

    def add_branch(self, name: str, branch: Branch) -> None:
        if name in self.branch_names:
            raise ValueError(f"branch {name!r} exists")
        branch.adapter.attach(self.base, name)
        self.branches[name] = branch.train(self.training)
        self._order.append(name)

    def remove_branch(self, name: str) -> None:
        if name in self.branches:
            self.branch(name).adapter.detach(self.base, name)
            del self.branches[name]
        elif name in self._pending:
            self._pending.remove(name)
        else:
            raise BranchNotFoundError(
                f"no branch named {name!r} {did_you_mean(name, self.branch_names)}",
                branch=name,
                model=self.origin.name if self.origin is not None else None,
                available=self.branch_names,
            )
        if name in self._order:
            self._order.remove(name)

    def load_all_branches(self) -> None:
        for name in list(self._pending):
            self.branch(name)

    # -- forward --------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters(), torch.empty(0)).device

    def trunk_hidden_size(self) -> int:
        return self.base.hidden_size

    def encode(self, input_ids: Tensor, attention_mask: Tensor, **extra: Tensor) -> TrunkOutput:
        """The shared pass: base (frozen, in-encoder adapters off) then the MoE trunk."""
        return self.encode_batch({"input_ids": input_ids, "attention_mask": attention_mask, **extra})

    def encode_batch(
        self,
        batch: Mapping[str, Tensor],
        *,
        adapter: str | None = None,
        grad: bool = False,
        base_layers: int = 0,
    ) -> TrunkOutput:
        """Base then trunk. ``adapter``: run with that branch's in-encoder adapter active (its
        own pass); None: the shared pass. ``grad``: keep autograd on (training such an adapter).
        ``base_layers``: also carry that many of the base's layers below its last
        (``TrunkOutput.base_layers``), for the adapters that read them."""
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        mask = batch["attention_mask"]
        hidden, lower = self.base.forward_layers(
            batch["input_ids"], mask, base_layers, adapter=adapter, grad=grad, **extra
        )  # (B, T, d), base_layers x (B, T, d)
        out = self.trunk(hidden, mask.bool())
        if lower:
            out.base_layers = lower
        return out

    def _run(
        self, names: list[str], modules: list[Branch], batch: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], TrunkOutput | None]:
        """Logits for each branch: one shared trunk pass for all branches that can share it,
        plus one pass per branch whose adapter lives inside the base encoder."""
        own = [n for n, m in zip(names, modules, strict=True) if m.adapter.needs_base_pass]
        lower = shared_base_layers(m for m in modules if not m.adapter.needs_base_pass)
        shared = self.encode_batch(batch, base_layers=lower) if len(own) < len(names) else None
        logits: dict[str, Tensor] = {}
        for n, m in zip(names, modules, strict=True):
            if n in own:
                logits[n] = m(self.encode_batch(batch, adapter=n, base_layers=m.adapter.base_layers))
            else:
                assert shared is not None
                logits[n] = m(shared)
        return logits, shared

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        branches: str | Sequence[str] | None = None,
        *,
        row_branches: RowBranches | None = None,
        **extra: Tensor,
    ) -> ModelOutput:
        """One trunk pass, then the logits of each requested branch (one name, a list, or all
        when None).

        ``row_branches`` (instead of ``branches``): one branch name (or a list) per row; the
        shared trunk still runs once, each branch's tail only on its rows. Returns a
        ``RowsOutput``."""
        if row_branches is not None:
            if branches is not None:
                raise ValueError("give branches or row_branches, not both")
            return self._forward_rows(input_ids, attention_mask, row_branches, extra)
        names = _branch_list(branches)
        names = self.branch_names if names is None else names
        modules = [self.branch(n) for n in names]  # fail on a bad name before computing
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        logits, shared = self._run(names, modules, batch)
        if shared is None:  # every requested branch had its own pass: report the plain trunk
            shared = self.encode_batch(batch)
        return ModelOutput(logits=logits, trunk=shared)

    def _forward_rows(
        self, input_ids: Tensor, attention_mask: Tensor, row_branches: RowBranches, extra: dict[str, Tensor]
    ) -> RowsOutput:
        routes = RowRoutes.of(row_branches, int(input_ids.shape[0]))
        modules = {n: self.branch(n) for n in routes.rows}  # fail on a bad name before computing
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
        logits, rows, shared = run_rows(self, routes, modules, batch)
        if shared is None:  # every branch had its own pass: report the plain trunk
            shared = self.encode_batch(batch)
        return RowsOutput(logits=logits, trunk=shared, rows=rows)

    def predict_rows(
        self, texts: Sequence[str], branches_per_row: Sequence[str], *, batch_size: int = 32
    ) -> list[Prediction]:
        """One Prediction per text, from the branch its row names (one trunk pass per batch
        whatever the mix of branches)."""
        if isinstance(branches_per_row, str) or not all(isinstance(b, str) for b in branches_per_row):
            raise TypeError("predict_rows() takes one branch name (a string) per text")
        routed = predict_routed(self, texts, branches_per_row, batch_size)
        return [preds[b] for preds, b in zip(routed, branches_per_row, strict=True)]

    @overload
    def predict(  # type: ignore[overload-overlap]  # a str is also a Sequence[str]
        self, texts: str, branches: str | Sequence[str] | None = None, *, batch_size: int = 32
    ) -> dict[str, Prediction]: ...

    @overload
    def predict(
        self, texts: Sequence[str], branches: str | Sequence[str] | None = None, *, batch_size: int = 32
    ) -> dict[str, list[Prediction]]: ...

    def predict(
        self, texts: str | Sequence[str], branches: str | Sequence[str] | None = None, *, batch_size: int = 32
    ) -> dict[str, list[Prediction]] | dict[str, Prediction]:
        """Label + scores per branch: ``{branch: [Prediction per text]}``.

        ``texts`` may be one string (then ``{branch: Prediction}``) or a list of strings;
        ``branches`` one name, a list of names, or None for every branch. The texts run in
        batches of ``batch_size`` neighbours in length (less padding); the answers come back in
        the order given.
        """
        names = _branch_list(branches)
        if isinstance(texts, str):
            return {n: preds[0] for n, preds in self._predict([texts], names, batch_size).items()}
        if not all(isinstance(t, str) for t in texts):
            bad = next(t for t in texts if not isinstance(t, str))
            raise TypeError(f"predict() takes texts as strings, not {type(bad).__name__}")
        return self._predict(list(texts), names, batch_size)

    def _predict(
        self, texts: list[str], branches: list[str] | None, batch_size: int
    ) -> dict[str, list[Prediction]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        names = self.branch_names if branches is None else branches
        modules = [self.branch(n) for n in names]  # loaded outside inference mode
        with torch.inference_mode():
            return self._predict_loaded(texts, names, modules, batch_size)

    def _predict_loaded(
        self, texts: list[str], names: list[str], modules: list[Branch], batch_size: int
    ) -> dict[str, list[Prediction]]:
        was_training = self.training
        self.eval()
        order = length_order(texts)
        done: dict[str, list[Prediction]] = {n: [] for n in names}
        try:
            for start in range(0, len(texts), batch_size):
                batch = self.base.tokenize([texts[i] for i in order[start : start + batch_size]], self.device)
                logits, _ = self._run(names, modules, batch)
                for n, m in zip(names, modules, strict=True):
                    done[n].extend(m.decode(logits[n]))
        finally:
            self.train(was_training)
        return {n: in_given_order(done[n], order) for n in names}


def _branch_list(branches: str | Sequence[str] | None) -> list[str] | None:
    """One branch name or a sequence of names (a bare string is one name, not its letters)."""
    if branches is None:
        return None
    if isinstance(branches, str):
        return [branches]
    names = list(branches)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"branch names are strings, not {type(bad[0]).__name__}")
    return names

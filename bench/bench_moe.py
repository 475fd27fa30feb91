"""Benchmark 1: one MoE layer (8 experts, top-2) vs a dense FFN with the same active FLOPs.

Ours: ``scaler_wizard.modeling.compose.new_trunk_layer(hidden_size=384)`` -> MoELayer + TopKGating
(8 experts, k=2, expert width 768 = the library default 2 x hidden), output weights set to
random values (a fresh layer has w_out = 0), eval mode, ``torch.inference_mode``.

Reference: a pre-norm residual dense FFN block ``h + W2 gelu(W1 LN(h) + b1) + b2`` of width
1536 = k x 768. Per token it does exactly the expert FLOPs the MoE does (2 experts x
2 x 384 x 768 multiply-adds); the MoE's extra work (router, dispatch, combine) is the
overhead being measured. Goal: t(dense) / t(MoE) >= 0.7.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from common import BenchResult, Measurement, Row, cpu_ratio, loadavg, measure_interleaved
from torch import Tensor, nn

NAME = "moe"
HIDDEN = 384
EXPERTS = 8
TOP_K = 2
EXPERT_HIDDEN = 2 * HIDDEN  # the library default
GOAL = ">= 0.7"


class DenseFFNBlock(nn.Module):
    """The dense reference: same pre-norm residual form as MoELayer, one FFN of width k*h."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, hidden)

    def forward(self, hidden: Tensor) -> Tensor:
        out: Tensor = hidden + self.fc2(F.gelu(self.fc1(self.norm(hidden))))
        return out


def build_moe(seed: int = 0) -> nn.Module:
    """The library's layer, as the trunk builds it, with non-zero (random) output weights."""
    from scaler_wizard.modeling.compose import new_trunk_layer

    torch.manual_seed(seed)
    layer = new_trunk_layer(
        hidden_size=HIDDEN, num_experts=EXPERTS, gating="topk", gating_config={"k": TOP_K}
    )
    assert layer.expert_hidden == EXPERT_HIDDEN, layer.expert_hidden
    with torch.no_grad():
        nn.init.normal_(layer.w_out, std=EXPERT_HIDDEN**-0.5)
        nn.init.normal_(layer.b_out, std=0.02)
        nn.init.normal_(layer.b_in, std=0.02)
    return layer.eval()


def proposed_forward(layer: Any, hidden: Tensor, mask: Tensor) -> Tensor:
    """The dispatch this benchmark suggests for MoELayer.forward (see README), same output.

    One ``nonzero`` + a stable sort by expert instead of one ``nonzero`` per expert; bias
    fused into the matmuls (``addmm``); one gate-weight multiply and one ``index_add_``
    for all experts instead of one per expert; the residual written with one
    ``index_put`` instead of a zero (B, T, d) buffer, a masked scatter and an add.
    Autograd-friendly (no ``out=``), so it serves training too.
    """
    x = hidden[mask]
    xn = layer.norm(x)
    combine = layer.gating(xn).combine  # (N, E)
    tok, exp = combine.nonzero(as_tuple=True)
    order = exp.argsort(stable=True)
    tok, exp = tok[order], exp[order]
    counts = torch.bincount(exp, minlength=layer.num_experts).tolist()
    xs = xn.index_select(0, tok)
    outs = [
        torch.addmm(layer.b_out[e], F.gelu(torch.addmm(layer.b_in[e], chunk, layer.w_in[e])), layer.w_out[e])
        for e, chunk in enumerate(xs.split(counts))
        if chunk.shape[0]
    ]
    if not outs:
        return hidden
    ys = torch.cat(outs) * combine[tok, exp].unsqueeze(1)
    y = torch.zeros_like(x).index_add_(0, tok, ys)
    return hidden.index_put((mask,), x + y)


def loop_forward(layer: Any, hidden: Tensor, mask: Tensor) -> Tensor:
    """The dispatch MoELayer used before session 22: per expert one ``nonzero``, a gather, the
    FFN, a weight-multiply and a scatter; a (B, T, d) zero buffer for the residual. Kept to
    compare against (bit-identical outputs)."""
    x = hidden[mask]
    xn = layer.norm(x)
    combine = layer.gating(xn).combine
    y = torch.zeros_like(x)
    for e in (combine > 0).any(0).nonzero().flatten().tolist():
        idx = combine[:, e].nonzero().flatten()
        out = layer.expert(e, xn.index_select(0, idx))
        y.index_add_(0, idx, out * combine.index_select(0, idx)[:, e : e + 1])
    delta = torch.zeros_like(hidden)
    delta[mask] = y
    return hidden + delta


def active_flops_per_token() -> int:
    """Multiply-adds x 2 of the expert/FFN matmuls (router and norms excluded)."""
    return 2 * TOP_K * (2 * HIDDEN * EXPERT_HIDDEN)


def routing_stats(layer: nn.Module, hidden: Tensor, mask: Tensor) -> dict[str, Any]:
    with torch.inference_mode():
        _, _, stats = layer(hidden, mask)
    counts = [round(float(v) * stats.tokens) for v in stats.load]
    return {"tokens": stats.tokens, "tokens_per_expert": counts, "dropped": stats.dropped}


def profile_top_ops(fn: Any, *, calls: int = 3, top: int = 8) -> list[dict[str, Any]]:
    """Self-CPU time per op (torch.profiler) over a few calls: where the MoE time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [
        {
            "op": e.key,
            "calls_per_forward": e.count / calls,
            "self_ms_per_forward": e.self_cpu_time_total / 1e3 / calls,
            "share": e.self_cpu_time_total / total,
        }
        for e in rows[:top]
    ]


def run(*, quick: bool, threads: int) -> BenchResult:
    shapes = [(64, 64)] if quick else [(64, 64), (8, 64)]
    warmup, repeats = (2, 5) if quick else (3, 15)
    moe = build_moe()
    torch.manual_seed(1)
    dense = DenseFFNBlock(HIDDEN, TOP_K * EXPERT_HIDDEN).eval()
    rows: list[Row] = []
    measurements: dict[str, Measurement] = {}
    details: dict[str, Any] = {
        "config": {
            "hidden": HIDDEN,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "expert_hidden": EXPERT_HIDDEN,
            "dense_width": TOP_K * EXPERT_HIDDEN,
            "active_flops_per_token": active_flops_per_token(),
            "input": "torch.randn(B, T, 384), every token real (mask all True)",
        },
        "loadavg_before": loadavg(),
    }
    for batch, seq in shapes:
        tag = f"b{batch}t{seq}"
        gen = torch.Generator().manual_seed(2)
        hidden = torch.randn(batch, seq, HIDDEN, generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.bool)

        def run_moe(h: Tensor = hidden, m: Tensor = mask) -> object:
            with torch.inference_mode():
                return moe(h, m)

        def run_dense(h: Tensor = hidden) -> object:
            with torch.inference_mode():
                return dense(h)

        def run_proposed(h: Tensor = hidden, m: Tensor = mask) -> object:
            with torch.inference_mode():
                return proposed_forward(moe, h, m)

        def run_loop(h: Tensor = hidden, m: Tensor = mask) -> object:
            with torch.inference_mode():
                return loop_forward(moe, h, m)

        with torch.inference_mode():
            diff = (moe(hidden, mask)[0] - proposed_forward(moe, hidden, mask)).abs().max().item()
            same = torch.equal(moe(hidden, mask)[0], loop_forward(moe, hidden, mask))
        assert diff < 1e-4, f"proposed dispatch differs from MoELayer by {diff}"
        assert same, "MoELayer's dispatch is not bit-identical to the per-expert loop"
        res = measure_interleaved(
            {"moe": run_moe, "dense": run_dense, "proposed": run_proposed, "loop": run_loop},
            warmup=warmup,
            repeats=repeats,
        )
        m_moe, m_dense = res["moe"], res["dense"]
        measurements[f"{tag}.moe"] = m_moe
        measurements[f"{tag}.dense"] = m_dense
        measurements[f"{tag}.proposed"] = res["proposed"]
        measurements[f"{tag}.loop"] = res["loop"]
        tokens = batch * seq
        flops = tokens * active_flops_per_token()
        details[tag] = {
            "tokens": tokens,
            "routing": routing_stats(moe, hidden, mask),
            "gflops_moe": flops / m_moe.median / 1e9,
            "gflops_dense": flops / m_dense.median / 1e9,
            "us_per_token_moe": m_moe.median / tokens * 1e6,
            "us_per_token_dense": m_dense.median / tokens * 1e6,
        }
        if (batch, seq) == shapes[0]:
            details[tag]["profile_moe"] = profile_top_ops(run_moe)
            details[tag]["profile_dense"] = profile_top_ops(run_dense)
        cases = (
            ("moe", f"({tokens} tok)", "MoE 8x768 top-2", "MoELayer forward"),
            ("proposed", "proposed dispatch", "proposed MoE dispatch, same weights",
             "proposed MoELayer.forward (bench_moe.proposed_forward)"),
            ("loop", "previous loop", "per-expert loop dispatch, same weights",
             "the per-expert loop MoELayer used before (bench_moe.loop_forward)"),
        )  # fmt: skip
        for key, suffix, what, label in cases:
            m = res[key]
            rows.append(
                Row(
                    name=f"moe.{tag} {suffix}",
                    ours=m.median * 1e3,
                    reference=m_dense.median * 1e3,
                    unit="ms",
                    ratio=m_dense.median / m.median,
                    ratio_definition=f"t(dense FFN 1536) / t({what})",
                    goal=GOAL if key == "moe" and (batch, seq) == (64, 64) else None,
                    cpu_ratio=cpu_ratio(m_dense, m),
                    ours_label=label,
                    reference_label="dense FFN block forward",
                )
            )
    details["loadavg_after"] = loadavg()
    return BenchResult(
        name=NAME,
        title="MoE layer (8 experts, top-2, 384->768) vs dense FFN (384->1536), same active FLOPs",
        rows=rows,
        measurements=measurements,
        details=details,
        notes=[f"torch threads = {threads}; interleaved repeats; median of {repeats}"],
    )

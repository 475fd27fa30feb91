"""Probe for issue 12: does a learned mix of the base's last layers lift the attn-mlp tail?

Not a product benchmark: it answers one design question before the strategy is built. Same
fixed split as ``bench_quality.py`` (``train_test_split(test_size=0.2, random_state=0,
stratify=label)``, validation = 10% of the training part); the base's token states of the last
``--layers`` layers are computed once (fp16, one tensor per text), then the built-in attn-mlp
tail is trained over a softmax mix of them (the mix weights trained with it), and the epoch is
chosen on validation. ``--layers 1`` is today's strategy (the last layer only).

    python bench/probe_layer_mix.py --task trec --layers 3 [--epochs 25] [--out bench/results/layer_mix.json]

Session 19 (busy 2-CPU machine, one thread): TREC test accuracy 90.8% with the last layer,
93.0% with a mix of the last 3, 93.1% with all 6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from scaler_wizard.banks import ContentStore
from scaler_wizard.branch import TrunkOutput
from scaler_wizard.modeling.base_encoder import BaseEncoder
from scaler_wizard.modeling.compose import compose, init_model
from scaler_wizard.plugins.attn_mlp import AttentionMLP, AttnMLPConfig

REPO = Path(__file__).resolve().parent.parent


def token_states(base: BaseEncoder, texts: list[str], layers: int) -> list[Tensor]:
    """Per text: (layers, tokens, d) fp16, padding dropped."""
    out: list[Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = base.tokenize(texts[start : start + 64])
            result = base.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            )
            states = torch.stack(result.hidden_states[-layers:], 0).half()  # (L, B, T, d)
            for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                out.append(states[:, i, : int(n)].clone())
    return out


def pad(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    layers, _, d = rows[0].shape
    longest = max(r.shape[1] for r in rows)
    x = torch.zeros(layers, len(rows), longest, d)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, r in enumerate(rows):
        x[:, i, : r.shape[1]] = r.float()
        mask[i, : r.shape[1]] = True
    return x, mask


class MixedTail(nn.Module):
    def __init__(self, layers: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(layers))  # uniform start
        self.adapter = AttentionMLP(AttnMLPConfig(), hidden_size=hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = torch.einsum("l,lbtd->btd", torch.softmax(self.mix, 0), x)
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        trunk = TrunkOutput(pooled=pooled, hidden=h, mask=mask, aux_loss=h.new_zeros(()))
        return self.head(self.adapter(trunk))


def accuracy(net: MixedTail, rows: list[Tensor], y: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(*pad(rows[s : s + 256])).argmax(-1) for s in range(0, len(rows), 256)])
    return float(accuracy_score(y, pred))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="trec")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = ContentStore.open(Path(tempfile.mkdtemp(prefix="layer-mix-")) / "store", create=True)
    init_model(store, "probe", seed=0)
    base = compose(store, "probe").base
    df = pd.read_csv(REPO / "data" / f"{args.task}.csv")
    train, test = train_test_split(df, test_size=0.2, random_state=0, stratify=df["label"])
    fit, val = train_test_split(train, test_size=0.1, random_state=0, stratify=train["label"])
    labels = sorted(df["label"].unique())
    index = {label: i for i, label in enumerate(labels)}
    parts = {"fit": fit, "val": val, "test": test}
    t0 = time.perf_counter()
    x = {k: token_states(base, list(p["text"]), args.layers) for k, p in parts.items()}
    y = {k: torch.tensor([index[label] for label in p["label"]]) for k, p in parts.items()}
    feature_s = time.perf_counter() - t0
    torch.manual_seed(0)
    net = MixedTail(args.layers, base.hidden_size, len(labels))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    best = {"val": -1.0, "test": 0.0, "epoch": -1}
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x["fit"]))
        for s in range(0, len(order), 64):
            idx = order[s : s + 64].tolist()
            logits = net(*pad([x["fit"][i] for i in idx]))
            loss = nn.functional.cross_entropy(logits, y["fit"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_acc = accuracy(net, x["val"], y["val"])
        if val_acc > best["val"]:
            best = {"val": val_acc, "test": accuracy(net, x["test"], y["test"]), "epoch": epoch}
    result = {
        "task": args.task,
        "layers": args.layers,
        "epochs": args.epochs,
        "best_epoch": best["epoch"],
        "val_accuracy": best["val"],
        "test_accuracy_at_best_val": best["test"],
        "mix": torch.softmax(net.mix, 0).tolist(),
        "feature_s": feature_s,
        "train_s": time.perf_counter() - t0,
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

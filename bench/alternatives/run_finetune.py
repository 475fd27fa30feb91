"""Full fine-tuning, PEFT LoRA and AdapterHub ``adapters`` on the packaged MiniLM (issue 12).

One plain torch loop for all three (AdamW, linear warm-up/decay, dynamic padding), the model
kept from the epoch with the best validation accuracy, the test part read once. Runs in
``.venv-alt``; prints one JSON line.

    .venv-alt/bin/python bench/alternatives/run_finetune.py --split S.json --method peft-lora
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from split_io import Clock, base_path, emit, load_split, parser, scores, versions

METHODS = {
    "full-ft": {"lr": 1e-4, "label": "full fine-tuning"},
    "peft-lora": {"lr": 1e-3, "label": "PEFT LoRA r=8 (seq. classification)"},
    "adapters": {"lr": 1e-3, "label": "AdapterHub adapters (seq_bn + head)"},
}


def build(method: str, n_labels: int) -> Any:
    import torch

    path = str(base_path())
    if method == "adapters":
        import adapters

        model = adapters.AutoAdapterModel.from_pretrained(path, use_safetensors=True)
        model.add_adapter("task", config="seq_bn")
        model.add_classification_head("task", num_labels=n_labels)
        model.train_adapter("task")
        model.set_active_adapters("task")
        return model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=n_labels, use_safetensors=True
    )
    if method == "peft-lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1)
        )
    assert isinstance(model, torch.nn.Module)
    return model


def trainable_bytes(model: Any, method: str) -> int:
    params = model.parameters() if method == "full-ft" else (p for p in model.parameters() if p.requires_grad)
    return sum(p.numel() * p.element_size() for p in params)


def predict(model: Any, tok: Any, texts: list[str], batch: int = 64) -> list[int]:
    import torch

    model.eval()
    out: list[int] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(
                texts[i : i + batch], truncation=True, max_length=128, padding=True, return_tensors="pt"
            )
            out += model(**enc).logits.argmax(-1).tolist()
    return out


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--method", choices=sorted(METHODS), required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.0, help="default: per method")
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    split = load_split(args.split, args.limit)
    total = Clock()
    tok = AutoTokenizer.from_pretrained(str(base_path()))
    model = build(args.method, len(split["labels"]))
    fit, val, test = split["fit"], split["val"], split["test"]
    lr = args.lr or float(METHODS[args.method]["lr"])  # type: ignore[arg-type]
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = args.epochs * ((len(fit["text"]) + args.batch_size - 1) // args.batch_size)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps), steps)
    enc = tok(fit["text"], truncation=True, max_length=128)
    labels = torch.tensor(fit["label"])
    best: tuple[float, int, dict[str, Any]] = (-1.0, 0, {})
    history = []
    train_clock = Clock()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = list(range(len(labels)))
        random.Random(args.seed + epoch).shuffle(order)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            batch = tok.pad({k: [enc[k][j] for j in idx] for k in enc}, return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        val_acc = scores(val["label"], predict(model, tok, val["text"]))["accuracy"]
        history.append({"epoch": epoch, "val_accuracy": val_acc, "loss": float(loss.detach())})
        print(f"epoch {epoch}: val acc {val_acc:.4f}", file=sys.stderr, flush=True)
        if val_acc > best[0]:
            best = (
                val_acc,
                epoch,
                {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad},
            )
    model.load_state_dict(best[2], strict=False)
    train_wall, train_cpu = train_clock.read()
    test_clock = Clock()
    pred = predict(model, tok, test["text"])
    test_wall, _ = test_clock.read()
    wall, cpu = total.read()
    emit(
        {
            "task": split["task"],
            "method": METHODS[args.method]["label"],
            **scores(test["label"], pred),
            "train_wall_s": train_wall,
            "train_cpu_s": train_cpu,
            "total_wall_s": wall,
            "total_cpu_s": cpu,
            "test_wall_s": test_wall,
            "bytes_per_branch": trainable_bytes(model, args.method),
            "epochs": args.epochs,
            "best_epoch": best[1],
            "val_history": history,
            "lr": lr,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "rows": {k: len(split[k]["text"]) for k in ("fit", "val", "test")},
            "versions": versions("peft", "adapters"),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

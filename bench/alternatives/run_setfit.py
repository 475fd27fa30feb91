"""SetFit on the packaged MiniLM (issue 12): contrastive body fine-tuning, then a logistic head.

Full data with a bounded number of pairs (``--pairs``, one epoch over them), or the few-shot
setting (``--few-shot 8``: the 8-per-class rows of the fit part named in the split file, SetFit's
default 20 iterations). One epoch over the pairs, so no model selection: the validation
accuracy is reported, the test part read once. Runs in ``.venv-alt``; prints one JSON line.

    .venv-alt/bin/python bench/alternatives/run_setfit.py --split S.json --pairs 4000
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from split_io import Clock, base_path, emit, load_split, parser, scores, versions


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4000, help="full data: pairs trained on (bound)")
    p.add_argument("--few-shot", type=int, default=0, help="rows per class from the split file")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from setfit import SetFitModel, Trainer, TrainingArguments
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(args.threads)
    split = load_split(args.split, args.limit)
    fit = split["few_shot"][str(args.few_shot)] if args.few_shot else split["fit"]
    total = Clock()
    body = SentenceTransformer(str(base_path()), device="cpu", model_kwargs={"use_safetensors": True})
    model = SetFitModel(model_body=body, model_head=LogisticRegression(max_iter=2000))
    if args.few_shot:
        targs = TrainingArguments(
            batch_size=args.batch_size, num_epochs=1, num_iterations=1 if args.limit else 20, seed=args.seed
        )
        pairs = "20 iterations (SetFit default)"
    else:
        steps = max(1, args.pairs // args.batch_size)
        targs = TrainingArguments(batch_size=args.batch_size, num_epochs=1, max_steps=steps, seed=args.seed)
        pairs = f"{steps * args.batch_size} pairs"
    targs.report_to = "none"
    train_clock = Clock()
    trainer = Trainer(
        model=model, args=targs, train_dataset=Dataset.from_dict({"text": fit["text"], "label": fit["label"]})
    )
    trainer.train()
    train_wall, train_cpu = train_clock.read()
    val_acc = scores(split["val"]["label"], model.predict(split["val"]["text"]).tolist())["accuracy"]
    test_clock = Clock()
    pred = model.predict(split["test"]["text"]).tolist()
    test_wall, _ = test_clock.read()
    wall, cpu = total.read()
    head = model.model_head
    n_bytes = sum(t.numel() * t.element_size() for t in body.state_dict().values())
    n_bytes += int(head.coef_.size + head.intercept_.size) * 8
    label = f"SetFit few-shot {args.few_shot}/class" if args.few_shot else f"SetFit full data ({pairs})"
    emit(
        {
            "task": split["task"],
            "method": label,
            **scores(split["test"]["label"], [int(v) for v in pred]),
            "train_wall_s": train_wall,
            "train_cpu_s": train_cpu,
            "total_wall_s": wall,
            "total_cpu_s": cpu,
            "test_wall_s": test_wall,
            "bytes_per_branch": n_bytes,
            "val_accuracy": val_acc,
            "pairs": pairs,
            "train_rows": len(fit["text"]),
            "batch_size": args.batch_size,
            "threads": args.threads,
            "rows": {k: len(split[k]["text"]) for k in ("fit", "val", "test")},
            "versions": versions("setfit", "sentence-transformers"),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

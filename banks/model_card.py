"""The model card (README.md) of a published version: Hub card metadata plus a table of branches.

Built with ``huggingface_hub.ModelCardData`` (imported lazily) and checked to parse back with
``ModelCard`` before it is uploaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from scaler_wizard.manifests.facts import KNOWN_BASES, plugin_refs
from scaler_wizard.manifests.facts import base_hub_id as base_model_id
from scaler_wizard.manifests.model import Manifest

LIBRARY_NAME = "scaler-wizard"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _labels_cell(labels: list[str], limit: int = 12) -> str:
    shown = ", ".join(f"`{_cell(x)}`" for x in labels[:limit])
    return shown + (f", … ({len(labels)} in all)" if len(labels) > limit else "")


def _metric(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


SELF_DISTRIBUTION = "scaler-wizard"
#: licences of the bases in KNOWN_BASES (from their own model cards)
KNOWN_BASE_LICENSES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}


def _user(field: str) -> str:
    """Who uses a plugin, for the card: ``trunk.layers[0].gating`` -> ``trunk layer 0``,
    ``branches.spam.head`` -> ``branch spam``."""
    layer = re.fullmatch(r"trunk\.layers\[(\d+)\]\.gating", field)
    return f"trunk layer {layer.group(1)}" if layer else f"branch {field.split('.')[1]}"


def required_plugins(manifest: Manifest | Mapping[str, Any]) -> list[dict[str, Any]]:
    """Third-party plugins the version needs: kind, plugin, distribution, version, users, install.

    ``install`` is a ``pip install`` line only for a valid PEP 508 name and PEP 440 version (the
    manifest may come from anyone); otherwise None.
    """
    if isinstance(manifest, Manifest):
        refs = [(kind, _user(field), ref.to_dict()) for kind, field, ref in plugin_refs(manifest)]
    else:  # a JSON object, perhaps only ``trunk`` and ``branches`` (checked below, field by field)
        refs = []
        for i, layer in enumerate(manifest["trunk"]["layers"]):
            refs.append(("gating", f"trunk layer {i}", layer["gating"]))
        for bname, entry in sorted(manifest["branches"].items()):
            refs.append(("strategy", f"branch {bname}", entry["strategy"]))
            refs.append(("head", f"branch {bname}", entry["head"]))
    found: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for kind, user, ref in refs:
        provider = ref.get("provider") or {}
        dist, version = str(provider.get("distribution", "")), str(provider.get("version", ""))
        if dist in (SELF_DISTRIBUTION, "unknown"):
            continue
        key = (kind, str(ref["plugin"]), dist, version)
        item = found.setdefault(
            key,
            {
                "kind": kind,
                "plugin": str(ref["plugin"]),
                "distribution": dist,
                "version": version,
                "used_by": [],
                "install": _install_line(dist, version),
            },
        )
        if user not in item["used_by"]:
            item["used_by"].append(user)
    return list(found.values())


def _install_line(distribution: str, version: str) -> str | None:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    try:
        req = Requirement(distribution)
        Version(version)
    except (InvalidRequirement, InvalidVersion):
        return None
    if str(req) != distribution or req.name != distribution or len(distribution) > 200:
        return None
    if not version.isascii() or version != version.strip() or len(version) > 100:
        return None
    return f'pip install "{distribution}>={version}"'


def _eval_results(branches: dict[str, Any]) -> list[Any]:
    """One model-index result per branch and metric. The Hub groups results by task type,
    dataset, config, split and revision (not by task name), so the branch is the dataset
    *config*: two branches trained on one file stay two results."""
    from huggingface_hub import EvalResult

    results = []
    for bname, entry in sorted(branches.items()):
        metrics = entry.get("metrics") or {}
        provenance = entry.get("provenance") or {}
        data = provenance.get("data") or {}
        dataset = str(data.get("file") or bname)
        split = str((provenance.get("eval") or {}).get("split") or "held-out")
        for key, metric_type in (("accuracy", "accuracy"), ("macro_f1", "f1")):
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                results.append(
                    EvalResult(
                        task_type="text-classification",
                        task_name=f"branch {bname}",
                        dataset_type=dataset,
                        dataset_name=f"{dataset} (held-out split)",
                        dataset_config=bname,
                        dataset_split=split,
                        metric_type=metric_type,
                        metric_name="macro F1" if key == "macro_f1" else "accuracy",
                        metric_value=float(value),
                    )
                )
    return results


def model_card(
    manifest: Manifest | dict[str, Any], h: str, *, repo_id: str, tag: str, license: str | None = None
) -> str:
    """README.md for a published version: Hub card metadata plus a table of the branches.

    ``license``: the licence id of the published weights (Hub card ``license``), when the
    publisher states one.
    """
    from huggingface_hub import ModelCard, ModelCardData

    given = manifest
    if isinstance(manifest, Manifest):
        manifest = manifest.to_dict()
    name, version = manifest["name"], manifest["version"]
    branches: dict[str, Any] = manifest["branches"]
    base = base_model_id(manifest)
    eval_results = _eval_results(branches)
    plugins = required_plugins(given)
    data = ModelCardData(
        license=license,
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
            "plugins": [{k: p[k] for k in ("kind", "plugin", "distribution", "version")} for p in plugins],
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
    install = "pip install scaler-wizard" + "".join(
        f"\n{p['install']}" for p in plugins if p["install"] is not None
    )
    sections = _plugins_section(plugins) + _use_and_limits(manifest, base, license)
    body = f"""
# {name} v{version}

A [scaler-wizard](https://pypi.org/project/scaler-wizard/) multi-task model: a frozen
{base_text} base encoder, a shared trunk of {trunk}, and {len(branches)} task
branch{"es" if len(branches) != 1 else ""}, each a small adapter and head on the shared trunk
(the trunk runs once per input, however many branches are asked for).

## Branches

{table}

{sections}
## Use

```bash
{install}
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


def _plugins_section(plugins: list[dict[str, Any]]) -> str:
    if not plugins:
        return (
            "## Plugins\n\nEvery plugin this version uses ships with scaler-wizard: "
            "nothing else to install.\n"
        )
    rows = [
        "## Plugins\n",
        "This version uses plugins from other packages; `scaler` refuses to load it without them.\n",
        "| kind | plugin | package | used by | install |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in plugins:
        install = (
            f"`{p['install']}`" if p["install"] else "_not a valid package name: check before installing_"
        )
        rows.append(
            f"| {p['kind']} | `{_cell(p['plugin'])}` | `{_cell(p['distribution'])}` {_cell(p['version'])} "
            f"| {_cell(', '.join(p['used_by']))} | {install} |"
        )
    return "\n".join(rows) + "\n"


def _use_and_limits(manifest: dict[str, Any], base: str | None, license: str | None) -> str:
    base_name = f"`{base}`" if base else f"the `{manifest['base']['architecture']}` base"
    base_license = KNOWN_BASE_LICENSES.get(base or "")
    files = sorted(
        {
            str(((e.get("provenance") or {}).get("data") or {}).get("file"))
            for e in manifest["branches"].values()
            if ((e.get("provenance") or {}).get("data") or {}).get("file")
        }
    )
    data_line = (
        f"the branches' training files ({', '.join(f'`{_cell(f)}`' for f in files)}) keep their authors' licences"
        if files
        else "the branches' training data keep their authors' licences"
    )
    return f"""
## Intended use

Text classification with the branches above, on short texts like each branch's training data:
name a branch (`scaler predict -b BRANCH`) and read its label and scores. Each branch answers
only with its own labels. Not for decisions about people without human review.

## Limitations

* Accuracy and macro F1 are measured on a held-out split of each branch's own training file,
  not on an independent benchmark: expect lower scores on other data.
* Inputs longer than {manifest["base"]["max_length"]} tokens are truncated. The base encoder is
  frozen: its language coverage and its biases carry over to every branch.
* A branch only knows the labels it was trained with; there is no "none of these" answer.

## License

* Weights of this repository: {f"`{license}`" if license else "no licence stated by the publisher; ask before reusing them"}.
* Base encoder {base_name}: {f"`{base_license}`" if base_license else "see its own model card"}.
* Data: {data_line}.
"""


__all__ = ["KNOWN_BASES", "base_model_id", "model_card", "required_plugins"]

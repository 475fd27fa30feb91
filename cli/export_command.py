"""``scaler export MODEL DEST --format peft|onnx``: take a model out of scaler (issue 16)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scaler_wizard.cli.state import err, open_store, out, print_json

if TYPE_CHECKING:
    from scaler_wizard.exporting.onnx_export import OnnxExportResult


class ExportFormat(str, Enum):
    peft = "peft"
    onnx = "onnx"


def register(app: typer.Typer) -> None:
    """Add the command to ``app``."""
    app.command("export")(export)


def export(
    model: Annotated[str, typer.Argument(help="Model name, name@VERSION, or manifest hash.")],
    dest: Annotated[Path, typer.Argument(help="New (or empty) folder to write the export into.")],
    fmt: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="peft: stock PEFT adapter folders + heads; onnx: base + trunk + branches as one ONNX graph.",
        ),
    ] = ExportFormat.peft,
    branches: Annotated[
        list[str] | None,
        typer.Option(
            "--branches",
            "-b",
            help="Branches to export (repeatable or comma-separated). Default: every in-encoder "
            "branch (peft), every branch (onnx).",
        ),
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="onnx: also write model.int8.onnx (dynamic int8 quantization).")
    ] = False,
    eval_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-data",
            help="onnx: labelled file(s) (.csv, .tsv, .jsonl, .parquet) to measure each matching "
            "branch's accuracy on, fp32 and int8 (repeatable).",
        ),
    ] = None,
    text_column: Annotated[str, typer.Option(help="--eval-data: column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="--eval-data: column holding the label.")] = "label",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Export a model: its in-encoder branches as stock PEFT adapters (peft), or base + MoE trunk +
    branches as one ONNX graph checked against torch (onnx)."""
    names = [n.strip() for item in branches or () for n in item.split(",") if n.strip()]
    if fmt is ExportFormat.onnx:
        _export_onnx(model, dest, names, int8, eval_data or [], text_column, label_column, as_json)
        return
    if int8 or eval_data:
        raise typer.BadParameter("--int8 and --eval-data go with --format onnx", param_hint="--format")
    _export_peft(model, dest, names, as_json)


def _export_onnx(
    model: str,
    dest: Path,
    names: list[str],
    int8: bool,
    eval_data: list[Path],
    text_column: str,
    label_column: str,
    as_json: bool,
) -> None:
    from scaler_wizard.exporting.onnx_check import EvalSet
    from scaler_wizard.exporting.onnx_export import TOLERANCE, export_onnx
    from scaler_wizard.training.data import load_labelled

    sets = []
    for path in eval_data:
        data = load_labelled(path, text_column=text_column, label_column=label_column, min_classes=1)
        sets.append(EvalSet(path.name, list(data.texts), list(data.labels)))
    with err.status("exporting to ONNX and checking it against torch..."):
        result = export_onnx(open_store(), model, dest, branches=names or None, int8=int8, eval_sets=sets)
    if as_json:
        print_json(_onnx_json(result))
        return
    out.print(
        f"exported {result.model}@{result.version} ({len(result.branches)} branches) -> {result.dest}",
        markup=False,
    )
    out.print(
        f"checked against torch: max |Δ logits| {result.max_abs_diff:.2g} (fp32, limit {TOLERANCE:g})",
        markup=False,
    )
    for b in result.branches:
        line = f"  {b.name} ({b.strategy}): {b.output}, max |Δ| {b.max_abs_diff:.2g}"
        if b.int8_max_abs_diff is not None:
            line += f", int8 max |Δ| {b.int8_max_abs_diff:.2g}"
        for file, acc in b.accuracy.items():
            line += f"; {file}: accuracy fp32 {acc['fp32']:.4f}"
            if acc["int8"] is not None:
                line += f", int8 {acc['int8']:.4f} ({100 * acc['change']:+.2f} points)"
        out.print(line, markup=False)
    for s in result.skipped:
        err.print(f"skipped {s.name} ({s.strategy}): {s.reason}", markup=False, highlight=False)


def _onnx_json(result: OnnxExportResult) -> dict[str, Any]:
    return {
        "dest": str(result.dest),
        "model": result.model,
        "version": result.version,
        "manifest": result.manifest_hash,
        "format": "onnx",
        "inputs": list(result.inputs),
        "files": list(result.files),
        "int8": result.int8,
        "max_abs_diff": result.max_abs_diff,
        "exported": [
            {
                "branch": b.name,
                "strategy": b.strategy,
                "output": b.output,
                "labels": list(b.labels),
                "max_abs_diff": b.max_abs_diff,
                "int8_max_abs_diff": b.int8_max_abs_diff,
                "accuracy": b.accuracy,
            }
            for b in result.branches
        ],
        "skipped": [{"branch": s.name, "strategy": s.strategy, "reason": s.reason} for s in result.skipped],
    }


def _export_peft(model: str, dest: Path, names: list[str], as_json: bool) -> None:
    from scaler_wizard.exporting.peft_export import export_peft

    result = export_peft(open_store(), model, dest, branches=names or None)
    if as_json:
        print_json(
            {
                "dest": str(result.dest),
                "model": result.model,
                "manifest": result.manifest_hash,
                "format": "peft",
                "base": result.base,
                "trunk_is_identity": result.trunk_is_identity,
                "exported": [
                    {"branch": b.name, "strategy": b.strategy, "folder": str(b.folder)}
                    for b in result.exported
                ],
                "skipped": [
                    {"branch": s.name, "strategy": s.strategy, "reason": s.reason} for s in result.skipped
                ],
            }
        )
        return
    for b in result.exported:
        out.print(f"exported {b.name} ({b.strategy}) -> {b.folder}")
    for s in result.skipped:
        err.print(f"skipped {s.name} ({s.strategy}): {s.reason}", markup=False, highlight=False)
    if not result.trunk_is_identity:
        err.print(
            "note: the model's MoE trunk is not the identity and is not exported: "
            "the exported branches' outputs differ from scaler's (see each README.md)",
            markup=False,
            highlight=False,
        )

"""Getting a model out of scaler: ``scaler export`` (issue 16)."""

from scaler_wizard.exporting.peft_export import ExportedBranch, ExportResult, SkippedBranch, export_peft

__all__ = ["ExportResult", "ExportedBranch", "SkippedBranch", "export_peft"]

"""Output fingerprints: each branch records its logits on a fixed probe set, so that
``scaler verify --deep`` can prove a branch still computes what it computed when added."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from scaler_wizard.modeling.model import ScalerModel

PROBE_SET = "builtin-v1"
PROBE_TEXTS: tuple[str, ...] = (
    "Congratulations! You have won a free cruise. Call now to claim your prize.",
    "Are we still meeting for lunch tomorrow?",
    "What is the capital of Australia?",
    "Who wrote the novel Pride and Prejudice?",
    "How many miles is it from London to Paris?",
    "The quarterly report is attached; let me know if you have questions.",
    "URGENT: your account has been suspended, reply with your PIN.",
    "Sorry, I'll call you later.",
    "What does NASA stand for?",
    "Why is the sky blue?",
    "Stocks fell sharply after the central bank raised interest rates.",
    "The team won the championship in overtime.",
    "I loved this film, the acting was wonderful.",
    "Terrible service, I will never come back.",
    "Where is the Eiffel Tower?",
    "ok",
)
TOLERANCE = 1e-4  # across machines BLAS may differ in the last bits; same machine is bit-exact


@dataclass
class FingerprintCheck:
    branch: str
    exact: bool
    max_abs_diff: float

    @property
    def ok(self) -> bool:
        return self.exact or self.max_abs_diff <= TOLERANCE


@torch.inference_mode()
def probe_logits(model: ScalerModel, branches: list[str]) -> dict[str, torch.Tensor]:
    was = model.training
    model.eval()
    try:
        batch = model.base.tokenize(list(PROBE_TEXTS), model.device)
        out = model(**batch, branches=branches).logits
    finally:
        model.train(was)
    return {k: v.float().cpu() for k, v in out.items()}


def fingerprint_of(logits: torch.Tensor) -> dict[str, Any]:
    data = logits.contiguous().numpy().tobytes()
    return {
        "probe_set": PROBE_SET,
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
        "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
    }


def check_fingerprint(name: str, recorded: Mapping[str, Any], logits: torch.Tensor) -> FingerprintCheck:
    exact = fingerprint_of(logits)["sha256"] == recorded.get("sha256")
    ref = torch.tensor(recorded.get("logits", []), dtype=torch.float32)
    diff = float((ref - logits).abs().max()) if ref.shape == logits.shape else float("inf")
    return FingerprintCheck(name, exact, diff)

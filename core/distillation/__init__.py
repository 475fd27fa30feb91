"""Multi-teacher distillation: teacher feature banks, per-teacher adapters and a router (issue 14)."""

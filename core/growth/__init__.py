"""Growing a model without changing what it computes: ``scaler expand``, expert pruning, consolidation (issue 13)."""

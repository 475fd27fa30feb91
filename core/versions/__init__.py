"""Versions of a model: history, resolve, rollback (runtime side of the manifests)."""

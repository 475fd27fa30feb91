"""Feature caches bound to their inputs (trunk, texts, dtype), checksummed."""

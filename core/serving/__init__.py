"""`scaler serve`: one process, many branches, dynamic batching over HTTP (issue 15)."""

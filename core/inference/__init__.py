"""Prediction over files and datasets: streamed, per-row branches, Ray (issue 15)."""

"""The ``scaler`` command line (typer): one sub-app per noun."""

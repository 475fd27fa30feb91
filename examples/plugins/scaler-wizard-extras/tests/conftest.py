"""Load exactly this plugin (plus scaler-wizard's built-ins), through its entry point."""

from __future__ import annotations

import os

# Set before scaler_wizard first loads plugins: other installed plugins stay out of the way.
os.environ["SCALER_PLUGINS"] = "extras"

"""The package version, from the installed distribution."""

from importlib import metadata

try:
    __version__ = metadata.version("scaler-wizard")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"

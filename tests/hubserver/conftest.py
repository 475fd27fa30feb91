"""Makes the test-Hub fixtures available to tests in this folder (and below)."""

from .fixtures import hub_env, hub_server  # noqa: F401  (re-exported pytest fixtures)

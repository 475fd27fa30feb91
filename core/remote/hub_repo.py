"""``HubRepo``: a Hugging Face Hub model repo as a bank-store backend (publish and pull).

The ``hf`` store plugin returns one for ``hf://namespace/name[@revision]``; ``scaler publish``
and ``scaler pull`` call its two methods. Planning lives in ``publishing`` and ``sync``; bytes
move through ``scaler_wizard.banks.hub``.
"""

from __future__ import annotations

from scaler_wizard.banks.hub import parse_repo_spec
from scaler_wizard.banks.store import ContentStore
from scaler_wizard.remote.publishing import Progress, PublishResult, publish
from scaler_wizard.remote.sync import PullResult, pull


class HubRepo:
    """A Hub model repo as a bank-store backend: ``hf://namespace/name[@revision]``."""

    scheme = "hf"

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        endpoint: str | None = None,
        token: str | None = None,
    ) -> None:
        self.repo_id, at = parse_repo_spec(repo_id)
        self.revision = revision or at
        self.endpoint = endpoint
        self._token = token

    @classmethod
    def open(cls, location: str, *, endpoint: str | None = None, token: str | None = None) -> HubRepo:
        """``hf://namespace/name[@revision]`` (or a bare ``namespace/name``)."""
        return cls(location, endpoint=endpoint, token=token)

    def __repr__(self) -> str:  # never the token
        at = f"@{self.revision}" if self.revision else ""
        return f"HubRepo('hf://{self.repo_id}{at}', endpoint={self.endpoint!r})"

    def publish(
        self,
        store: ContentStore,
        model: str,
        *,
        tag: str | None = None,
        revision: str | None = None,
        private: bool = False,
        progress: Progress | None = None,
    ) -> PublishResult:
        return publish(
            store,
            model,
            self.repo_id,
            tag=tag,
            revision=revision or self.revision,
            private=private,
            endpoint=self.endpoint,
            token=self._token,
            progress=progress,
        )

    def pull(
        self,
        store: ContentStore,
        *,
        revision: str | None = None,
        as_name: str | None = None,
        branches: list[str] | None = None,
        into: str | None = None,
        progress: Progress | None = None,
    ) -> PullResult:
        rev = revision or self.revision
        return pull(
            store,
            f"{self.repo_id}@{rev}" if rev else self.repo_id,
            as_name=as_name,
            branches=branches,
            into=into,
            endpoint=self.endpoint,
            token=self._token,
            progress=progress,
        )


__all__ = ["HubRepo"]

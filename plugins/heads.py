"""Built-in heads plugin: registers ``linear`` (softmax) and ``multilabel`` (independent sigmoids).

Registration only: the torch modules live in :mod:`scaler_wizard.plugins.classifier_heads` and
are imported when the hook is called, so loading the plugin costs nothing.
"""

from __future__ import annotations

from typing import Any

from scaler_wizard import hookimpl


@hookimpl
def register_heads(register: Any) -> None:
    from scaler_wizard.plugins.classifier_heads import (
        LinearHead,
        LinearHeadConfig,
        MultiLabelHead,
        MultiLabelHeadConfig,
    )

    register("linear", LinearHead, config=LinearHeadConfig)
    register("multilabel", MultiLabelHead, config=MultiLabelHeadConfig)

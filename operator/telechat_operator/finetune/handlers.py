"""TeleChatFinetune's kopf handlers: thin, each hands its event to the module's `controller`.

Importing this module registers them (`telechat_operator.handlers.register_all`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from telechat_operator.common import constants as c
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.finetune.controller import KIND, FinetuneController

controller = FinetuneController(OperatorConfig.from_env())


@kopf.on.event(c.GROUP, c.VERSION, c.FINETUNE_PLURAL)
async def finetune_changed(type: str | None, body: Mapping[str, Any], name: str, namespace: str, **_: Any) -> None:
    controller.job_event(type, body, (namespace, name))


@kopf.on.event("v1", "pods", labels={c.LABEL_OWNER_KIND: KIND, c.LABEL_JOB_NAME: kopf.PRESENT})
async def pod_changed(
    type: str | None, body: Mapping[str, Any], labels: Mapping[str, str], namespace: str, uid: str, **_: Any
) -> None:
    controller.pod_event(type, body, (namespace, labels[c.LABEL_JOB_NAME]), namespace, uid)

"""TeleChatInference's kopf handlers: thin, each hands its event to the module's `controller`.

Importing this module registers them (`telechat_operator.handlers.register_all`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from telechat_operator.common import constants as c
from telechat_operator.common.settings import OperatorConfig
from telechat_operator.inference import constants as ic
from telechat_operator.inference.controller import KIND, InferenceController

controller = InferenceController(OperatorConfig.from_env())


@kopf.on.startup()
def watch_only_our_deployments(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Server-side filter: the Deployment watch sees only Deployments this operator created."""
    settings.watching.label_selectors["apps", "deployments"] = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY_VALUE}"


@kopf.on.event(c.GROUP, c.VERSION, ic.INFERENCE_PLURAL)
async def inference_changed(type: str | None, body: Mapping[str, Any], name: str, namespace: str, **_: Any) -> None:
    controller.inference_event(type, body, namespace, name)


@kopf.on.event("v1", "pods", labels={c.LABEL_OWNER_KIND: KIND, ic.LABEL_INFERENCE_NAME: kopf.PRESENT})
async def inference_pod_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    controller.queue.trigger((namespace, labels[ic.LABEL_INFERENCE_NAME]))


@kopf.on.event("apps", "v1", "deployments", labels={c.LABEL_OWNER_KIND: KIND, ic.LABEL_INFERENCE_NAME: kopf.PRESENT})
async def inference_deployment_changed(labels: Mapping[str, str], namespace: str, **_: Any) -> None:
    controller.queue.trigger((namespace, labels[ic.LABEL_INFERENCE_NAME]))


@kopf.on.event(c.GROUP, c.VERSION, c.FINETUNE_PLURAL)
async def finetune_changed_for_inference(name: str, namespace: str, **_: Any) -> None:
    controller.finetune_event(namespace, name)

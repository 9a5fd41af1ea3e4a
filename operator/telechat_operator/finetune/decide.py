"""One finetune pass's decision: the job and its pods in, the parsed spec and the `Plan` out.

Pure: no API calls and no clock reads (the controller passes `now` and its settings). It wraps the state machine
(`status.reconcile`) with what comes before it (parsing, the host-path policy) and after it (rendering the
MindFormers YAML the ranks are created with).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from telechat_operator.common.conditions import Backoff
from telechat_operator.common.objects import owned_by
from telechat_operator.common.spec import SpecError, check_host_paths
from telechat_operator.finetune.configmap import render_finetune_config
from telechat_operator.finetune.spec import FinetuneSpec, parse
from telechat_operator.finetune.status import Plan, PodView, invalid_spec_plan, reconcile


def decide(
    job: Mapping[str, Any],
    old_status: Mapping[str, Any],
    pod_bodies: list[dict[str, Any]],
    progress: Mapping[str, Any] | None,
    *,
    now: datetime,
    backoff: Backoff,
    allowed_host_paths: Collection[str],
) -> tuple[FinetuneSpec | None, Plan]:
    """Parse the spec and run the state machine on the job's pods (or report the invalid spec).

    The pods were listed concurrently with reading the job; a pod created between the two reads is simply seen on
    the next pass (creating it again would be a 409)."""
    meta = job["metadata"]
    try:
        spec = parse(job)
        check_host_paths(spec.volumes, allowed_host_paths)
    except SpecError as err:
        return None, invalid_spec_plan(old_status, err, int(meta.get("generation", 1)), now)
    pods = [PodView.from_body(pod) for pod in pod_bodies if owned_by(pod, spec.uid)]
    plan = reconcile(spec, old_status, pods, now, backoff, progress)
    if plan.create_ranks:
        # Render (and so validate) the MindFormers YAML before any rank pod is posted: a layout or override the
        # model cannot take fails the job once, naming it, instead of starting pods that never get their config.
        try:
            plan.config_yaml = render_finetune_config(spec)
        except ValueError as err:  # telechat2.configs.ConfigError names the MindFormers key
            return None, invalid_spec_plan(
                old_status, SpecError("spec", f"the model's config rejects it: {err}"), spec.generation, now
            )
    return spec, plan

"""The finetune handler's decision step: the MindFormers YAML is rendered (validated) before any rank pod."""

from __future__ import annotations

import pytest
from operator_factories import job_body
from telechat_operator.common import constants as c
from telechat_operator.finetune import decide
from telechat_operator.finetune import handlers as finetune


def test_the_config_is_rendered_in_the_pass_that_creates_the_ranks() -> None:
    spec, plan = finetune.controller.decide(job_body(), {}, [])
    assert spec is not None and plan.create_ranks == [0, 1]
    assert plan.config_yaml is not None and "data_parallel: 2" in plan.config_yaml


def test_a_config_the_model_rejects_fails_the_job_before_any_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    from telechat2.configs import ConfigError

    def reject(spec: object) -> str:
        raise ConfigError("parallel_config: expert_parallel 2 must divide data_parallel 3")

    monkeypatch.setattr(decide, "render_finetune_config", reject)
    spec, plan = finetune.controller.decide(job_body(), {}, [])
    assert spec is None and plan.create_ranks == [] and not plan.ensure_children and not plan.create_init
    assert plan.status["state"] == c.STATE_FAILED
    (failed,) = [cond for cond in plan.status["conditions"] if cond["type"] == c.COND_FAILED]
    assert failed["reason"] == c.REASON_INVALID_SPEC and "expert_parallel 2 must divide" in failed["message"]
    # The next pass decides the same, without a new Event (no log or Event loop).
    _, again = finetune.controller.decide(job_body(), plan.status, [])
    assert again.events == [] and again.status["conditions"] == plan.status["conditions"]


def test_a_job_with_initializers_renders_nothing_until_its_ranks_are_due() -> None:
    body = job_body(dataset={"path": "/d/x.mindrecord", "jsonl": "/d/x.jsonl", "tokenizer": "/d/t.model"})
    _, plan = finetune.controller.decide(body, {}, [])
    assert plan.create_init and plan.config_yaml is None and plan.create_ranks == []

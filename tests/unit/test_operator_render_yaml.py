"""The operator renders one MindFormers config per job with libyaml's emitter; it must write the very bytes the
pure-Python dumper writes (the ConfigMap's content, and so its idempotent patch, must not depend on the build)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from telechat2 import configs

pytestmark = pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml")

ODD_VALUES: dict[str, Any] = {
    "output_dir": "/data/输出/目录 with spaces: and # marks",
    "seed": 0,
    "run_mode": "finetune",
    "load_checkpoint": "x" * 300,  # past the 120-column width
    "train_dataset": {"data_loader": {"dataset_dir": "'quoted' \"double\" \\ back\\slash\nnew line"}},
    "runner_config": {"epochs": 3, "batch_size": 2},
}


@pytest.mark.parametrize("model", configs.list_models())
@pytest.mark.parametrize("phase", ["finetune", "predict"])
def test_libyaml_dump_equals_pure_python_dump(model: str, phase: str) -> None:
    config = configs.load_config(model, phase)
    assert configs._dump(config, configs._Dumper) == configs._dump(config, configs._PureDumper)


def test_libyaml_dump_equals_pure_python_dump_on_odd_strings() -> None:
    config = configs.deep_merge(configs.load_config("telechat2-tiny", "finetune"), ODD_VALUES)
    fast = configs._dump(config, configs._Dumper)
    assert fast == configs._dump(config, configs._PureDumper)
    assert yaml.safe_load(fast)["output_dir"] == ODD_VALUES["output_dir"]
    assert "&id" not in fast and "*id" not in fast  # no anchors, even for repeated sub-trees


def test_render_config_uses_libyaml() -> None:
    assert issubclass(configs._Dumper, yaml.CSafeDumper)

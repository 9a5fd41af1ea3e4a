"""The parts of the TeleChatFinetune CRD that come from `telechat2/configs`: one source of truth for model facts.

- CEL rules rejecting, at admission, a layout the model cannot take: pipelineStage above its layer count, a
  modelParallel that does not divide its attention heads, KV heads, FFN width and vocabulary;
- the description of `spec.resources`, listing each model's default CPU/memory requests (`kubectl explain`).

They live in the CRD YAML between `# BEGIN generated: <key>` and `# END generated: <key>` lines.
`python -m telechat_operator.crd_rules` rewrites those blocks (then run `charts/sync.py`); `--check` only reports a
drift and exits 1 (a unit test runs the same check). Pure: reads the configs, no API.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "telechat.io_telechatfinetunes.yaml"
_BLOCK = re.compile(
    r"^(?P<indent> *)# BEGIN generated: (?P<key>[a-z-]+)\n.*?^(?P=indent)# END generated: (?P=key)\n",
    re.MULTILINE | re.DOTALL,
)


def model_limits() -> dict[str, tuple[int, int]]:
    """model -> (num_layers, the number every valid modelParallel divides), from the shipped configs."""
    from telechat2 import configs
    from telechat2.describe import model_parallel_limit

    limits = {}
    for model in configs.list_models():
        arch = configs.architecture(model)
        limits[model] = (arch.num_layers, model_parallel_limit(arch))
    return limits


def _cel_map(values: dict[str, int]) -> str:
    return "{" + ", ".join(f"'{model}': {value}" for model, value in values.items()) + "}"


def layout_rules() -> list[dict[str, str]]:
    """The CEL rules (on `spec`) a layout must pass for the model it names."""
    limits = model_limits()
    layers = {model: layer_count for model, (layer_count, _) in limits.items()}
    divisors = {model: divisor for model, (_, divisor) in limits.items()}
    listed_layers = ", ".join(f"{model} {count}" for model, count in layers.items())
    listed_divisors = ", ".join(f"{model} {divisor}" for model, divisor in divisors.items())
    return [
        {
            "rule": "!has(self.parallel) || !has(self.parallel.pipelineStage) || "
            f"self.parallel.pipelineStage <= {_cel_map(layers)}[self.model]",
            "fieldPath": ".parallel.pipelineStage",
            "reason": "FieldValueInvalid",
            "message": f"spec.parallel.pipelineStage must not exceed the model's layers ({listed_layers})",
        },
        {
            "rule": "!has(self.parallel) || !has(self.parallel.modelParallel) || "
            f"{_cel_map(divisors)}[self.model] % self.parallel.modelParallel == 0",
            "fieldPath": ".parallel.modelParallel",
            "reason": "FieldValueInvalid",
            "message": "spec.parallel.modelParallel must divide the model's attention heads, KV heads, FFN width and "
            f"vocabulary, i.e. divide: {listed_divisors}",
        },
    ]


def resources_description() -> str:
    """spec.resources' description, with every model's default requests."""
    from telechat2 import configs

    defaults = []
    for model in configs.list_models():
        requests = configs.model_defaults(model).trainer_requests_per_device
        defaults.append(f"{model} {requests.get('cpu', '0')} CPU and {requests.get('memory', '0')} per NPU")
    return (
        "CPU and memory of the training container. huawei.com/Ascend910 is set from devicesPerNode and must not "
        "appear here. Defaults (requests only, from telechat2/configs/catalog.yaml; a resource you set here, in "
        "requests or limits, replaces its default): " + "; ".join(defaults) + "."
    )


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar


def render_block(key: str, indent: str) -> str:
    """The YAML lines of one generated block, markers included."""
    lines = [f"{indent}# BEGIN generated: {key}"]
    if key == "layout-rules":
        for rule in layout_rules():
            lines.append(f"{indent}- rule: {_quoted(rule['rule'])}")
            lines += [f"{indent}  {name}: {_quoted(rule[name])}" for name in ("fieldPath", "reason", "message")]
    elif key == "resources-description":
        lines.append(f"{indent}description: {_quoted(resources_description())}")
    else:
        raise KeyError(f"unknown generated block {key!r}")
    lines.append(f"{indent}# END generated: {key}")
    return "\n".join(lines) + "\n"


def regenerate(text: str) -> str:
    """`text` with every generated block rewritten from the configs."""
    return _BLOCK.sub(lambda m: render_block(m.group("key"), m.group("indent")), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report a drift and exit 1 instead of rewriting")
    parser.add_argument("--crd", type=Path, default=CRD_PATH, help="the TeleChatFinetune CRD file")
    args = parser.parse_args(argv)
    text = args.crd.read_text()
    wanted = regenerate(text)
    if wanted == text:
        return 0
    if args.check:
        print(f"{args.crd}: generated blocks are stale; run python -m telechat_operator.crd_rules", file=sys.stderr)
        return 1
    temporary = args.crd.with_name(f".{args.crd.name}.tmp")
    temporary.write_text(wanted)
    temporary.replace(args.crd)
    print(f"rewrote the generated blocks of {args.crd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`telechat2 describe MODEL`: architecture, exact parameter count and memory per device of a parallel layout.

Pure Python (no MindSpore): the operator and a user sizing a cluster run it anywhere. The parameter count is exact
for the MindFormers research layout the model uses (biases only on attention `wo` and MLP `w2`, untied lm_head,
stacked experts with a per-expert `w2` bias). The memory figure is an estimate of the worst pipeline stage:

- weights: the float32 master parameters (param_init_type), sharded over data parallel by the parallel optimizer;
- gradients: float32, one full copy of the device's parameter shard (gradient_accumulation_shard is off);
- optimizer: AdamW's two float32 moments, sharded like the weights;
- activations: what backward keeps per micro-batch and layer (the layer input only under full recompute, plus one
  layer's working set), times the micro-batches in flight (1F1B: pipeline_stage on the first stage), plus the
  float32 logits and their gradient on the last stage. Tensor-parallel parts divide by model_parallel; norms and
  residuals too when sequence parallel is on.
It leaves out communication buffers, workspace and fragmentation, so treat a result within ~10% of the device as
not fitting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from telechat2 import configs
from telechat2.configuration import TeleChat2Config

DEVICE_MEMORY_BYTES = 64 * 2**30  # one Ascend 910B (Atlas 800T A2) NPU: 64 GB HBM
GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# -- parameters ---------------------------------------------------------------------------------------------------


def layer_parameters(arch: TeleChat2Config) -> dict[str, int]:
    """Parameters of one decoder layer by part."""
    hidden, ffn, kv_width = arch.hidden_size, arch.intermediate_size, arch.n_kv_heads * arch.head_dim
    parts = {
        "attention_norm": hidden,
        "attention": hidden * hidden + 2 * kv_width * hidden + hidden * hidden + hidden,  # wq, wk_v, wo + bias
        "ffn_norm": hidden,
    }
    if arch.is_moe:
        parts["router"] = arch.num_experts * hidden
        parts["experts"] = arch.num_experts * (3 * ffn * hidden + hidden)  # w1, w3, w2 + w2 bias per expert
    else:
        parts["mlp"] = 3 * ffn * hidden + hidden  # w1, w3, w2 + w2 bias
    return parts


def parameter_breakdown(arch: TeleChat2Config) -> dict[str, int]:
    """Exact parameter counts: embedding, all decoder layers, final norm, lm_head."""
    return {
        "embedding": arch.vocab_size * arch.hidden_size,
        "layers": arch.num_layers * sum(layer_parameters(arch).values()),
        "final_norm": arch.hidden_size,
        "lm_head": arch.vocab_size * arch.hidden_size,
    }


def count_parameters(arch: TeleChat2Config) -> int:
    return sum(parameter_breakdown(arch).values())


def active_parameters(arch: TeleChat2Config) -> int:
    """Parameters used per token: for MoE only num_experts_per_tok of the experts."""
    if not arch.is_moe:
        return count_parameters(arch)
    per_expert = 3 * arch.intermediate_size * arch.hidden_size + arch.hidden_size
    idle = arch.num_layers * (arch.num_experts - arch.num_experts_per_tok) * per_expert
    return count_parameters(arch) - idle


# -- layout and memory --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A training layout: MindFormers parallel_config plus the few runner and model settings memory depends on."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    expert_parallel: int = 1
    micro_batch_num: int = 1
    batch_size: int = 1
    seq_length: int = 8192
    recompute: bool = True
    vocab_emb_dp: bool = True
    use_seq_parallel: bool = True
    parallel_optimizer: bool = True

    @property
    def devices(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


def layout_from_config(config: Mapping[str, Any]) -> Layout:
    """Read the layout out of a resolved MindFormers config (e.g. `configs.load_config(model, "finetune")`)."""
    parallel = config.get("parallel_config") or {}
    recompute = (config.get("recompute_config") or {}).get("recompute", False)
    return Layout(
        data_parallel=int(parallel.get("data_parallel", 1)),
        model_parallel=int(parallel.get("model_parallel", 1)),
        pipeline_stage=int(parallel.get("pipeline_stage", 1)),
        expert_parallel=int(parallel.get("expert_parallel", 1)),
        micro_batch_num=int(parallel.get("micro_batch_num", 1)),
        batch_size=int((config.get("runner_config") or {}).get("batch_size", 1)),
        seq_length=int(config["model"]["model_config"]["seq_length"]),
        recompute=bool(recompute),  # a per-stage list (MindFormers' partial recompute) counts as on
        vocab_emb_dp=bool(parallel.get("vocab_emb_dp", True)),
        use_seq_parallel=bool(parallel.get("use_seq_parallel", False)),
        parallel_optimizer=bool((config.get("parallel") or {}).get("enable_parallel_optimizer", False)),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device on the worst pipeline stage."""

    stage: str  # "first", "last" or "only"
    weights: int
    gradients: int
    optimizer: int
    activations: int
    device_bytes: int = DEVICE_MEMORY_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes


def _layer_activation_bytes(arch: TeleChat2Config, layout: Layout) -> tuple[int, int]:
    """(bytes kept per layer and micro-batch without recompute, bytes of the layer input kept under recompute)."""
    tokens = layout.batch_size * layout.seq_length
    mp = layout.model_parallel
    sp = mp if layout.use_seq_parallel else 1
    act = _DTYPE_BYTES.get(arch.compute_dtype, 4)
    hidden, ffn, kv_width = arch.hidden_size, arch.intermediate_size, arch.n_kv_heads * arch.head_dim
    residual = 4 * tokens * hidden / sp  # float32 residual stream at the layer input
    norms = 2 * act * tokens * hidden / sp  # attention_norm and ffn_norm outputs
    qkv = act * tokens * (hidden + 2 * kv_width) / mp
    attention_out = act * tokens * hidden / mp + 4 * tokens * arch.num_heads / mp  # output + softmax statistics
    if not arch.use_flash_attention:  # scores and probabilities are materialised
        attention_out += 2 * act * layout.batch_size * arch.num_heads * layout.seq_length**2 / mp
    if arch.is_moe:
        routed = arch.num_experts_per_tok * arch.capacity_factor  # token copies dispatched to experts
        mlp = 4 * act * tokens * ffn * routed / mp + 2 * act * tokens * hidden * routed / mp
        mlp += 4 * tokens * arch.num_experts  # router probabilities (float32)
    else:
        mlp = 4 * act * tokens * ffn / mp  # gate, up, silu(gate), product
    full = residual * 2 + norms + qkv + attention_out + mlp
    return math.ceil(full), math.ceil(residual)


def estimate_memory(arch: TeleChat2Config, layout: Layout, device_bytes: int = DEVICE_MEMORY_BYTES) -> MemoryEstimate:
    """Memory per device of the worst pipeline stage for finetuning `arch` with `layout` (see module docstring)."""
    mp, pp, ep, dp = layout.model_parallel, layout.pipeline_stage, layout.expert_parallel, layout.data_parallel
    layers_per_stage = math.ceil(arch.num_layers / pp)
    parts = layer_parameters(arch)
    # Per-device share of one layer: tensor-parallel matrices split by mp, experts also by ep; norms, biases and
    # the router are replicated.
    replicated = parts["attention_norm"] + parts["ffn_norm"] + arch.hidden_size + parts.get("router", 0)
    dense = (parts["attention"] - arch.hidden_size) / mp + replicated
    expert = 0.0
    if arch.is_moe:
        expert = arch.num_experts * 3 * arch.intermediate_size * arch.hidden_size / (mp * ep)
        expert += arch.num_experts * arch.hidden_size / ep
    else:
        dense += (parts["mlp"] - arch.hidden_size) / mp + arch.hidden_size
    embedding = arch.vocab_size * arch.hidden_size / (1 if layout.vocab_emb_dp else mp)
    lm_head = arch.vocab_size * arch.hidden_size / mp + arch.hidden_size
    full, kept_under_recompute = _layer_activation_bytes(arch, layout)
    per_layer_kept = kept_under_recompute if layout.recompute else full
    working_set = full if layout.recompute else 0  # one layer recomputed during backward
    logits = 2 * 4 * layout.batch_size * layout.seq_length * arch.vocab_size / mp  # float32 logits + gradient
    param_bytes = _DTYPE_BYTES.get(arch.param_init_type, 4)
    dense_shard = dp if layout.parallel_optimizer else 1
    expert_shard = max(1, dp // ep) if layout.parallel_optimizer else 1

    def stage(first: bool, last: bool, in_flight: int) -> MemoryEstimate:
        dense_params = layers_per_stage * dense + (embedding if first else 0) + (lm_head if last else 0)
        expert_params = layers_per_stage * expert
        params = dense_params + expert_params
        sharded = dense_params / dense_shard + expert_params / expert_shard
        activations = in_flight * layers_per_stage * per_layer_kept + working_set + (logits if last else 0)
        return MemoryEstimate(
            stage="only" if first and last else ("first" if first else "last"),
            weights=math.ceil(param_bytes * sharded),
            gradients=math.ceil(4 * params),
            optimizer=math.ceil(8 * sharded),
            activations=math.ceil(activations),
            device_bytes=device_bytes,
        )

    if pp == 1:
        return stage(True, True, 1)
    candidates = [stage(True, False, min(pp, layout.micro_batch_num)), stage(False, True, 1)]
    return max(candidates, key=lambda estimate: estimate.total)


# -- planning -----------------------------------------------------------------------------------------------------

# A planned layout must leave this share of the device free: the estimate leaves out communication buffers,
# workspace and fragmentation (see the module docstring). A layout given in full, or the model's own default, is
# only required to fit the device.
PLAN_FIT_FRACTION = 0.9
LAYOUT_SOURCES = ("Spec", "ModelDefault", "Planned")


@dataclass(frozen=True)
class LayoutPlan:
    """The layout chosen for a device count, its memory estimate, and where it came from (LAYOUT_SOURCES)."""

    layout: Layout
    memory: MemoryEstimate
    source: str


def model_parallel_limit(arch: TeleChat2Config) -> int:
    """The largest model_parallel the architecture can split: every valid degree divides this number."""
    return math.gcd(arch.num_heads, arch.n_kv_heads, arch.intermediate_size, arch.vocab_size)


def layout_problems(arch: TeleChat2Config, layout: Layout) -> list[str]:
    """Why the architecture cannot take the layout (empty when it can); each problem names the MindFormers key."""
    problems = []
    mp, pp = layout.model_parallel, layout.pipeline_stage
    for what, size in (
        ("num_heads", arch.num_heads),
        ("n_kv_heads", arch.n_kv_heads),
        ("intermediate_size", arch.intermediate_size),
        ("vocab_size", arch.vocab_size),
    ):
        if size % mp:
            problems.append(f"model_parallel {mp} does not divide {what} {size}")
    if pp > arch.num_layers:
        problems.append(f"pipeline_stage {pp} exceeds num_layers {arch.num_layers}")
    if pp > 1 and layout.micro_batch_num < pp:
        problems.append(f"micro_batch_num {layout.micro_batch_num} must be >= pipeline_stage {pp}")
    ep = layout.expert_parallel
    if ep > 1 and (not arch.is_moe or arch.num_experts % ep or layout.data_parallel % ep):
        problems.append(f"expert_parallel {ep} must divide num_experts {arch.num_experts} and data_parallel")
    return problems


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _completed(base: Layout, arch: TeleChat2Config, dp: int, mp: int, pp: int, micro: int | None) -> Layout:
    """`base` with the three degrees set: micro-batches at least the stages, experts split as far as dp allows."""
    if micro is None:
        micro = max(base.micro_batch_num, pp) if pp > 1 else 1
    expert = math.gcd(base.expert_parallel, dp) if arch.is_moe else 1
    return dataclasses.replace(
        base, data_parallel=dp, model_parallel=mp, pipeline_stage=pp, micro_batch_num=micro, expert_parallel=expert
    )


def plan_layout(
    arch: TeleChat2Config,
    base: Layout,
    devices: int,
    devices_per_node: int,
    fixed: Mapping[str, int] | None = None,
    device_bytes: int = DEVICE_MEMORY_BYTES,
) -> LayoutPlan:
    """Complete a partial layout for `devices` NPUs so that it fits device memory.

    `base` is the model's default layout (its finetune config, with the run's seq_length and batch_size); `fixed`
    holds the degrees the user set (data_parallel, model_parallel, pipeline_stage, micro_batch_num). With all three
    degrees fixed the layout is the user's (source Spec, estimated, never replaced). Otherwise the model's default
    completed by the fixed degrees is kept when it has the right device count, suits the architecture and fits
    (ModelDefault); failing that, every split dp x mp x pp = devices with model_parallel within one node and the
    fixed degrees kept is estimated, and the least-sharded one that fits with PLAN_FIT_FRACTION headroom wins
    (fewest mp x pp, then fewest pipeline stages: data parallelism is the cheapest to communicate). ConfigError
    (the message says why and what to change) when nothing fits.
    """
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - {"data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"})
    if unknown:
        raise configs.ConfigError(f"unknown layout key(s) {', '.join(unknown)}")
    degrees = ("data_parallel", "model_parallel", "pipeline_stage")
    micro = fixed.get("micro_batch_num")
    if all(key in fixed for key in degrees):
        layout = _completed(base, arch, *(fixed[key] for key in degrees), micro)
        return LayoutPlan(layout, estimate_memory(arch, layout, device_bytes), "Spec")
    default = _completed(base, arch, *(fixed.get(key, getattr(base, key)) for key in degrees), micro)
    if default.devices == devices and not layout_problems(arch, default):
        memory = estimate_memory(arch, default, device_bytes)
        if memory.fits:
            return LayoutPlan(default, memory, "ModelDefault")
    candidates: list[tuple[Layout, MemoryEstimate]] = []
    for mp in _divisors(math.gcd(devices, model_parallel_limit(arch), max(devices_per_node, 1))):
        if fixed.get("model_parallel", mp) != mp:
            continue
        for pp in _divisors(devices // mp):
            dp = devices // (mp * pp)
            if pp > arch.num_layers or fixed.get("pipeline_stage", pp) != pp or fixed.get("data_parallel", dp) != dp:
                continue
            layout = _completed(base, arch, dp, mp, pp, micro)
            if not layout_problems(arch, layout):
                candidates.append((layout, estimate_memory(arch, layout, device_bytes)))
    given = ", ".join(f"{key} {value}" for key, value in sorted(fixed.items())) or "no degree fixed"
    if not candidates:
        raise configs.ConfigError(
            f"no dp x mp x pp split of {devices} device(s) suits the model ({given}; model_parallel must divide "
            f"{model_parallel_limit(arch)} and fit one node of {devices_per_node}, pipeline_stage at most "
            f"{arch.num_layers})"
        )
    candidates.sort(key=lambda c: (c[0].model_parallel * c[0].pipeline_stage, c[0].pipeline_stage))
    for fraction in (PLAN_FIT_FRACTION, 1.0):
        for layout, memory in candidates:
            if memory.total <= fraction * device_bytes:
                return LayoutPlan(layout, memory, "Planned")
    smallest_layout, smallest = min(candidates, key=lambda c: c[1].total)
    raise configs.ConfigError(
        f"no layout of {devices} device(s) fits {device_bytes / GIB:.0f} GiB per NPU ({given}): the smallest "
        f"estimate is {smallest.total / GIB:.1f} GiB with dp {smallest_layout.data_parallel} x mp "
        f"{smallest_layout.model_parallel} x pp {smallest_layout.pipeline_stage}; add nodes, shorten seqLength or "
        "lower batchSize"
    )


def base_layout(model: str, seq_length: int | None = None, batch_size: int | None = None) -> Layout:
    """The model's default finetune layout, with a run's sequence length and batch size when given."""
    layout = layout_from_config(configs.load_config(model, "finetune"))
    changes = {k: v for k, v in (("seq_length", seq_length), ("batch_size", batch_size)) if v is not None}
    return dataclasses.replace(layout, **changes)


# -- report -------------------------------------------------------------------------------------------------------


def describe(model: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything `telechat2 describe` prints, as JSON-ready data. Overrides are render_config-style (validated)."""
    config = configs.deep_merge(configs.load_config(model, "finetune"), dict(overrides or {}))
    arch = configs.validate_config(config, "finetune")
    layout = layout_from_config(config)
    memory = estimate_memory(arch, layout)
    defaults = configs.model_defaults(model)
    architecture = {k: v for k, v in dataclasses.asdict(arch).items() if k != "extra"}
    architecture["head_dim"] = arch.head_dim
    report: dict[str, Any] = {
        "model": model,
        "architecture": architecture,
        "parameters": count_parameters(arch),
        "active_parameters": active_parameters(arch),
        "parameter_breakdown": parameter_breakdown(arch),
        "layout": {
            **dataclasses.asdict(layout),
            "devices": layout.devices,
            "nodes": max(1, math.ceil(layout.devices / defaults.devices_per_node)),
            "devices_per_node": defaults.devices_per_node,
        },
        "memory": {
            "stage": memory.stage,
            "weights_bytes": memory.weights,
            "gradients_bytes": memory.gradients,
            "optimizer_bytes": memory.optimizer,
            "activations_bytes": memory.activations,
            "total_bytes": memory.total,
            "device_bytes": memory.device_bytes,
            "fits": memory.fits,
        },
    }
    return report


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f} {suffix})"
    return f"{n:,}"


def _size(n: float) -> str:
    for scale, suffix in ((GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n:.0f} B"


def format_report(report: Mapping[str, Any]) -> str:
    arch, layout, memory = report["architecture"], report["layout"], report["memory"]
    kv = f"{arch['n_kv_heads']} KV heads" + (" (GQA)" if arch["n_kv_heads"] < arch["num_heads"] else "")
    lines = [
        f"{report['model']}",
        f"  layers {arch['num_layers']}, hidden {arch['hidden_size']}, heads {arch['num_heads']}, {kv}, "
        f"head_dim {arch['head_dim']}, ffn {arch['intermediate_size']}"
        + (" per expert" if arch["num_experts"] else "")
        + f", vocab {arch['vocab_size']}, seq_length {arch['seq_length']}",
    ]
    if arch["num_experts"]:
        lines.append(f"  experts {arch['num_experts']}, top-{arch['num_experts_per_tok']} per token")
    lines.append(f"parameters: {_count(report['parameters'])}")
    if report["active_parameters"] != report["parameters"]:
        lines.append(f"active parameters per token: {_count(report['active_parameters'])}")
    lines.append(
        "  " + ", ".join(f"{name} {count:,}" for name, count in report["parameter_breakdown"].items()),
    )
    lines.append(
        f"layout: dp {layout['data_parallel']} x mp {layout['model_parallel']} x pp {layout['pipeline_stage']}"
        + (f" (ep {layout['expert_parallel']})" if layout["expert_parallel"] > 1 else "")
        + f" = {layout['devices']} device(s) on {layout['nodes']} node(s) of {layout['devices_per_node']}, "
        f"micro_batch_num {layout['micro_batch_num']}, batch_size {layout['batch_size']}, "
        f"seq_length {layout['seq_length']}, recompute {'on' if layout['recompute'] else 'off'}, "
        f"parallel optimizer {'on' if layout['parallel_optimizer'] else 'off'}"
    )
    stage = {"only": "", "first": " (first pipeline stage)", "last": " (last pipeline stage)"}[memory["stage"]]
    lines.append(f"memory per device, estimate{stage}:")
    for label, key in (
        ("weights (fp32 master)", "weights_bytes"),
        ("gradients (fp32)", "gradients_bytes"),
        ("optimizer (AdamW m, v)", "optimizer_bytes"),
        ("activations", "activations_bytes"),
        ("total", "total_bytes"),
    ):
        lines.append(f"  {label:<24}{_size(memory[key]):>10}")
    device = memory["device_bytes"] / GIB
    if memory["fits"]:
        lines.append(f"fits a {device:.0f} GiB NPU ({_size(memory['device_bytes'] - memory['total_bytes'])} free)")
    else:
        lines.append(
            f"DOES NOT FIT a {device:.0f} GiB NPU: needs {_size(memory['total_bytes'])}; "
            "raise model_parallel / pipeline_stage, enable recompute, or shorten seq_length"
        )
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------------------------------------

_LAYOUT_FLAGS = {
    "dp": "data_parallel",
    "mp": "model_parallel",
    "pp": "pipeline_stage",
    "ep": "expert_parallel",
    "micro_batch": "micro_batch_num",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=configs.MODELS, metavar="MODEL", help=", ".join(configs.MODELS))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    layout = parser.add_argument_group("layout (defaults: the model's finetune config)")
    layout.add_argument("--dp", type=int, help="data_parallel")
    layout.add_argument("--mp", type=int, help="model_parallel")
    layout.add_argument("--pp", type=int, help="pipeline_stage")
    layout.add_argument("--ep", type=int, help="expert_parallel (MoE)")
    layout.add_argument("--micro-batch", "--micro_batch_num", dest="micro_batch", type=int, help="micro_batch_num")
    layout.add_argument("--seq-length", "--seq_length", dest="seq_length", type=int, help="sequence length")
    layout.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="micro-batch size")
    layout.add_argument(
        "--recompute", action=argparse.BooleanOptionalAction, default=None, help="full activation recompute"
    )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    parallel = {key: getattr(args, flag) for flag, key in _LAYOUT_FLAGS.items() if getattr(args, flag) is not None}
    if parallel:
        overrides["parallel_config"] = parallel
    if args.seq_length is not None:
        overrides["model"] = {"model_config": {"seq_length": args.seq_length}}
    if args.batch_size is not None:
        overrides["runner_config"] = {"batch_size": args.batch_size}
    if args.recompute is not None:
        overrides["recompute_config"] = {"recompute": args.recompute}
    return overrides


def run(args: argparse.Namespace) -> int:
    try:
        report = describe(args.model, overrides_from_args(args))
    except configs.ConfigError as exc:
        print(f"telechat2 describe: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

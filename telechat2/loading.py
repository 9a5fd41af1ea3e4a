"""Model loading: run config (YAML or model name) -> architecture -> TeleChat2ForCausalLM with a checked checkpoint.

Library code shared by `telechat2 predict`, `telechat2 serve` and `telechat2.tensor_parallel`; it imports none of
them, so they all import it without a cycle. MindSpore is imported only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from telechat2.configuration import TeleChat2Config

if TYPE_CHECKING:
    from telechat2.tensor_parallel import TensorParallel

_MODEL_PREFIXES = ("model.", "lm_head.")  # checkpoint keys that belong to the network (the rest: optimizer state)


# -- configuration ----------------------------------------------------------------------------------------------------


def read_run_config(config: str) -> dict[str, Any]:
    """The YAML mapping at path `config`, or the rendered predict config of the model named `config`."""
    from telechat2 import configs  # no MindSpore import

    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"--config {config}: no such YAML file")
        document = configs.load_yaml_with_bases(path)  # resolves base_config like MindFormers
        if not isinstance((document.get("model") or {}).get("model_config"), dict):
            raise ValueError(f"--config {config}: a MindFormers YAML needs a model.model_config mapping")
        return document
    return configs.load_config(config, "predict")


def architecture_from(run_config: dict[str, Any], seq_length: int | None = None) -> TeleChat2Config:
    """TeleChat2Config from a run config's model.model_config, optionally with another seq_length."""
    model_config = {k: v for k, v in run_config["model"]["model_config"].items() if k != "type"}
    arch = TeleChat2Config.from_model_config(model_config)
    return dataclasses.replace(arch, seq_length=seq_length) if seq_length else arch


# -- model loading ----------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A .ckpt file, or the newest .ckpt in a directory (rank_0/ first, as finetune and merge write them)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        search_dir = path / "rank_0" if (path / "rank_0").is_dir() else path
        candidates = sorted(search_dir.glob("*.ckpt"), key=lambda p: (p.stat().st_mtime, p.name))
        if candidates:
            return candidates[-1]
        raise FileNotFoundError(f"checkpoint directory {path} holds no .ckpt file")
    raise FileNotFoundError(f"checkpoint {path} does not exist")


def check_checkpoint_matches(
    path: Path, saved: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """Refuse a checkpoint whose model parameters (names and shapes) are not exactly the model's, naming them all."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(n for n in saved if n.startswith(_MODEL_PREFIXES) and n not in expected)
    mis_shaped = [
        f"{name} {saved[name]} != {shape}" for name, shape in expected.items() if name in saved and saved[name] != shape
    ]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if any("w_qkv" in name for name in missing + unexpected):
        problems.append("the attention layouts differ: set model_config.qkv_concat to the checkpoint's layout")
    if problems:
        raise ValueError(f"checkpoint {path} does not match the model: " + "; ".join(problems))


def load_checkpoint_into(model, checkpoint: str | Path) -> Path:
    """Load a full checkpoint into `model`, refusing missing, unknown or mis-shaped parameters (all named)."""
    import mindspore as ms

    path = resolve_checkpoint(checkpoint)
    try:
        saved = ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError for corrupt files
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    expected = dict(model.parameters_and_names())
    check_checkpoint_matches(
        path, {n: tuple(t.shape) for n, t in saved.items()}, {n: tuple(p.shape) for n, p in expected.items()}
    )
    params = {name: _as_dtype(saved[name], param.dtype, name) for name, param in expected.items()}
    not_loaded, _ = ms.load_param_into_net(model, params, strict_load=True)
    if not_loaded:
        raise ValueError(f"checkpoint {path}: parameters not loaded: {', '.join(not_loaded)}")
    return path


def _as_dtype(value, dtype, name: str):
    """A bfloat16/float16 checkpoint loads into a float32 model (and back): cast instead of failing."""
    import mindspore as ms

    return value if value.dtype == dtype else ms.Parameter(value.astype(dtype), name=name)


def load_model(
    config: str, checkpoint: str | None, seq_length: int | None = None, tensor_parallel: TensorParallel | None = None
):
    """Build TeleChat2ForCausalLM from a YAML path or model name and load `checkpoint` (None = random weights).

    Switches MindSpore to PyNative mode (generation feeds a new shape each step). Off Ascend, the fused Ascend
    kernels are turned off and the compute dtype is float32, whatever the YAML asks (bfloat16 is an NPU choice).
    With `tensor_parallel` (a `TensorParallel` place of size > 1, under msrun) this rank builds
    its share of the model and reads only its slices of the full checkpoint.
    """
    import mindspore as ms

    from telechat2.modeling import TeleChat2ForCausalLM

    ms.set_context(mode=ms.PYNATIVE_MODE)
    arch = architecture_from(read_run_config(config), seq_length)
    if ms.get_context("device_target") != "Ascend":
        arch = dataclasses.replace(arch, use_flash_attention=False, use_fused_rms_norm=False, compute_dtype="float32")
    if tensor_parallel is not None and tensor_parallel.size > 1:
        return load_tensor_parallel_model(arch, checkpoint, tensor_parallel)
    model = TeleChat2ForCausalLM(arch)
    if checkpoint:
        load_checkpoint_into(model, checkpoint)
    model.set_train(False)
    return model


# -- tensor parallel: each rank reads its slices of the full checkpoint --------------------------------------------


def load_sharded_checkpoint(model: Any, checkpoint: str | Path, tp: TensorParallel) -> Path:
    """Load this rank's slices of a full (merged) checkpoint into a tensor-parallel `model`.

    The checkpoint must hold exactly the single-device model's parameters (same names and full shapes; optimizer
    state is ignored); missing, unexpected and mis-shaped tensors are refused, all named. Tensors are read one at
    a time with `CkptReader`, and row splits read only this rank's rows.
    """
    from mindspore import Tensor

    from telechat2.checkpoint_io import CheckpointError, CkptReader
    from telechat2.tensor_parallel import read_shard, shard_of
    from telechat2.weights import ms_shapes

    config: TeleChat2Config = model.architecture
    path = resolve_checkpoint(checkpoint)
    try:
        reader = CkptReader(path)
    except (CheckpointError, OSError) as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    expected = ms_shapes(config, config.qkv_concat)
    params = dict(model.parameters_and_names())
    if set(params) != set(expected):  # guards this module against a layout change in modeling / weights
        raise AssertionError(f"tensor-parallel model and weights.ms_shapes disagree: {set(params) ^ set(expected)}")
    check_checkpoint_matches(path, {n: tuple(e.shape) for n, e in reader.entries.items()}, expected)
    for name, param in params.items():
        shard = shard_of(name, expected[name], config, tp.size)
        local = read_shard(reader, name, shard, tp.rank, tp.size)
        if tuple(local.shape) != tuple(param.shape):
            raise AssertionError(f"{name}: slice {local.shape} != parameter {param.shape}")
        param.set_data(Tensor(local).astype(param.dtype))  # a bfloat16 checkpoint loads into float32 too
    return path


def load_tensor_parallel_model(config: TeleChat2Config, checkpoint: str | None, tp: TensorParallel):
    """The tensor-parallel network for `config` on this rank, with its slices of `checkpoint` (None = random)."""
    from telechat2.tensor_parallel import build_model

    model = build_model(config, tp)
    if checkpoint:
        load_sharded_checkpoint(model, checkpoint, tp)
    model.set_train(False)
    return model

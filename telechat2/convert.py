"""`telechat2 convert`: Hugging Face (torch) TeleChat2 weights -> one MindSpore checkpoint, streaming.

Reads safetensors with `safe_open(framework="np")` (no torch needed) or, when torch is installed, `pytorch_model*.bin`
(memory-mapped). The tensor names, shapes and layouts come from `telechat2.weights.conversion_plan`; everything is
checked against the architecture (from `config.json` in the torch directory, or `--model`) before a byte is
written, and every missing, unexpected or mis-shaped tensor is named. A tensor holding NaN or Inf (or overflowing
the requested --dtype) fails the conversion naming it, as `telechat2 merge` does; no output file is left. Tensors
are read and written one at a time, so peak memory is about the largest single tensor whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from telechat2.checkpoint_io import ST_TO_NP, CheckpointError, CkptWriter, check_finite, numpy_dtype
from telechat2.configuration import TeleChat2Config
from telechat2.weights import Piece, TensorPlan, architecture_from_hf_config, conversion_plan, hf_shapes

DTYPES = ("float32", "bfloat16", "float16", "keep")
# Buffers some Hugging Face checkpoints carry that the model recomputes; skipped rather than reported as unexpected.
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)


def str2bool(value: str | bool) -> bool:
    """The seed's `--qkv_concat True/False` spelling, and a bare `--qkv_concat` flag."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_architecture_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="model name (telechat2-7b, ..., telechat2-tiny) giving the architecture when no config.json is at hand",
    )
    parser.add_argument("--config_json", "--config-json", help="a Hugging Face config.json giving the architecture")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--torch_path", "--torch-path", required=True, help="directory of the Hugging Face weights")
    parser.add_argument("--mindspore_path", "--mindspore-path", required=True, help="MindSpore checkpoint to write")
    parser.add_argument(
        "--qkv_concat",
        "--qkv-concat",
        nargs="?",
        const=True,
        default=False,
        type=str2bool,
        help="write the qkv_concat layout (w_qkv, w_gate_hidden) used by parallel inference",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype of the output tensors (default float32, as the seed)"
    )
    add_architecture_arguments(parser)
    from telechat2.completion import add_completion_arguments

    add_completion_arguments(parser)


def convert_inputs(args: argparse.Namespace) -> dict:
    """What the checkpoint depends on: the Hugging Face files (weights and config.json) and the settings."""
    from telechat2 import completion

    directory = Path(args.torch_path)
    if not directory.is_dir():
        raise CheckpointError(f"--torch_path {directory} is not a directory")
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    )
    return completion.describe_inputs(
        files,
        command="convert",
        qkv_concat=bool(args.qkv_concat),
        dtype=args.dtype,
        model=args.model,
        config_json=args.config_json,
    )


def resolve_architecture(model: str | None, config_json: str | Path | None) -> TeleChat2Config:
    """The architecture from a config.json (preferred: it describes these very weights) or a model name."""
    if config_json is not None and Path(config_json).is_file():
        try:
            return architecture_from_hf_config(json.loads(Path(config_json).read_text()))
        except (ValueError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{config_json}: {err}") from err
    if model:
        from telechat2.configs import architecture

        return architecture(model)
    raise CheckpointError(
        "the architecture is unknown: put the Hugging Face config.json in the torch directory, "
        "or pass --config_json FILE or --model NAME"
    )


class HFSource:
    """The tensors of a Hugging Face checkpoint directory: names, shapes and dtypes from the file headers;
    data read one tensor at a time."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"--torch_path {self.directory} is not a directory")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._file_of: dict[str, Path] = {}
        self._torch_states: dict[Path, dict] = {}
        files = sorted(self.directory.glob("*.safetensors"))
        if files:
            self._index_safetensors(files)
        else:
            bins = sorted(self.directory.glob("pytorch_model*.bin"))
            if not bins:
                raise CheckpointError(f"no *.safetensors or pytorch_model*.bin files in {self.directory}")
            self._index_torch(bins)

    def _add(self, name: str, shape: tuple[int, ...], dtype: str, path: Path) -> None:
        if name in self._file_of:
            raise CheckpointError(f"tensor {name} is in both {self._file_of[name].name} and {path.name}")
        self.shapes[name], self.dtypes[name], self._file_of[name] = shape, dtype, path

    def _index_safetensors(self, files: list[Path]) -> None:
        from safetensors import safe_open

        for path in files:
            try:
                with safe_open(str(path), framework="np") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        piece = f.get_slice(name)
                        dtype = ST_TO_NP.get(piece.get_dtype())
                        if dtype is None:
                            raise CheckpointError(
                                f"{path.name}: tensor {name} has unsupported dtype {piece.get_dtype()}"
                            )
                        self._add(name, tuple(piece.get_shape()), dtype, path)
            except CheckpointError:
                raise
            except Exception as err:  # the safetensors library raises its own error types
                raise CheckpointError(f"cannot read {path}: {err}") from err

    def _index_torch(self, files: list[Path]) -> None:
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{self.directory} holds pytorch_model*.bin files, which need torch (not installed): "
                "install torch, or convert them to safetensors first"
            ) from None
        for path in files:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            self._torch_states[path] = state
            for name, tensor in state.items():
                self._add(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), path)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def read(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        if path in self._torch_states:
            return _torch_to_numpy(self._torch_states[path][name])
        if self.dtypes[name] == "bfloat16":
            numpy_dtype("bfloat16")  # numpy must know bfloat16 before safetensors hands one over
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(name)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
    return tensor.numpy()


def check_source(source: HFSource, config: TeleChat2Config) -> None:
    """Every expected tensor present with its shape, nothing unexpected; all problems in one error."""
    expected = hf_shapes(config)
    present = {n for n in source.shapes if not n.endswith(RECOMPUTED_BUFFERS)}
    missing = [n for n in expected if n not in present]
    unexpected = sorted(present - expected.keys())
    misshaped = [
        f"{n} is {list(source.shapes[n])}, expected {list(expected[n])}"
        for n in expected
        if n in present and source.shapes[n] != expected[n]
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title} tensor(s):\n    {shown}")
    if problems:
        raise CheckpointError(
            f"{source.directory} does not match the architecture (hidden {config.hidden_size}, "
            f"{config.num_layers} layers, {config.num_heads} heads, {config.n_kv_heads} KV heads, "
            f"{config.num_experts} experts):\n  " + "\n  ".join(problems)
        )


def piece_values(array: np.ndarray, piece: Piece, config: TeleChat2Config) -> np.ndarray:
    """Cut a piece out of its Hugging Face tensor; K/V halves come from the per-KV-head interleaved key_value."""
    if piece.op == "copy":
        return array
    grouped = array.reshape(config.n_kv_heads, 2, config.head_dim, *array.shape[1:])
    half = grouped[:, 0 if piece.op == "k_of_kv" else 1]
    return half.reshape(config.n_kv_heads * config.head_dim, *array.shape[1:])


def output_dtype(requested: str, tensor: TensorPlan, source: HFSource) -> np.dtype:
    if requested != "keep":
        return numpy_dtype(requested)
    kinds = {source.dtypes[p.hf_name] for p in tensor.pieces}
    if len(kinds) != 1:
        raise CheckpointError(f"{tensor.ms_name}: pieces have dtypes {sorted(kinds)}; pass --dtype")
    return numpy_dtype(kinds.pop())


def convert_hf_to_ms(
    torch_path: str | Path,
    mindspore_path: str | Path,
    config: TeleChat2Config,
    qkv_concat: bool = False,
    dtype: str = "float32",
    progress: bool = False,
) -> dict:
    """Convert, checking first; returns a summary {tensors, bytes, seconds}. Nothing is left behind on error."""
    started = time.monotonic()
    source = HFSource(torch_path)
    check_source(source, config)
    plan = conversion_plan(config, qkv_concat)
    if any(source.dtypes[p.hf_name] == "bfloat16" for t in plan for p in t.pieces) or dtype == "bfloat16":
        numpy_dtype("bfloat16")
    cache: dict[str, np.ndarray] = {}  # the one Hugging Face tensor in hand (key_value feeds both K and V)

    def chunks(tensor: TensorPlan, out_dtype: np.dtype) -> Iterator[np.ndarray]:
        for piece in tensor.pieces:
            if piece.hf_name not in cache:
                cache.clear()
                cache[piece.hf_name] = source.read(piece.hf_name)
            values = piece_values(cache[piece.hf_name], piece, config)
            with np.errstate(over="ignore"):  # an overflowing cast is reported by check_finite, naming the tensor
                out = values if values.dtype == out_dtype else values.astype(out_dtype)
            where = f"{piece.hf_name} (in {source.file_of(piece.hf_name).name}, for {tensor.ms_name})"
            check_finite(where, values, out)
            yield out
        cache.clear()

    total = 0
    items = plan
    if progress:
        from tqdm import tqdm

        items = tqdm(plan, desc="convert", unit="tensor")
    with CkptWriter(mindspore_path) as writer:
        for tensor in items:
            out_dtype = output_dtype(dtype, tensor, source)
            writer.write(tensor.ms_name, tensor.ms_shape, out_dtype, chunks(tensor, out_dtype))
            total += int(np.prod(tensor.ms_shape)) * out_dtype.itemsize
    return {"tensors": len(plan), "bytes": total, "seconds": round(time.monotonic() - started, 3)}


def run(args: argparse.Namespace) -> int:
    from telechat2 import completion

    try:
        inputs = convert_inputs(args)
        if args.skip_if_complete and completion.is_complete(args.mindspore_path, inputs):
            marker = completion.marker_path(args.mindspore_path)
            print(f"{args.mindspore_path} is complete for these inputs ({marker}): nothing to do")
            return 0
        completion.invalidate(args.mindspore_path)
        if args.config_json and not Path(args.config_json).is_file():
            raise CheckpointError(f"--config_json {args.config_json} does not exist")
        config = resolve_architecture(args.model, args.config_json or Path(args.torch_path) / "config.json")
        summary = convert_hf_to_ms(
            args.torch_path, args.mindspore_path, config, args.qkv_concat, args.dtype, progress=True
        )
        completion.write_marker(args.mindspore_path, inputs, [Path(args.mindspore_path)])
    except (CheckpointError, OSError) as err:
        print(f"telechat2 convert: error: {err}", file=sys.stderr)
        completion.write_termination_message(args.termination_message_path, f"telechat2 convert: {err}")
        return 1
    layout = "qkv_concat" if args.qkv_concat else "kv_concat"
    print(
        f"wrote {args.mindspore_path}: {summary['tensors']} tensors, {summary['bytes'] / 1e9:.3f} GB, "
        f"layout {layout}, dtype {args.dtype}, {summary['seconds']} s"
    )
    return 0

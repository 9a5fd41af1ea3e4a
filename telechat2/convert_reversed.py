"""`telechat2 convert-reversed`: a MindSpore TeleChat2 checkpoint -> Hugging Face safetensors, streaming.

The inverse of `telechat2 convert` through the same plan (`telechat2.weights.conversion_plan`): each Hugging Face
tensor is read back from its place in the MindSpore tensor (one expert of a stacked tensor, the K and V runs of
w_qkv re-interleaved per KV head, ...). The layout (kv_concat or qkv_concat) is detected from the names. Training
state a finetuned checkpoint carries (optimizer moments, step counters) is skipped and counted.

Output follows Hugging Face: `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
`model.safetensors.index.json` when larger than --max_shard_size, and a `config.json`. A tensor holding NaN or Inf
(or overflowing the requested --dtype) fails the conversion naming it; nothing is left behind. It is written into a
temporary sibling directory and renamed into place at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from telechat2.checkpoint_io import (
    CheckpointError,
    CkptReader,
    SafetensorsSpec,
    SafetensorsWriter,
    check_finite,
    numpy_dtype,
)
from telechat2.configuration import TeleChat2Config
from telechat2.convert import add_architecture_arguments, resolve_architecture
from telechat2.weights import conversion_plan, hf_config_dict, hf_shapes, piece_shape

MODEL_PREFIXES = ("model.", "lm_head.")  # everything else in a training checkpoint is optimizer/step state


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mindspore_path", "--mindspore-path", required=True, help="MindSpore checkpoint to read")
    parser.add_argument(
        "--torch_path", "--torch-path", required=True, help="directory to write (must not hold weights)"
    )
    parser.add_argument(
        "--dtype",
        choices=("keep", "float32", "bfloat16", "float16"),
        default="keep",
        help="output dtype (default keep)",
    )
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB")
    add_architecture_arguments(parser)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal, as Hugging Face), '2GiB' -> 2**31, '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise CheckpointError(f"--max_shard_size {text!r} is not a size like 5GB or 500MB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    return int(number * scale[unit])


def detect_qkv_concat(reader: CkptReader) -> bool:
    return any(name.endswith("attention.w_qkv.weight") for name in reader.entries)


def check_checkpoint(reader: CkptReader, config: TeleChat2Config, qkv_concat: bool) -> list[str]:
    """All model tensors present and well shaped; returns the skipped training-state names."""
    expected = {t.ms_name: t.ms_shape for t in conversion_plan(config, qkv_concat)}
    model_names = [n for n in reader.entries if n.startswith(MODEL_PREFIXES)]
    skipped = [n for n in reader.entries if not n.startswith(MODEL_PREFIXES)]
    missing = [n for n in expected if n not in reader.entries]
    unexpected = [n for n in model_names if n not in expected]
    misshaped = [
        f"{n} is {list(reader.entries[n].shape)}, expected {list(shape)}"
        for n, shape in expected.items()
        if n in reader.entries and reader.entries[n].shape != shape
    ]
    problems = [
        f"{len(items)} {title} tensor(s):\n    " + "\n    ".join(items[:20])
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise CheckpointError(
            f"{reader.path} does not match the architecture (hidden {config.hidden_size}, {config.num_layers} "
            f"layers, {config.n_kv_heads} KV heads, {config.num_experts} experts, "
            f"{'qkv_concat' if qkv_concat else 'kv_concat'} layout):\n  " + "\n  ".join(problems)
        )
    return skipped


def hf_locations(config: TeleChat2Config, qkv_concat: bool) -> dict[str, list[tuple[str, int, tuple[int, ...], str]]]:
    """For each Hugging Face tensor: (MindSpore name, flat offset, piece shape, op) of each of its pieces."""
    shapes = hf_shapes(config)
    where: dict[str, list[tuple[str, int, tuple[int, ...], str]]] = {}
    for tensor in conversion_plan(config, qkv_concat):
        offset = 0
        for piece in tensor.pieces:
            shape = piece_shape(piece, shapes[piece.hf_name], config)
            where.setdefault(piece.hf_name, []).append((tensor.ms_name, offset, shape, piece.op))
            offset += math.prod(shape)
    return where


def assemble(reader: CkptReader, pieces: list[tuple[str, int, tuple[int, ...], str]], config: TeleChat2Config):
    """One Hugging Face tensor from its pieces; separate K and V runs are interleaved back per KV head."""
    values = {op: reader.read_flat(name, offset, math.prod(shape)).reshape(shape) for name, offset, shape, op in pieces}
    if "copy" in values:
        return values["copy"]
    n_kv, head_dim = config.n_kv_heads, config.head_dim
    k = values["k_of_kv"].reshape(n_kv, 1, head_dim, -1)
    v = values["v_of_kv"].reshape(n_kv, 1, head_dim, -1)
    return np.concatenate([k, v], axis=1).reshape(2 * n_kv * head_dim, -1)


def plan_shards(specs: list[SafetensorsSpec], max_bytes: int) -> list[list[SafetensorsSpec]]:
    shards: list[list[SafetensorsSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def convert_ms_to_hf(
    mindspore_path: str | Path,
    torch_path: str | Path,
    config: TeleChat2Config,
    dtype: str = "keep",
    max_shard_bytes: int = 5 * 10**9,
    hf_config: dict | None = None,
    progress: bool = False,
) -> dict:
    """Convert, checking first; returns a summary. `torch_path` appears only when complete."""
    started = time.monotonic()
    reader = CkptReader(mindspore_path)
    qkv_concat = detect_qkv_concat(reader)
    skipped = check_checkpoint(reader, config, qkv_concat)
    target = Path(torch_path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise CheckpointError(f"--torch_path {target} exists and is not an empty directory; choose a new one")
    locations = hf_locations(config, qkv_concat)
    first_piece_dtype = {n: reader.entries[p[0][0]].dtype for n, p in locations.items()}
    out_dtype = {n: (numpy_dtype(dtype) if dtype != "keep" else d) for n, d in first_piece_dtype.items()}
    specs = [SafetensorsSpec(n, s, out_dtype[n]) for n, s in hf_shapes(config).items()]
    shards = plan_shards(specs, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(specs), desc="convert-reversed", unit="tensor")
        weight_map = {}
        for file_name, shard in zip(names, shards, strict=True):
            with SafetensorsWriter(staging / file_name, shard) as writer:
                for spec in shard:
                    array = assemble(reader, locations[spec.name], config)
                    with np.errstate(over="ignore"):  # an overflowing cast is reported by check_finite
                        out = array if array.dtype == spec.dtype else array.astype(spec.dtype)
                    sources = ", ".join(dict.fromkeys(ms_name for ms_name, *_ in locations[spec.name]))
                    check_finite(f"{spec.name} (from {sources} in {reader.path})", array, out)
                    writer.write(spec.name, out)
                    weight_map[spec.name] = file_name
                    if bar:
                        bar.update()
        if bar:
            bar.close()
        total = sum(s.nbytes for s in specs)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if hf_config is None:
            torch_dtype = np.dtype(specs[0].dtype).name if specs else "float32"
            hf_config = hf_config_dict(config, torch_dtype=torch_dtype)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "tensors": len(specs),
        "bytes": total,
        "shards": len(shards),
        "layout": "qkv_concat" if qkv_concat else "kv_concat",
        "skipped": len(skipped),
        "seconds": round(time.monotonic() - started, 3),
    }


def run(args: argparse.Namespace) -> int:
    try:
        hf_config = None
        if args.config_json:
            if not Path(args.config_json).is_file():
                raise CheckpointError(f"--config_json {args.config_json} does not exist")
            hf_config = json.loads(Path(args.config_json).read_text())
        config = resolve_architecture(args.model, args.config_json)
        summary = convert_ms_to_hf(
            args.mindspore_path,
            args.torch_path,
            config,
            args.dtype,
            parse_size(args.max_shard_size),
            hf_config,
            progress=True,
        )
    except (CheckpointError, FileNotFoundError) as err:
        print(f"telechat2 convert-reversed: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.torch_path}: {summary['tensors']} tensors in {summary['shards']} file(s), "
        f"{summary['bytes'] / 1e9:.3f} GB, from the {summary['layout']} layout; skipped {summary['skipped']} "
        f"training-state entries; {summary['seconds']} s"
    )
    return 0

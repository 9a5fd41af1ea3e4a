"""`telechat2 merge`: distributed checkpoint shards -> one full, verified checkpoint.

Arguments are the seed's `transform_ckpt.py` ones (`--src_ckpt_strategy --src_ckpt_dir --dst_ckpt_dir --prefix`).
Sources are laid out as a training run writes them: `src_ckpt_dir/rank_N/*.ckpt`. From each rank the newest
checkpoint is used; with MindFormers' `{prefix}-{epoch}_{step}.ckpt` names that is the newest step every rank has
(so a rank that died before its last save does not pair step 20 with step 10); other names fall back to
MindSpore's own rule, the last file in lexicographic order.

With a strategy (a file, or a directory of per-rank / per-pipeline-stage files, protobuf `.ckpt` or `.json`):
the files are merged with `mindspore.merge_pipeline_strategys`, then the shards are merged by MindSpore: by default
one parameter at a time with `mindspore.merge_sliced_parameter` (memory about the largest parameter; see
tests/bench/results/checkpoint.md), or with `mindspore.transform_checkpoints(src, dst, prefix, strategy, None)`
(`--engine transform`, which holds every shard in memory at once; used automatically for layouts the streaming
merge does not take: parallel-optimizer or multi-axis sharding). Both give the same bytes (tested). Without a
strategy the run was data parallel: every rank holds a full copy, so the ranks are checked to agree (same tensors,
shapes, dtypes, and bit-identical model weights) and rank 0's checkpoint is taken.

Output: `dst_ckpt_dir/rank_0/{prefix}0.ckpt`, MindSpore's layout for a merged checkpoint, so
`load_checkpoint: dst_ckpt_dir` and `auto_trans_ckpt` find it. Before it is reported, the result is verified (every
parameter the strategy or the shards name, at full shape, finite values).

Shard integrity: before any shard is read, each is checked against its sha256 sidecar (`X.ckpt.sha256`, written by
`telechat2 finetune`, see `telechat2.manifest`); a mismatch fails naming the file. A shard without a sidecar is
reported as a warning and, where other ranks hold replicas of the same data (data-parallel copies, or ranks the
strategy gives the same slice), its bytes are compared with theirs, so a flipped byte inside a tensor is still
caught there.

Everything is built in a temporary directory beside the destination and renamed into place only after
verification; the sources are only read (a failed merge, a checksum mismatch included, leaves them untouched).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from telechat2.checkpoint_io import CheckpointError, CkptReader, CkptWriter
from telechat2.manifest import verify_checkpoint

CKPT_STEP = re.compile(r"-(\d+)_(\d+)(?:_breakpoint)?\.ckpt$")
MODEL_PREFIXES = ("model.", "lm_head.")
ENGINES = ("auto", "stream", "transform")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--src_ckpt_strategy",
        "--src-ckpt-strategy",
        help="strategy file, or the directory of strategy files (output/strategy); omit for data-parallel runs",
    )
    parser.add_argument(
        "--src_ckpt_dir", "--src-ckpt-dir", required=True, help="directory holding rank_N/ subdirectories"
    )
    parser.add_argument(
        "--dst_ckpt_dir", "--dst-ckpt-dir", required=True, help="new directory for rank_0/{prefix}0.ckpt"
    )
    parser.add_argument("--prefix", default="checkpoint_", help="name of the merged file: {prefix}0.ckpt")
    parser.add_argument(
        "--vocab_file",
        "--vocab-file",
        help="tokenizer.model to copy beside the merged checkpoint (dst/rank_0/tokenizer.model), so serving finds "
        "it there by default; a missing file is reported and skipped (the tokenizer is not needed to merge)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="sharded runs: stream (one parameter at a time, mindspore.merge_sliced_parameter), transform "
        "(mindspore.transform_checkpoints, all shards in memory), auto (stream when the layouts allow)",
    )


# --- choosing the source files ------------------------------------------------------------------------------------


def rank_checkpoints(src_dir: Path) -> dict[int, list[Path]]:
    """rank -> its .ckpt files, for every rank_N directory."""
    if not src_dir.is_dir():
        raise CheckpointError(f"--src_ckpt_dir {src_dir} is not a directory")
    ranks: dict[int, list[Path]] = {}
    for path in src_dir.iterdir():
        match = re.fullmatch(r"rank_(\d+)", path.name)
        if match and path.is_dir():
            ranks[int(match.group(1))] = sorted(p for p in path.glob("*.ckpt") if p.is_file())
    if not ranks:
        raise CheckpointError(f"no rank_N directories in {src_dir}")
    empty = [f"rank_{r}" for r, files in sorted(ranks.items()) if not files]
    if empty:
        raise CheckpointError(f"no .ckpt files in {', '.join(empty)} under {src_dir}")
    return ranks


def choose_checkpoints(ranks: dict[int, list[Path]]) -> dict[int, Path]:
    """The newest checkpoint per rank, the same training step on every rank when the names say the step."""
    steps: dict[int, dict[tuple[int, int], Path]] = {}
    for rank, files in ranks.items():
        parsed = {}
        for path in files:
            match = CKPT_STEP.search(path.name)
            if match:
                parsed[(int(match.group(1)), int(match.group(2)))] = path
        steps[rank] = parsed
    if all(len(steps[r]) == len(ranks[r]) for r in ranks):
        common = set.intersection(*(set(s) for s in steps.values()))
        if not common:
            listing = "; ".join(f"rank_{r}: {sorted(s)}" for r, s in sorted(steps.items()))
            raise CheckpointError(f"the ranks have no (epoch, step) checkpoint in common: {listing}")
        newest = max(common)
        return {rank: steps[rank][newest] for rank in ranks}
    return {rank: files[-1] for rank, files in ranks.items()}  # MindSpore's rule: last in lexicographic order


# --- strategy -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's sharding in one pipeline stage, from a strategy file."""

    stage: int
    device_matrix: tuple[int, ...]
    splits: tuple[int, ...]  # how many pieces each tensor dimension is cut into
    raw: Any = field(default=None, compare=False, repr=False)  # node_strategy_pb2.ParallelLayouts

    @property
    def streamable(self) -> bool:
        """Layouts `mindspore.merge_sliced_parameter` merges: one tensor map, no parallel-optimizer sharding."""
        maps = [m for m in self.raw.tensor_map if list(m.dim)]
        return len(maps) <= 1 and self.raw.opt_weight_shard_size in (0, 1)

    @property
    def stage_devices(self) -> int:
        return math.prod(self.device_matrix)

    def full_shape(self, shard_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(d * s for d, s in zip(shard_shape, self.splits, strict=False)) + shard_shape[len(self.splits) :]


def merge_strategy_files(strategy: Path, work: Path) -> Path:
    """One strategy file covering every pipeline stage, made by `mindspore.merge_pipeline_strategys`."""
    import mindspore as ms

    if strategy.is_file():
        files = [strategy]
    elif strategy.is_dir():
        files = sorted(p for p in strategy.iterdir() if p.suffix in (".ckpt", ".json") and p.is_file())
        if not files:
            raise CheckpointError(f"no strategy files (*.ckpt or *.json) in {strategy}")
    else:
        raise CheckpointError(f"--src_ckpt_strategy {strategy} does not exist")
    suffixes = {p.suffix for p in files}
    if len(suffixes) > 1:
        raise CheckpointError(f"{strategy} mixes .ckpt and .json strategy files")
    staged = work / "strategy_in"
    staged.mkdir()
    for path in files:
        os.symlink(path.resolve(), staged / path.name)
    merged = work / f"merged_strategy{suffixes.pop()}"
    try:
        ms.merge_pipeline_strategys(str(staged), str(merged))
    except Exception as err:  # MindSpore raises ValueError/TypeError/protobuf errors for unreadable files
        raise CheckpointError(f"cannot read the strategy in {strategy}: {err}") from err
    return merged


def read_layouts(merged_strategy: Path) -> dict[str, list[ParamLayout]]:
    """parameter -> its layout in each stage holding it, from a merged strategy ('stage-name' keys)."""
    from mindspore.parallel import build_searched_strategy

    try:
        raw = build_searched_strategy(str(merged_strategy))
    except Exception as err:
        raise CheckpointError(f"cannot read the merged strategy {merged_strategy}: {err}") from err
    if not raw:
        raise CheckpointError("the strategy names no parameters")
    layouts: dict[str, list[ParamLayout]] = {}
    for key, layout in raw.items():
        stage, _, name = key.partition("-")
        device_matrix = tuple(layout.dev_matrix[0].dim)
        maps = [list(m.dim) for m in layout.tensor_map if list(m.dim)]
        per_dim = [[m] for m in maps[0]] if len(maps) == 1 else maps  # one axis may be cut by several device axes
        splits = [math.prod(device_matrix[len(device_matrix) - 1 - i] for i in axes if i != -1) for axes in per_dim]
        if layout.opt_weight_shard_size > 1 and splits:  # parallel optimizer cuts dim 0 further
            splits[0] *= layout.opt_weight_shard_size
        layouts.setdefault(name, []).append(ParamLayout(int(stage), device_matrix, tuple(splits), layout))
    return layouts


def ranks_of_stages(layouts: dict[str, list[ParamLayout]]) -> dict[int, range]:
    """Pipeline stage -> its global ranks (stages are numbered 0.. and hold consecutive ranks)."""
    stage_devices = {pl.stage: pl.stage_devices for pls in layouts.values() for pl in pls}
    stages = sorted(stage_devices)
    if stages != list(range(len(stages))):
        raise CheckpointError(f"the strategy covers pipeline stages {stages}, not 0..{len(stages) - 1}")
    first_rank, stage_ranks = 0, {}
    for stage in stages:
        stage_ranks[stage] = range(first_rank, first_rank + stage_devices[stage])
        first_rank += stage_devices[stage]
    return stage_ranks


def check_shards_match_strategy(layouts: dict[str, list[ParamLayout]], readers: dict[int, CkptReader]) -> dict:
    """Every rank the strategy needs is there and holds every parameter of its stage; returns full shapes."""
    stage_ranks = ranks_of_stages(layouts)
    first_rank = stage_ranks[max(stage_ranks)].stop
    missing = [r for r in range(first_rank) if r not in readers]
    if missing:
        raise CheckpointError(
            f"the strategy describes {first_rank} ranks; missing rank(s) {', '.join(f'rank_{r}' for r in missing)}"
        )
    extra = sorted(r for r in readers if r >= first_rank)
    if extra:
        raise CheckpointError(
            f"the strategy describes {first_rank} ranks but the source also has "
            f"{', '.join(f'rank_{r}' for r in extra)}: the strategy does not match these shards"
        )
    full_shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for name, stage_layouts in layouts.items():
        for layout in stage_layouts:
            shapes = {}
            for rank in stage_ranks[layout.stage]:
                entry = readers[rank].entries.get(name)
                if entry is None:
                    problems.append(f"the strategy names {name} (stage {layout.stage}) but rank_{rank} lacks it")
                else:
                    shapes[rank] = entry.shape
            if len(set(shapes.values())) > 1:
                problems.append(f"{name}: shard shapes differ across stage {layout.stage}: {shapes}")
            elif shapes:
                shard = next(iter(shapes.values()))
                if len(shard) < len(layout.splits):
                    problems.append(f"{name}: shard shape {list(shard)} has fewer axes than the strategy's layout")
                else:
                    full_shapes[name] = layout.full_shape(shard)
    if problems:
        raise CheckpointError("the strategy does not match the shards:\n  " + "\n  ".join(problems[:20]))
    return full_shapes


def check_unsharded_agree(layouts: dict[str, list[ParamLayout]], readers: dict[int, CkptReader]) -> None:
    """A tensor the strategy does not describe is copied as is, so it must have one shape on every rank."""
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for reader in readers.values():
        for name, entry in reader.entries.items():
            if name not in layouts:
                shapes.setdefault(name, set()).add(entry.shape)
    sharded = [f"{n} {sorted(map(list, s))}" for n, s in shapes.items() if len(s) > 1]
    if sharded:
        raise CheckpointError(
            "the strategy does not match the shards: these tensors have different shapes on different ranks but "
            "the strategy does not describe them:\n  " + "\n  ".join(sharded[:20])
        )


# --- shard integrity ----------------------------------------------------------------------------------------------


def verify_shard_checksums(chosen: dict[int, Path]) -> dict[int, bool]:
    """Check every chosen shard against its sha256 sidecar before anything reads it: rank -> verified (False: no
    sidecar). A mismatch raises CheckpointError naming the file."""
    return {rank: verify_checkpoint(path) for rank, path in sorted(chosen.items())}


def unverified_warning(verified: dict[int, bool]) -> str | None:
    missing = [f"rank_{r}" for r, ok in sorted(verified.items()) if not ok]
    if not missing:
        return None
    return (
        f"no checksum manifest (.ckpt.sha256) for {', '.join(missing)}: a corrupted byte in those shards is caught "
        "only where another rank holds a replica of the same data"
    )


def replica_groups(layout: ParamLayout, ranks: range) -> list[list[int]]:
    """Ranks of a stage grouped by the slice of the parameter they hold: ranks whose device-matrix coordinates
    differ only on axes the tensor map does not use hold identical bytes (data-parallel replicas)."""
    matrix = layout.device_matrix
    used = sorted({axis for m in layout.raw.tensor_map for axis in m.dim if axis != -1})
    groups: dict[tuple[int, ...], list[int]] = {}
    for rank in ranks:
        coords = np.unravel_index(rank - ranks.start, matrix)  # ranks fill the device matrix in row-major order
        groups.setdefault(tuple(int(coords[len(matrix) - 1 - axis]) for axis in used), []).append(rank)
    return list(groups.values())


def check_sharded_replicas_agree(
    layouts: dict[str, list[ParamLayout]], readers: dict[int, CkptReader], verified: dict[int, bool]
) -> int:
    """Where a shard has no checksum manifest, compare its slices with the ranks that hold the same slice (the
    strategy says which); a difference means one of them is corrupt. Returns how many tensors were compared."""
    stage_ranks = ranks_of_stages(layouts)
    compared = 0
    for name, stage_layouts in layouts.items():
        for layout in stage_layouts:
            if layout.raw.opt_weight_shard_size > 1:  # the parallel optimizer gives each replica its own piece
                continue
            for group in replica_groups(layout, stage_ranks[layout.stage]):
                if len(group) < 2 or all(verified.get(r, False) for r in group):
                    continue
                reference = next((r for r in group if verified.get(r, False)), group[0])
                for rank in group:
                    if rank == reference:
                        continue
                    compared += 1
                    if not same_bits(readers[reference], readers[rank], name):
                        raise CheckpointError(
                            f"{name} differs between rank_{reference} ({readers[reference].path}) and rank_{rank} "
                            f"({readers[rank].path}), which hold the same slice under the strategy: one of the "
                            "shards is corrupt (there is no checksum manifest to tell which)"
                        )
    return compared


# --- merging ------------------------------------------------------------------------------------------------------


CHUNK_VALUES = 1 << 24  # compare and check tensors in pieces of 16M values, so memory stays flat


def chunks(reader: CkptReader, name: str) -> Iterator[tuple[int, int]]:
    entry = reader.entries[name]
    total = entry.nbytes // entry.dtype.itemsize
    for start in range(0, total, CHUNK_VALUES):
        yield start, min(CHUNK_VALUES, total - start)


def same_bits(a: CkptReader, b: CkptReader, name: str) -> bool:
    return all(
        np.array_equal(a.read_flat(name, start, n).view(np.uint8), b.read_flat(name, start, n).view(np.uint8))
        for start, n in chunks(a, name)
    )


def check_replicas_agree(readers: dict[int, CkptReader]) -> None:
    """Data-parallel ranks hold identical copies: same tensors, shapes and dtypes; model weights bit-identical."""
    ranks = sorted(readers)
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(f"missing rank(s) {', '.join(f'rank_{r}' for r in missing)} (found {ranks})")
    base = readers[0]
    for rank in ranks[1:]:
        other = readers[rank]
        if set(other.entries) != set(base.entries):
            only0 = sorted(set(base.entries) - set(other.entries))[:5]
            only_r = sorted(set(other.entries) - set(base.entries))[:5]
            raise CheckpointError(
                f"rank_{rank} ({other.path}) and rank_0 hold different tensors: only rank_0 has {only0}, "
                f"only rank_{rank} has {only_r}; with no strategy the ranks must be full data-parallel copies "
                "(pass --src_ckpt_strategy for sharded runs)"
            )
        for name, entry in base.entries.items():
            theirs = other.entries[name]
            if (theirs.shape, theirs.tensor_type) != (entry.shape, entry.tensor_type):
                raise CheckpointError(
                    f"{name}: rank_0 has {list(entry.shape)} {entry.tensor_type}, rank_{rank} has "
                    f"{list(theirs.shape)} {theirs.tensor_type}; pass --src_ckpt_strategy for sharded runs"
                )
            if name.startswith(MODEL_PREFIXES) and not same_bits(base, other, name):
                raise CheckpointError(
                    f"{name} differs between rank_0 and rank_{rank}: data-parallel replicas should be identical "
                    "(was the run sharded? then pass --src_ckpt_strategy; otherwise one of the two files is "
                    "corrupt)"
                )


def _float32_if_bf16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) if values.dtype.name == "bfloat16" else values


def stream_merge(layouts: dict[str, list[ParamLayout]], readers: dict[int, CkptReader], out_file: Path) -> None:
    """Merge one parameter at a time with `mindspore.merge_sliced_parameter`: memory ~ the largest parameter.

    `mindspore.transform_checkpoints` loads every shard at once (and copies them), several times the model in
    memory; here each parameter's slices are read from the rank files, merged and written before the next.
    """
    import mindspore as ms

    stage_ranks = ranks_of_stages(layouts)
    order = list(dict.fromkeys(name for reader in readers.values() for name in reader.entries))
    with CkptWriter(out_file) as writer:
        for name in order:
            if name in layouts:
                layout = min(layouts[name], key=lambda pl: pl.stage)  # a stage-shared parameter: the first stage's
                slices = [readers[r].read(name) for r in stage_ranks[layout.stage]]
                dtype = slices[0].dtype
                # merge_sliced_parameter computes bfloat16 in float32; the cast back below is exact
                parameters = [ms.Parameter(ms.Tensor.from_numpy(_float32_if_bf16(x)), name) for x in slices]
                del slices
                merged = ms.merge_sliced_parameter(parameters, {name: layout.raw}).asnumpy()
                del parameters
                values = merged if merged.dtype == dtype else merged.astype(dtype)
            else:  # not described by the strategy: replicated training state, the same on every rank
                values = readers[next(r for r in readers if name in readers[r].entries)].read(name)
            writer.write(name, values.shape, values.dtype, [values])
            del values


def verify_merged(path: Path, expected: dict[str, tuple[int, ...]]) -> int:
    """Every expected parameter present at its full shape, every float tensor finite; returns the tensor count."""
    reader = CkptReader(path)
    problems = []
    for name, shape in expected.items():
        entry = reader.entries.get(name)
        if entry is None:
            problems.append(f"{name} is missing")
        elif entry.shape != shape:
            problems.append(f"{name} is {list(entry.shape)}, expected the full shape {list(shape)}")
    for name, entry in reader.entries.items():
        if entry.tensor_type.startswith(("Float", "BFloat")):
            finite = all(
                np.isfinite(_float32_if_bf16(reader.read_flat(name, start, n))).all()
                for start, n in chunks(reader, name)
            )
            if not finite:
                problems.append(f"{name} has non-finite values")
    if problems:
        raise CheckpointError(f"merged checkpoint {path} failed verification:\n  " + "\n  ".join(problems[:20]))
    return len(reader.entries)


def merge(
    src_ckpt_dir: str | Path,
    dst_ckpt_dir: str | Path,
    prefix: str,
    strategy: str | Path | None = None,
    engine: str = "auto",
) -> dict:
    """Merge and verify; `dst_ckpt_dir/rank_0/{prefix}0.ckpt` appears only when everything checked out.

    engine (sharded runs): "stream" merges parameter by parameter with `mindspore.merge_sliced_parameter`,
    "transform" calls `mindspore.transform_checkpoints` on all shards at once, "auto" streams when every layout
    allows it (no parallel-optimizer sharding, one tensor map per parameter) and transforms otherwise.
    """
    if engine not in ENGINES:
        raise CheckpointError(f"--engine {engine!r} must be one of {', '.join(ENGINES)}")
    started = time.monotonic()
    src, dst = Path(src_ckpt_dir), Path(dst_ckpt_dir)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"--dst_ckpt_dir {dst} exists and is not empty; choose a new directory")
    if not prefix or "/" in prefix:
        raise CheckpointError(f"--prefix {prefix!r} must be a non-empty file name prefix")
    chosen = choose_checkpoints(rank_checkpoints(src))
    verified = verify_shard_checksums(chosen)  # before reading anything: a mismatch names the file
    warnings = [w for w in [unverified_warning(verified)] if w]
    readers = {rank: CkptReader(path) for rank, path in sorted(chosen.items())}  # names a corrupt file
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        out = work / "out"
        merged_file = out / "rank_0" / f"{prefix}0.ckpt"
        if strategy is None:
            check_replicas_agree(readers)
            expected = {name: entry.shape for name, entry in readers[0].entries.items()}
            merged_file.parent.mkdir(parents=True)
            shutil.copyfile(chosen[0], merged_file)
            mode = "data-parallel (rank 0's copy)"
        else:
            import mindspore as ms

            merged_strategy = merge_strategy_files(Path(strategy), work)
            layouts = read_layouts(merged_strategy)
            full_shapes = check_shards_match_strategy(layouts, readers)
            check_unsharded_agree(layouts, readers)
            expected = {n: e.shape for r in readers.values() for n, e in r.entries.items() if n not in layouts}
            expected.update(full_shapes)
            streamable = all(pl.streamable for pls in layouts.values() for pl in pls)
            if engine == "stream" and not streamable:
                raise CheckpointError("--engine stream: the strategy uses parallel-optimizer or multi-axis sharding")
            use_stream = engine == "stream" or (engine == "auto" and streamable)
            if use_stream:
                stream_merge(layouts, readers, merged_file)
            else:
                view = work / "src"  # exactly the chosen file per rank, as symlinks: the sources are only read
                for rank, path in chosen.items():
                    (view / f"rank_{rank}").mkdir(parents=True)
                    os.symlink(path.resolve(), view / f"rank_{rank}" / path.name)
                try:
                    ms.transform_checkpoints(str(view), str(out), prefix, str(merged_strategy), None)
                except Exception as err:
                    raise CheckpointError(f"mindspore.transform_checkpoints failed: {err}") from err
            # After the merge, not before: many small reads ahead of the large per-parameter arrays left glibc's heap
            # ~90 MB higher at the peak (measured); the merged file is only in the work directory so far.
            check_sharded_replicas_agree(layouts, readers, verified)
            stages = len({p.stage for v in layouts.values() for p in v})
            how = "merge_sliced_parameter, streamed" if use_stream else "transform_checkpoints"
            mode = f"sharded ({len(readers)} ranks, {stages} stage(s), {how})"
        produced = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        if produced != [merged_file.relative_to(out)]:
            raise CheckpointError(f"expected only {merged_file.relative_to(out)} from the merge, got {produced}")
        tensors = verify_merged(merged_file, expected)
        if dst.exists():
            dst.rmdir()
        os.replace(out, dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    final = dst / "rank_0" / f"{prefix}0.ckpt"
    return {
        "path": str(final),
        "mode": mode,
        "tensors": tensors,
        "bytes": final.stat().st_size,
        "sources": {rank: str(path) for rank, path in chosen.items()},
        "checksums_verified": sum(verified.values()),
        "warnings": warnings,
        "seconds": round(time.monotonic() - started, 3),
    }


TOKENIZER_NAME = "tokenizer.model"


def copy_tokenizer(vocab_file: Path, merged_dir: Path) -> Path | None:
    """Copy the tokenizer beside the merged checkpoint (through a temporary name: never half a file). A TeleChat
    inference of the merged checkpoint looks for `tokenizer.model` there unless told otherwise."""
    if not vocab_file.is_file():
        print(f"telechat2 merge: warning: --vocab_file {vocab_file} not found; no tokenizer copied", file=sys.stderr)
        return None
    target = merged_dir / TOKENIZER_NAME
    partial = merged_dir / f".{TOKENIZER_NAME}.partial"
    shutil.copyfile(vocab_file, partial)
    os.replace(partial, target)
    print(f"copied the tokenizer {vocab_file} to {target}")
    return target


def run(args: argparse.Namespace) -> int:
    try:
        summary = merge(args.src_ckpt_dir, args.dst_ckpt_dir, args.prefix, args.src_ckpt_strategy, args.engine)
    except CheckpointError as err:
        print(f"telechat2 merge: error: {err}", file=sys.stderr)
        return 1
    for warning in summary["warnings"]:
        print(f"telechat2 merge: warning: {warning}", file=sys.stderr)
    if args.vocab_file:
        copy_tokenizer(Path(args.vocab_file), Path(summary["path"]).parent)
    sources = ", ".join(f"rank_{r}: {Path(p).name}" for r, p in sorted(summary["sources"].items()))
    checksums = f"{summary['checksums_verified']} of {len(summary['sources'])} shards matched their sha256 manifests"
    print(
        f"merged {summary['mode']} into {summary['path']}: {summary['tensors']} tensors, "
        f"{summary['bytes'] / 1e9:.3f} GB, verified (full shapes, finite) in {summary['seconds']} s; {checksums}; "
        f"sources {sources}"
    )
    return 0

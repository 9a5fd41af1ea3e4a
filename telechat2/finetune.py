"""`telechat2 finetune --config FILE [--resume]`: train TeleChat2 from a rendered MindFormers YAML.

As the seed does (`run_mindformer.py --config ... --run_mode finetune`), training goes through MindFormers'
`Trainer` with our model registered under the YAML names (`telechat2.register`). The YAML decides everything:
dataset (`train_dataset.data_loader.dataset_dir`, the MindRecord from `telechat2 preprocess`), `load_checkpoint`,
`output_dir`, optimizer, lr schedule, epochs and save steps (the CheckpointMonitor callback). MindFormers saves
per-rank checkpoints under `output_dir/checkpoint/rank_N/` and, for semi-auto parallel layouts, strategy files under
`output_dir/strategy/`. Those layouts (model_parallel / pipeline_stage / expert_parallel > 1, `parallel.parallel_mode`
1) are split by `telechat2.parallel.apply_parallel_plan`, which the registered model applies when the Trainer builds
it (`telechat2.register`); data-parallel runs, CPU included, leave the model as built.

Every saved checkpoint gets a sha256 sidecar (`X.ckpt.sha256`, `telechat2.manifest`): a callback after the
CheckpointMonitor hashes each new file, and a sweep after training catches any left over; `telechat2 merge`
verifies the shards against them.

`--resume` (or `resume_training: True` in the YAML) continues from the newest complete checkpoint under
`output_dir/checkpoint` (MindFormers' meta.json records it, per rank), restoring the optimizer state and the step
counter; when no rank has saved anything yet it says so and starts from `load_checkpoint`, so a pod can always
pass --resume and a restarted pod picks up where it stopped.

Under `msrun` (see `telechat2 launch`) `use_parallel` is switched on automatically so every worker joins the
data-parallel group; the same YAML runs on one process or many.

CPU: MindFormers' Trainer uses two Ascend/GPU-only pieces: the gradient-overflow check (float-status registers) and,
with `use_parallel`, a collective Barrier around checkpoint loading. `apply_cpu_shims` replaces exactly those two with
portable equivalents (any non-finite gradient; an AllReduce of one number) when `device_target` is CPU. Nothing
else is patched.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from telechat2.manifest import manifest_callback, write_missing_manifests

# MindFormers' MFLossMonitor: "{ Epoch:[  3/  3], step:[    2/   16], loss:[4.473785/4.48], ..."
MF_LOSS_LINE = re.compile(r"Epoch:\[\s*(\d+)/\s*\d+\], step:\[\s*(\d+)/\s*(\d+)\], loss:\s*\[?\s*([-+0-9.eE]+|nan|inf)")


class FinetuneError(RuntimeError):
    """A config or resume problem the user must fix; the message names the key or path."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="rendered MindFormers YAML (telechat2.configs.render_config)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest complete checkpoint in output_dir/checkpoint"
    )
    parser.add_argument("--load_checkpoint", "--load-checkpoint", help="override load_checkpoint of the YAML")
    parser.add_argument("--train_dataset", "--train-dataset", help="override train_dataset.data_loader.dataset_dir")
    parser.add_argument("--output_dir", "--output-dir", help="override output_dir of the YAML")


# --- the CPU shim ----------------------------------------------------------------------------------------------------

# Modules that bound MindSpore's `barrier` by name (`from mindspore.communication.comm_func import barrier`).
_BARRIER_USERS = (
    "mindspore.communication.comm_func",
    "mindformers.trainer.utils",
    "mindformers.utils.load_checkpoint_utils",
    "mindformers.core.callback.callback",
    "mindformers.version_control",
)


def apply_cpu_shims() -> None:
    """Replace the two Ascend/GPU-only pieces MindFormers' Trainer uses, with portable equivalents (CPU only).

    1. Gradient overflow: `TrainOneStepWithLossScaleCell.get_overflow_status` reads NPU/GPU float-status registers
       (the NPUGetFloatStatusV2 kernel does not exist on CPU). The replacement gives the same answer from the
       (already all-reduced) gradients: overflow is any non-finite value.
    2. Collective barrier: `mindspore.communication.comm_func.barrier` (the Barrier kernel is Ascend-only), used
       around checkpoint loading and resuming when `use_parallel` is on, becomes an AllReduce of one number, which
       completes only once every rank of the group has joined it.
    Called only when `context.device_target` is CPU. Idempotent.
    """
    import importlib

    import numpy as np
    from mindformers.wrapper.wrapper import MFTrainOneStepCell
    from mindspore import Tensor, ops
    from mindspore.communication import GlobalComm

    if getattr(MFTrainOneStepCell, "_telechat2_cpu_shims", False):
        return
    any_non_finite = ops.MultitypeFuncGraph("telechat2_any_non_finite")

    @any_non_finite.register("Tensor")
    def _tensor_non_finite(grad):
        return ops.logical_not(ops.isfinite(grad).all())

    def get_overflow_status(self, status, compute_output):
        flags = self.hyper_map(any_non_finite, compute_output)
        return ops.stack(flags).any()

    def barrier(group: str = GlobalComm.WORLD_COMM_GROUP) -> None:
        ops.AllReduce(group=group)(Tensor(np.ones(1, np.float32))).asnumpy()  # asnumpy: wait for completion

    MFTrainOneStepCell.get_overflow_status = get_overflow_status
    for module_name in _BARRIER_USERS:
        module = importlib.import_module(module_name)
        if hasattr(module, "barrier"):
            module.barrier = barrier
    MFTrainOneStepCell._telechat2_cpu_shims = True


# --- config ----------------------------------------------------------------------------------------------------------


def under_msrun() -> bool:
    """msrun exports the dynamic-networking variables to its workers (facts file, section 6)."""
    return bool(os.environ.get("MS_ROLE") and os.environ.get("MS_SCHED_HOST") and os.environ.get("RANK_SIZE"))


def load_yaml_config(path: str | Path, args: argparse.Namespace):
    """The YAML as MindFormers reads it, with the command-line overrides and the checks that name the key."""
    from mindformers import MindFormerConfig

    if not Path(path).is_file():
        raise FinetuneError(f"--config {path} does not exist")
    config = MindFormerConfig(str(path))
    if args.load_checkpoint is not None:
        config.load_checkpoint = args.load_checkpoint
    if args.train_dataset is not None:
        config.train_dataset.data_loader.dataset_dir = args.train_dataset
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    dataset_dir = config.train_dataset.data_loader.dataset_dir if config.get("train_dataset") else None
    if not dataset_dir:
        raise FinetuneError(f"{path}: train_dataset.data_loader.dataset_dir is empty (the MindRecord from preprocess)")
    if not Path(dataset_dir).exists():
        raise FinetuneError(f"{path}: train_dataset.data_loader.dataset_dir {dataset_dir} does not exist")
    config.output_dir = str(Path(config.output_dir or "./output").resolve())
    if config.load_checkpoint and not Path(config.load_checkpoint).exists():
        raise FinetuneError(f"{path}: load_checkpoint {config.load_checkpoint} does not exist")
    if under_msrun():
        config.use_parallel = True
    return config


def newest_checkpoint(checkpoint_dir: Path, rank: int) -> Path | None:
    """The checkpoint MindFormers recorded last for this rank (meta.json), else the highest step on disk."""
    rank_dir = checkpoint_dir / f"rank_{rank}"
    meta = rank_dir / "meta.json"
    if meta.is_file():
        try:
            name = json.loads(meta.read_text()).get("last_ckpt_file")
        except json.JSONDecodeError:
            name = None
        if name and (rank_dir / name).is_file():
            return rank_dir / name
    steps = []
    for path in rank_dir.glob("*.ckpt"):
        match = re.search(r"-(\d+)_(\d+)\.ckpt$", path.name)
        if match:
            steps.append(((int(match.group(1)), int(match.group(2))), path))
    return max(steps)[1] if steps else None


def prepare_resume(config) -> bool:
    """Point load_checkpoint at output_dir/checkpoint so MindFormers resumes every rank from its newest file.

    Returns False (and leaves the config alone) when no rank has saved anything yet: a pod that always passes
    --resume then starts fresh on its first attempt and continues on every retry. The decision looks at all
    ranks' directories, so every worker of a run decides the same way.
    """
    checkpoint_dir = Path(config.output_dir) / "checkpoint"
    ranks = sorted(checkpoint_dir.glob("rank_*")) if checkpoint_dir.is_dir() else []
    if not any(newest_checkpoint(checkpoint_dir, int(d.name.removeprefix("rank_"))) for d in ranks if d.is_dir()):
        print(f"telechat2 finetune: nothing to resume under {checkpoint_dir}; starting from load_checkpoint")
        config.resume_training = False
        return False
    config.load_checkpoint = str(checkpoint_dir)
    config.resume_training = True
    return True


def read_loss_log(text: str) -> list[tuple[int, float]]:
    """(global step, loss) pairs from MindFormers' MFLossMonitor lines (steps counted across epochs)."""
    return [
        ((int(epoch) - 1) * int(per_epoch) + int(step), float(loss))
        for epoch, step, per_epoch, loss in MF_LOSS_LINE.findall(text)
    ]


# --- run -------------------------------------------------------------------------------------------------------------


def tokens_scale(config) -> int:
    """How many ranks' worth of tokens one rank's dataset batch stands for: with `full_batch` every rank reads the
    whole global batch (1); otherwise each data-parallel rank reads its own shard."""
    if not config.get("use_parallel"):
        return 1
    parallel = config.get("parallel") or {}
    if parallel.get("full_batch", True):
        return 1
    return int((config.get("parallel_config") or {}).get("data_parallel", 1) or 1)


def progress_callback_for(config):
    """This rank's progress writer (telechat2.progress), fed from the YAML the run uses."""
    from telechat2.progress import progress_callback

    return progress_callback(
        config.output_dir,
        rank=int(os.environ.get("RANK_ID", "0")),
        epochs=int(config.runner_config.epochs),
        seq_length=int(config.model.model_config.seq_length),
        tokens_scale=tokens_scale(config),
        attempt=int(os.environ.get("TELECHAT_ATTEMPT", "0") or 0),
    )


def finetune(config) -> None:
    from mindformers import Trainer
    from mindformers.core.context import build_context

    from telechat2.register import register_with_mindformers

    register_with_mindformers()
    if str(config.context.device_target).upper() == "CPU":
        apply_cpu_shims()
    build_context(config)
    from mindformers.tools.utils import get_real_rank  # the rank CheckpointMonitor names its directory after

    rank_dir = Path(config.output_dir) / "checkpoint" / f"rank_{get_real_rank()}"
    # progress records for the operator's status, and sha256 sidecars for every checkpoint CheckpointMonitor saves
    # (telechat2.manifest; verified by merge)
    callbacks = [progress_callback_for(config), manifest_callback(rank_dir)]
    trainer = Trainer(args=config, task="text_generation", callbacks=callbacks)
    trainer.finetune(
        finetune_checkpoint=config.load_checkpoint or False,
        resume_training=bool(config.resume_training) or None,
    )
    # After training: sidecars for any checkpoint still without one (a killed earlier run's last saves included).
    write_missing_manifests(rank_dir)


def run(args: argparse.Namespace) -> int:
    try:
        config = load_yaml_config(args.config, args)
        if args.resume or config.resume_training:
            prepare_resume(config)
        finetune(config)
    except FinetuneError as err:
        print(f"telechat2 finetune: error: {err}", file=sys.stderr)
        return 1
    rank = int(os.environ.get("RANK_ID", "0"))
    saved = newest_checkpoint(Path(config.output_dir) / "checkpoint", rank)
    print(f"telechat2 finetune: done; rank {rank}'s newest checkpoint: {saved or 'none saved'}")
    return 0

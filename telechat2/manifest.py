"""Checksum manifests beside checkpoint files, so `telechat2 merge` can tell a flipped byte from a good shard.

Each `X.ckpt` gets a sidecar `X.ckpt.sha256` holding one `sha256sum` line (`<hex>  X.ckpt`), so `cd rank_0 &&
sha256sum -c *.sha256` checks a directory by hand too. A sidecar is written only once its checkpoint is complete
(MindSpore writes `X.tmp` and renames it to `X.ckpt`, so every `.ckpt` on disk is whole) and atomically (a
temporary file renamed into place), so a sidecar never describes half a file. The `.sha256` suffix keeps
MindSpore's and MindFormers' checkpoint listings (which select by `.ckpt`) from ever seeing it.

Training writes them: `ChecksumManifests` is a MindSpore callback that runs after MindFormers' CheckpointMonitor
and hashes each new checkpoint on a background thread (waiting for the last ones when training ends); `telechat2
finetune` also sweeps its rank directory once training returns, which picks up files a killed run left unhashed.
A checkpoint rewritten under the same name (a resumed run saving that step again) is newer than its sidecar and is
hashed again.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from telechat2.checkpoint_io import CheckpointError

SUFFIX = ".sha256"
_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def manifest_path(checkpoint: str | os.PathLike) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks (hashlib releases the GIL, so a training step is not held up)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(checkpoint: str | os.PathLike) -> Path | None:
    """Hash a complete checkpoint and write its sidecar atomically; None when the file changed or vanished while
    it was read (MindSpore removed or re-saved it), so no sidecar describes bytes that are not on disk."""
    checkpoint = Path(checkpoint)
    try:
        before = checkpoint.stat()
        digest = file_sha256(checkpoint)
        after = checkpoint.stat()
    except FileNotFoundError:
        return None
    if (before.st_ino, before.st_size, before.st_mtime_ns) != (after.st_ino, after.st_size, after.st_mtime_ns):
        return None
    target = manifest_path(checkpoint)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=checkpoint.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {checkpoint.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_manifest(checkpoint: str | os.PathLike) -> str | None:
    """The sha256 recorded for a checkpoint; None without a sidecar; CheckpointError for a malformed one."""
    checkpoint = Path(checkpoint)
    path = manifest_path(checkpoint)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read the checksum manifest {path}: {err}") from err
    lines = [line for line in text.splitlines() if line.strip()]
    match = _LINE.fullmatch(lines[0]) if len(lines) == 1 else None
    if match is None or match.group(2) != checkpoint.name:
        raise CheckpointError(f"checksum manifest {path} is malformed: expected one line '<sha256>  {checkpoint.name}'")
    return match.group(1)


def is_fresh(checkpoint: Path) -> bool:
    """A sidecar exists and was written after the checkpoint's last change."""
    try:
        return manifest_path(checkpoint).stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def write_missing_manifests(directory: str | os.PathLike) -> list[Path]:
    """Give every `.ckpt` in `directory` an up-to-date sidecar and drop sidecars whose checkpoint is gone
    (MindFormers deletes old checkpoints beyond keep_checkpoint_max). Returns the sidecars written."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    written = []
    for checkpoint in sorted(directory.glob("*.ckpt")):
        if checkpoint.is_file() and not is_fresh(checkpoint):
            path = write_manifest(checkpoint)
            if path is not None:
                written.append(path)
    for sidecar in directory.glob(f"*.ckpt{SUFFIX}"):
        if not sidecar.with_name(sidecar.name.removesuffix(SUFFIX)).exists():
            sidecar.unlink(missing_ok=True)
    return written


def verify_checkpoint(checkpoint: str | os.PathLike) -> bool:
    """True when the checkpoint matches its sidecar, False when it has none; CheckpointError names the file on a
    mismatch."""
    checkpoint = Path(checkpoint)
    expected = read_manifest(checkpoint)
    if expected is None:
        return False
    actual = file_sha256(checkpoint)
    if actual != expected:
        rewritten = not is_fresh(checkpoint)
        raise CheckpointError(
            f"{checkpoint} does not match its checksum manifest {manifest_path(checkpoint).name} (sha256 "
            f"{actual}, recorded {expected}): the file is corrupt"
            + (
                "; it was also modified after the manifest was written (if it was re-saved on purpose, delete the "
                "stale manifest)"
                if rewritten
                else ""
            )
        )
    return True


def manifest_callback(fallback_directory: str | os.PathLike | None = None):
    """A MindSpore callback writing sidecars for the checkpoints MindFormers' CheckpointMonitor saves.

    It must come after the CheckpointMonitor in the callback list (MindFormers puts callbacks passed to the Trainer
    after its own). The directories are the ModelCheckpoint callbacks' own; `fallback_directory` is used when the
    run has none (the legacy .ckpt format is the one MindFormers writes there).
    """
    from mindspore.train import Callback, ModelCheckpoint

    class ChecksumManifests(Callback):
        """Hash new checkpoints on one background thread; wait for the last sweep when training ends."""

        def __init__(self) -> None:
            super().__init__()
            self._worker: threading.Thread | None = None
            self._error: BaseException | None = None

        def _directories(self, run_context) -> list[Path]:
            callbacks = getattr(run_context.original_args(), "list_callback", None) or []
            found = [Path(cb._directory) for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb._directory]
            if not found and fallback_directory is not None:
                found = [Path(fallback_directory)]
            return found

        def _sweep(self, directories: Iterable[Path]) -> None:
            try:
                for directory in directories:
                    write_missing_manifests(directory)
            except BaseException as err:  # reported on the training thread at the end
                self._error = err

        def _start(self, run_context) -> None:
            if self._worker is not None and self._worker.is_alive():
                return  # the next step picks up whatever this sweep misses
            directories = self._directories(run_context)
            self._worker = threading.Thread(target=self._sweep, args=(directories,), name="ckpt-sha256", daemon=True)
            self._worker.start()

        def on_train_step_end(self, run_context) -> None:
            self._start(run_context)

        def on_train_end(self, run_context) -> None:
            if self._worker is not None:
                self._worker.join()
            self._worker = None
            self._sweep(self._directories(run_context))
            if self._error is not None:
                raise CheckpointError(f"writing checkpoint checksum manifests failed: {self._error}") from self._error

    return ChecksumManifests()

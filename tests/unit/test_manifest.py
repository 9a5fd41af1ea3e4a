"""sha256 sidecars beside checkpoints (telechat2.manifest): written once a checkpoint is complete, checked by merge."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from telechat2.checkpoint_io import CheckpointError, CkptWriter
from telechat2.manifest import (
    manifest_callback,
    manifest_path,
    read_manifest,
    verify_checkpoint,
    write_manifest,
    write_missing_manifests,
)


def write_ckpt(path: Path, seed: int = 0) -> Path:
    value = np.random.default_rng(seed).standard_normal((16, 8), dtype=np.float32)
    with CkptWriter(path) as writer:
        writer.write("model.w", value.shape, value.dtype, [value])
    return path


def test_sidecar_is_a_sha256sum_line(tmp_path):
    ckpt = write_ckpt(tmp_path / "a-1_2.ckpt")
    sidecar = write_manifest(ckpt)
    assert sidecar == tmp_path / "a-1_2.ckpt.sha256"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert sidecar.read_text() == f"{digest}  a-1_2.ckpt\n"
    assert read_manifest(ckpt) == digest and verify_checkpoint(ckpt)
    assert subprocess.run(["sha256sum", "-c", sidecar.name], cwd=tmp_path, capture_output=True).returncode == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_mismatch_names_the_file_and_a_missing_sidecar_is_not_an_error(tmp_path):
    ckpt = write_ckpt(tmp_path / "a.ckpt")
    assert verify_checkpoint(ckpt) is False
    write_manifest(ckpt)
    stat = ckpt.stat()
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 1
    ckpt.write_bytes(bytes(data))
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match=rf"{ckpt} does not match its checksum manifest a.ckpt.sha256") as err:
        verify_checkpoint(ckpt)
    assert "modified after" not in str(err.value)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten after its manifest
    with pytest.raises(CheckpointError, match="modified after the manifest was written"):
        verify_checkpoint(ckpt)


def test_sweep_hashes_new_and_rewritten_files_and_drops_orphans(tmp_path):
    first, second = write_ckpt(tmp_path / "a-1_1.ckpt"), write_ckpt(tmp_path / "a-1_2.ckpt", seed=1)
    (tmp_path / "meta.json").write_text("{}")
    assert sorted(p.name for p in write_missing_manifests(tmp_path)) == ["a-1_1.ckpt.sha256", "a-1_2.ckpt.sha256"]
    assert write_missing_manifests(tmp_path) == []  # up to date: nothing hashed again
    write_ckpt(second, seed=2)  # re-saved under the same name
    os.utime(second, ns=(second.stat().st_atime_ns, manifest_path(second).stat().st_mtime_ns + 10**9))
    assert write_missing_manifests(tmp_path) == [manifest_path(second)]
    assert verify_checkpoint(second)
    first.unlink()  # MindFormers removed it (keep_checkpoint_max)
    write_missing_manifests(tmp_path)
    assert not manifest_path(first).exists()
    assert write_missing_manifests(tmp_path / "absent") == []


def test_file_that_changes_while_hashed_gets_no_sidecar(tmp_path, monkeypatch):
    import telechat2.manifest as manifest

    ckpt = write_ckpt(tmp_path / "a.ckpt")

    def resaved_meanwhile(path):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        write_ckpt(ckpt, seed=3)
        return digest

    monkeypatch.setattr(manifest, "file_sha256", resaved_meanwhile)
    assert write_manifest(ckpt) is None and not manifest_path(ckpt).exists()


def test_callback_hashes_what_the_checkpoint_callback_saved(tmp_path):
    from mindspore.train import CheckpointConfig, ModelCheckpoint

    saver = ModelCheckpoint("telechat", str(tmp_path / "rank_0"), CheckpointConfig(save_checkpoint_steps=1))
    context = SimpleNamespace(original_args=lambda: SimpleNamespace(list_callback=[saver]))
    callback = manifest_callback(tmp_path / "unused")
    write_ckpt(tmp_path / "rank_0" / "telechat-1_1.ckpt")
    callback.on_train_step_end(context)
    write_ckpt(tmp_path / "rank_0" / "telechat-1_2.ckpt")
    callback.on_train_step_end(context)
    callback.on_train_end(context)  # waits for the background sweep and sweeps once more
    for name in ("telechat-1_1.ckpt", "telechat-1_2.ckpt"):
        assert verify_checkpoint(tmp_path / "rank_0" / name)
    assert not (tmp_path / "unused").exists()

    fallback = manifest_callback(tmp_path / "rank_1")
    write_ckpt(tmp_path / "rank_1" / "x-1_1.ckpt")
    fallback.on_train_end(SimpleNamespace(original_args=lambda: SimpleNamespace(list_callback=[])))
    assert verify_checkpoint(tmp_path / "rank_1" / "x-1_1.ckpt")

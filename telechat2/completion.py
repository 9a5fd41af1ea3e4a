"""Completion markers and termination messages for the commands the operator runs in its initializer pod.

`telechat2 preprocess` and `telechat2 convert` write `<output>.complete` (JSON) after a successful run, atomically
(a temporary file renamed into place, after the output itself is in place). It records what the output was made
from (each input file's name and size, and a SHA-256: of the whole file up to HASH_WHOLE_BYTES, else of its first and
last HASH_EDGE_BYTES plus its mtime, so a 200 GB checkpoint is not read twice) and the output files with their sizes.
With `--skip-if-complete` a command whose marker matches its inputs and whose outputs are all there with those
sizes exits 0 at once: an initializer pod re-run by a restarted operator, or a second job on the same data, costs
nothing. Any mismatch removes the marker before the work is redone.

`--termination-message-path` (the pod's /dev/termination-log) receives the error text of a failed run (the line or
tensor at fault), which Kubernetes puts in the container's terminated state for the operator to report.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MARKER_SUFFIX = ".complete"
MARKER_VERSION = 1
HASH_WHOLE_BYTES = 256 * 2**20
HASH_EDGE_BYTES = 2**20
# Kubernetes keeps at most 4096 bytes of a termination message.
MAX_TERMINATION_MESSAGE = 4000


def marker_path(output: str | os.PathLike[str]) -> Path:
    return Path(f"{output}{MARKER_SUFFIX}")


def fingerprint(path: Path) -> dict[str, Any]:
    """Name, size and a SHA-256 identifying one input file (see the module docstring)."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if stat.st_size <= HASH_WHOLE_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                digest.update(block)
            return {"name": str(path), "size": stat.st_size, "sha256": digest.hexdigest()}
        digest.update(fh.read(HASH_EDGE_BYTES))
        fh.seek(-HASH_EDGE_BYTES, os.SEEK_END)
        digest.update(fh.read(HASH_EDGE_BYTES))
    return {"name": str(path), "size": stat.st_size, "edges_sha256": digest.hexdigest(), "mtime_ns": stat.st_mtime_ns}


def describe_inputs(files: Iterable[Path], **settings: Any) -> dict[str, Any]:
    """What an output is made from: the input files' fingerprints and the settings that change the output."""
    return {"files": [fingerprint(Path(f)) for f in files], "settings": settings}


def is_complete(output: str | os.PathLike[str], inputs: Mapping[str, Any]) -> bool:
    """True when the marker says the output was made from exactly `inputs` and every output file is there."""
    try:
        marker = json.loads(marker_path(output).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION or marker.get("inputs") != inputs:
        return False
    outputs = marker.get("outputs")
    if not isinstance(outputs, list) or not outputs:
        return False
    for entry in outputs:
        try:
            if Path(entry["name"]).stat().st_size != entry["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def invalidate(output: str | os.PathLike[str]) -> None:
    """Remove the marker before redoing the work: a run that dies half-way leaves no marker behind."""
    with contextlib.suppress(FileNotFoundError):
        marker_path(output).unlink()


def write_marker(output: str | os.PathLike[str], inputs: Mapping[str, Any], outputs: Iterable[Path]) -> Path:
    """Record a finished output, atomically (a reader sees the old marker, no marker, or the whole new one)."""
    target = marker_path(output)
    body = {
        "version": MARKER_VERSION,
        "inputs": dict(inputs),
        "outputs": [{"name": str(p), "size": Path(p).stat().st_size} for p in outputs],
    }
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return target


def write_termination_message(path: str | os.PathLike[str] | None, message: str) -> None:
    """Best effort: the message (cut to what Kubernetes keeps) for the pod's terminated state."""
    if not path:
        return
    data = message.encode("utf-8")[:MAX_TERMINATION_MESSAGE].decode("utf-8", errors="ignore")
    with contextlib.suppress(OSError):
        Path(path).write_text(data, encoding="utf-8")


def add_completion_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags the operator's initializer pod passes (telechat2.completion)."""
    parser.add_argument(
        "--skip-if-complete",
        "--skip_if_complete",
        action="store_true",
        help="exit 0 at once when the output's .complete marker matches these inputs and settings",
    )
    parser.add_argument(
        "--termination-message-path",
        "--termination_message_path",
        help="write the error of a failed run here (a pod's /dev/termination-log)",
    )

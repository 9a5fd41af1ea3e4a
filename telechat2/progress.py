"""Training progress: one small JSON file per rank, written by a MindSpore callback, served read-only by rank 0.

Why files: every rank runs in its own process (msrun workers) and often on its own node; the output directory is
the one place they all share. Each rank rewrites `<output_dir>/progress/rank_<R>.json` atomically (temporary file
then `os.replace`) at the end of every step, so a reader never sees half a record:

    {"rank": 0, "attempt": 1, "step": 12, "totalSteps": 40, "epoch": 1, "loss": 4.21, "stepSeconds": 0.8,
     "tokensPerSecond": 1280.0, "time": 1767322800.0, "checkpointSteps": [10]}

`step` counts optimizer steps across epochs (a resumed run continues the count), `checkpointSteps` are the steps
for which this rank's checkpoint file exists under `<output_dir>/checkpoint/rank_<R>/` (MindFormers names them
`<prefix>-<epoch>_<step in epoch>.ckpt`). Rank 0's `telechat2 launch` serves every rank's record on
`GET /progress` as `{"workers": N, "ranks": [record, ...]}`; the operator turns that into the job's status
(`telechat_operator.progress`), including the newest checkpoint every rank has.

Importing this module never imports MindSpore (`progress_callback` does, lazily).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROGRESS_DIR = "progress"
PROGRESS_PATH = "/progress"
DEFAULT_PORT = 8119
# `<prefix>-<epoch>_<step in epoch>.ckpt` (MindFormers' CheckpointMonitor).
CKPT_NAME = re.compile(r"-(\d+)_(\d+)\.ckpt$")
RECORD_LIMIT_BYTES = 64 * 1024  # a rank record is ~300 bytes; anything bigger is not ours


def record_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / PROGRESS_DIR / f"rank_{rank}.json"


def write_record(output_dir: str | Path, rank: int, record: Mapping[str, Any]) -> Path:
    """Atomically replace this rank's record (readers see the old or the new file, never a partial one)."""
    path = record_path(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".rank_{rank}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(dict(record), handle, separators=(",", ":"), allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_records(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's latest record, by rank; unreadable or foreign files are skipped (a rank mid-replace is not)."""
    records = []
    for path in sorted((Path(output_dir) / PROGRESS_DIR).glob("rank_*.json")):
        try:
            if path.stat().st_size > RECORD_LIMIT_BYTES:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            records.append(record)
    return sorted(records, key=lambda record: record["rank"])


def checkpoint_steps(rank_dir: str | Path, steps_per_epoch: int) -> list[int]:
    """Global steps for which a checkpoint file of this rank exists (epoch and step-in-epoch from the name)."""
    found = set()
    for path in Path(rank_dir).glob("*.ckpt"):
        match = CKPT_NAME.search(path.name)
        if match:
            epoch, step = int(match.group(1)), int(match.group(2))
            found.add((epoch - 1) * steps_per_epoch + step)
    return sorted(found)


def progress_document(output_dir: str | Path, workers: int) -> dict[str, Any]:
    return {"workers": workers, "ranks": read_records(output_dir)}


# --- the callback (MindSpore imported lazily) -------------------------------------------------------------------


def _loss_of(net_outputs: Any) -> float | None:
    """The loss from a train step's outputs: MindFormers' one-step cells return (loss, overflow, scale, ...)."""
    value = net_outputs[0] if isinstance(net_outputs, tuple | list) else net_outputs
    try:
        loss = float(value.asnumpy().mean()) if hasattr(value, "asnumpy") else float(value)
    except (TypeError, ValueError):
        return None
    return loss if loss == loss and abs(loss) != float("inf") else None  # JSON has no NaN/inf


def progress_callback(
    output_dir: str | Path, rank: int, epochs: int, seq_length: int, tokens_scale: int = 1, attempt: int = 0
) -> Any:
    """A MindSpore `Callback` writing this rank's progress record after every step.

    `tokens_scale` turns the tokens this rank's dataset yields per step into the job's: the data-parallel degree
    when each rank reads its own shard, 1 when every rank reads the full batch (semi-auto parallel full_batch)."""
    from mindspore.train.callback import Callback

    class ProgressCallback(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step_started = time.time()
            self.durations: list[float] = []
            self.last: dict[str, Any] | None = None
            self.steps_per_epoch = 1

        def on_train_step_begin(self, run_context: Any) -> None:
            self.step_started = time.time()

        def on_train_step_end(self, run_context: Any) -> None:
            params = run_context.original_args()
            dataset = params.get("train_dataset")
            elapsed = time.time() - self.step_started
            if params.get("dataset_sink_mode") and dataset is not None:
                # One "step" of the callback is a sink of batch_num steps; an epoch is the dataset's size.
                elapsed /= max(int(params.batch_num), 1)
                steps_per_epoch = int(dataset.get_dataset_size())
            else:
                steps_per_epoch = int(params.batch_num)
            self.durations = [*self.durations[-9:], elapsed]
            step_seconds = sum(self.durations) / len(self.durations)
            step = int(params.cur_step_num) + int(params.get("initial_step", 0) or 0)
            batch = int(dataset.get_batch_size()) if dataset is not None else 0
            tokens = batch * seq_length * tokens_scale
            self.steps_per_epoch = steps_per_epoch
            record = {
                "rank": rank,
                "attempt": attempt,
                "step": step,
                "totalSteps": epochs * steps_per_epoch,
                "epoch": (step - 1) // steps_per_epoch + 1,
                "loss": _loss_of(params.net_outputs),
                "stepSeconds": round(step_seconds, 6),
                "tokensPerSecond": round(tokens / step_seconds, 3) if step_seconds > 0 and tokens else None,
                "time": time.time(),
                "checkpointSteps": checkpoint_steps(Path(output_dir) / "checkpoint" / f"rank_{rank}", steps_per_epoch),
            }
            self.last = record
            self.write(record)

        def on_train_end(self, run_context: Any) -> None:
            """The checkpoint saved when training ends comes after the last step's record: list it too (this
            callback runs after MindFormers' CheckpointMonitor)."""
            if self.last is not None:
                rank_dir = Path(output_dir) / "checkpoint" / f"rank_{rank}"
                self.write({**self.last, "checkpointSteps": checkpoint_steps(rank_dir, self.steps_per_epoch)})

        def write(self, record: dict[str, Any]) -> None:
            try:
                write_record(output_dir, rank, record)
            except (OSError, ValueError) as err:  # progress is informative: never stop training over it
                print(f"telechat2 finetune: could not write progress: {err}", flush=True)

    return ProgressCallback()


# --- the endpoint (rank 0's launch wrapper) ---------------------------------------------------------------------


class ProgressServer:
    """`GET /progress` on a background thread: read-only, JSON, every rank's record read from disk per request."""

    def __init__(self, output_dir: str | Path, workers: int, port: int, host: str = "0.0.0.0") -> None:
        directory, world = Path(output_dir), workers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != PROGRESS_PATH:
                    self.send_error(404, "only GET /progress is served")
                    return
                body = json.dumps(progress_document(directory, world)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the operator polls: keep the log clean
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="progress-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> ProgressServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""`telechat2 preprocess`: a jsonl chat dataset -> packed MindRecord for finetuning.

Layout (facts file, section 4; the seed's telechat_preprocess.py):
- a line is {"input": ..., "output": ...}; `input` may carry history `<_user>q1<_bot>a1<_user>q2`;
- a sample is `[<_start>] + per (q, a): [<_user>] + ids(q) + [<_bot>] + ids(a) + [<_end>]`; labels are -100 for
  `<_start>` and every prompt token (`<_user>`, q, `<_bot>`), the answer ids and `<_end>` otherwise, so every bot
  answer (history included) is trained and user turns are masked;
- samples are packed in input order while the pack stays shorter than max_length + 1 tokens, then left-padded with
  `<_pad>` (label -100) to exactly max_length + 1;
- MindRecord schema {"input_ids": int32 [-1], "labels": int32 [-1]}.

The reference script prepends every packed sample's `<_start>` at the front of its pack (it does so inside its
per-conversation loop); here each `<_start>` stays before its own sample, as the layout above says.

Unlike the reference: the final partial pack is written; an over-long sample (more than max_length tokens) is never
dropped silently (`--overlong error|truncate|skip`, lines listed); a malformed line fails the run with its line
number unless `--skip-bad-lines` (a line longer than `--max-line-bytes`, default 4 MiB, counts as malformed and is
never parsed or tokenized, so a hostile 50 MB line costs no memory; a lone surrogate escape, JSON nested too deeply
and a vocab file that is not a sentencepiece model are named too, and a UTF-8 BOM opening a line is dropped);
output is written into a temporary directory beside the target and renamed into place only when everything
succeeded, so a failed run leaves no output file.

The parse / tokenize / pack steps are pure functions; only `write_mindrecord` touches MindSpore.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from telechat2.tokenizer import BOS_ID, BOT, BOT_ID, END, EOS_ID, IGNORE_INDEX, PAD_ID, USER, USER_ID

if TYPE_CHECKING:
    from telechat2.tokenizer import TeleChat2Tokenizer

OVERLONG_POLICIES = ("error", "truncate", "skip")
SCHEMA = {"input_ids": {"type": "int32", "shape": [-1]}, "labels": {"type": "int32", "shape": [-1]}}
DEFAULT_OUTPUT_NAME = "dataset.mindrecord"
MAX_LISTED_LINES = 20  # error messages list this many line numbers, then a count
# Lines longer than this are refused before JSON parsing and tokenization (`--max-line-bytes` raises it):
# parsing and tokenizing one huge line costs about 110 bytes of memory per input byte (a 50.9 MB line: 5.8 GiB with the
# tiny tokenizer, tests/bench/results/preprocess.md; the issue saw 8.8 GiB). 4 MiB is far beyond any sample of
# max_length 8192 (at most ~100 bytes of JSON per token, with \uXXXX escapes): only a broken or hostile line meets it.
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
_READ_CHUNK = 1 << 20  # the rest of an over-long line is skipped in pieces of this size
_BOM = "\ufeff"


class BadLine(ValueError):
    """A dataset line that cannot be turned into a sample; `where` is "LINE" or "FILE:LINE"."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"line {where}: {reason}")
        self.where = where
        self.reason = reason


class PreprocessError(RuntimeError):
    """The run failed; nothing was written."""


# -- parsing --------------------------------------------------------------------------------------------------------


def conversation_turns(input_text: str, output_text: str) -> list[tuple[str, str]]:
    """Split a record into (question, answer) pairs, the last answer being `output`.

    `input` is the current question, optionally preceded by history `<_user>q<_bot>a` turns (a missing leading
    `<_user>` is added, a trailing `<_bot>` after the last question and an `<_end>` closing a history answer are
    tolerated). Anything else is ambiguous and raises ValueError.
    """
    text = input_text if input_text.startswith(USER) else USER + input_text
    turns = text.split(USER)[1:]
    if turns[-1].endswith(BOT):
        turns[-1] = turns[-1][: -len(BOT)]
    pairs: list[tuple[str, str]] = []
    for index, turn in enumerate(turns[:-1], start=1):
        parts = turn.split(BOT)
        if len(parts) != 2:
            problem = "has no <_bot> answer" if len(parts) == 1 else f"has {len(parts) - 1} <_bot> markers"
            raise ValueError(f"input: history turn {index} of {len(turns)} {problem}")
        question, answer = parts
        pairs.append((question, answer.removesuffix(END)))
    if BOT in turns[-1]:
        raise ValueError("input: the last <_user> turn must be the question, without a <_bot> answer")
    pairs.append((turns[-1], output_text))
    return pairs


def parse_record(line: str, where: str) -> list[tuple[str, str]]:
    """One jsonl line -> (question, answer) pairs; BadLine names the line and the problem."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadLine(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise BadLine(where, "JSON nested too deeply (expected an object with string fields input, output)") from None
    if not isinstance(record, dict):
        raise BadLine(where, f"expected a JSON object with input and output, got {type(record).__name__}")
    for key in ("input", "output"):
        if key not in record:
            raise BadLine(where, f"missing field {key!r}")
        if not isinstance(record[key], str):
            raise BadLine(where, f"field {key!r} must be a string, got {type(record[key]).__name__}")
        try:
            record[key].encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON allows "\ud800" escapes that are no character at all
            code = ord(record[key][exc.start])
            reason = f"field {key!r} holds a lone surrogate \\u{code:04x} at character {exc.start} (not valid Unicode)"
            raise BadLine(where, reason) from None
    if not record["output"].strip():
        raise BadLine(where, "field 'output' is empty")
    try:
        return conversation_turns(record["input"], record["output"])
    except ValueError as exc:
        raise BadLine(where, str(exc)) from None


# -- tokens ---------------------------------------------------------------------------------------------------------


def sample_from_ids(pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int]]:
    """(question ids, answer ids) pairs -> (input_ids, labels) of one sample, `<_start>` first."""
    input_ids = [BOS_ID]
    labels = [IGNORE_INDEX]
    for question, answer in pairs:
        input_ids += [USER_ID, *question, BOT_ID, *answer, EOS_ID]
        labels += [IGNORE_INDEX] * (len(question) + 2)
        labels += [*answer, EOS_ID]
    return input_ids, labels


def tokenize_samples(
    tokenizer: TeleChat2Tokenizer, conversations: Sequence[Sequence[tuple[str, str]]]
) -> list[tuple[list[int], list[int]]]:
    """Tokenize many conversations with one batched sentencepiece call."""
    texts = [text for pairs in conversations for pair in pairs for text in pair]
    encoded = iter(tokenizer.encode_batch(texts))
    samples = []
    for pairs in conversations:
        samples.append(sample_from_ids([(next(encoded), next(encoded)) for _ in pairs]))
    return samples


def left_pad(input_ids: Sequence[int], labels: Sequence[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad on the left with <_pad> (label -100) to `length`."""
    if len(input_ids) > length:
        raise ValueError(f"pack of {len(input_ids)} tokens does not fit {length}")
    ids = np.full(length, PAD_ID, dtype=np.int32)
    lab = np.full(length, IGNORE_INDEX, dtype=np.int32)
    if input_ids:
        ids[length - len(input_ids) :] = input_ids
        lab[length - len(labels) :] = labels
    return ids, lab


def pack_samples(
    samples: Iterable[tuple[Sequence[int], Sequence[int]]], max_length: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Pack samples in order: a pack takes samples while its length stays below max_length + 1, then is
    left-padded to max_length + 1. The last, partial pack is yielded too. Samples must be <= max_length tokens."""
    row = max_length + 1
    pack_ids: list[int] = []
    pack_labels: list[int] = []
    for input_ids, labels in samples:
        if len(input_ids) > max_length:
            raise ValueError(f"sample of {len(input_ids)} tokens is longer than max_length {max_length}")
        if pack_ids and len(pack_ids) + len(input_ids) >= row:
            yield left_pad(pack_ids, pack_labels, row)
            pack_ids, pack_labels = [], []
        pack_ids += input_ids
        pack_labels += labels
    if pack_ids:
        yield left_pad(pack_ids, pack_labels, row)


def truncate_sample(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the first max_length tokens (the conversation's start; the tail of the last answer goes)."""
    return input_ids[:max_length], labels[:max_length]


# -- reading --------------------------------------------------------------------------------------------------------


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The jsonl file, or every *.jsonl / *.json file of a directory in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
        if not files:
            raise PreprocessError(f"--input_dataset_file {path}: directory holds no .jsonl or .json file")
        return files
    if not path.is_file():
        raise PreprocessError(f"--input_dataset_file {path}: no such file")
    return [path]


def _raw_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes | int, int]]:
    """(line bytes, bytes read) per line; for a line longer than max_line_bytes (newline not counted) its length
    instead of its bytes, the line read and dropped piece by piece so memory stays bounded."""
    while True:
        raw = fh.readline(max_line_bytes + 1)
        if not raw:
            return
        length = len(raw) - raw.endswith(b"\n")
        if length <= max_line_bytes:
            yield raw, len(raw)
            continue
        read = len(raw)
        while not raw.endswith(b"\n"):
            raw = fh.readline(_READ_CHUNK)
            if not raw:
                break
            read += len(raw)
            length += len(raw) - raw.endswith(b"\n")
        yield length, read


def read_lines(
    files: Sequence[Path], progress: bool = False, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Iterator[tuple[str, str | BadLine | None]]:
    """(where, text) for every non-blank line, text None when it is not UTF-8 and a BadLine when it is longer
    than max_line_bytes (it is never held in memory whole); `where` is the line number, prefixed by the file name
    when there are several files. A UTF-8 byte order mark at the start of a line is dropped (files concatenated
    from BOM-prefixed exports carry one on many lines)."""
    total = sum(f.stat().st_size for f in files)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr)
    try:
        for file in files:
            with file.open("rb") as fh:
                for number, (raw, read) in enumerate(_raw_lines(fh, max_line_bytes), start=1):
                    if bar is not None:
                        bar.update(read)
                    where = f"{file.name}:{number}" if len(files) > 1 else str(number)
                    if isinstance(raw, int):
                        yield (
                            where,
                            BadLine(
                                where,
                                f"line of {raw} bytes is longer than --max-line-bytes {max_line_bytes}; it was not "
                                "parsed (raise --max-line-bytes to read it)",
                            ),
                        )
                        continue
                    try:
                        text = raw.decode("utf-8").removeprefix(_BOM)
                    except UnicodeDecodeError:
                        yield where, None
                        continue
                    if text.strip():
                        yield where, text
    finally:
        if bar is not None:
            bar.close()


# -- the run --------------------------------------------------------------------------------------------------------


@dataclass
class PreprocessReport:
    """What a run read and wrote."""

    output_file: Path | None = None
    lines: int = 0
    samples: int = 0
    packs: int = 0
    tokens: int = 0  # non-pad tokens written
    bad_lines: list[BadLine] = field(default_factory=list)
    overlong_lines: list[str] = field(default_factory=list)
    overlong_policy: str = "error"

    row_length: int = 0  # max_length + 1

    @property
    def padding_ratio(self) -> float:
        return 0.0 if not self.packs else 1 - self.tokens / (self.packs * self.row_length)

    def summary(self) -> str:
        parts = [
            _plural(self.lines, "line"),
            _plural(self.samples, "sample"),
            f"{_plural(self.packs, 'pack')} of {self.row_length} tokens",
            f"{_plural(self.tokens, 'token')} ({self.padding_ratio:.1%} padding)",
        ]
        if self.overlong_lines:
            verb = {"truncate": "truncated", "skip": "skipped", "error": "over-long"}[self.overlong_policy]
            parts.append(f"{len(self.overlong_lines)} over-long {verb} (lines {_listing(self.overlong_lines)})")
        if self.bad_lines:
            parts.append(f"{_plural(len(self.bad_lines), 'bad line')} skipped")
        return ", ".join(parts)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_LINES])
    return shown + (f" and {len(items) - MAX_LISTED_LINES} more" if len(items) > MAX_LISTED_LINES else "")


def iter_samples(
    tokenizer: TeleChat2Tokenizer,
    lines: Iterable[tuple[str, str | BadLine | None]],
    max_length: int,
    report: PreprocessReport,
    skip_bad_lines: bool = False,
    overlong: str = "error",
    chunk_size: int = 512,
) -> Iterator[tuple[list[int], list[int]]]:
    """Parse, tokenize (in batches) and apply the over-long policy; problems are recorded in `report`.

    Bad lines are collected even when they fail the run, so one run reports all of them.
    """
    chunk: list[tuple[str, list[tuple[str, str]]]] = []

    def flush() -> Iterator[tuple[list[int], list[int]]]:
        samples = tokenize_samples(tokenizer, [pairs for _, pairs in chunk])
        for (where, _), (input_ids, labels) in zip(chunk, samples, strict=True):
            if len(input_ids) > max_length:
                report.overlong_lines.append(where)
                if overlong == "truncate":
                    input_ids, labels = truncate_sample(input_ids, labels, max_length)
                else:
                    continue
            report.samples += 1
            yield input_ids, labels
        chunk.clear()

    for where, text in lines:
        report.lines += 1
        try:
            if text is None:
                raise BadLine(where, "not valid UTF-8")
            if isinstance(text, BadLine):
                raise text
            chunk.append((where, parse_record(text, where)))
        except BadLine as bad:
            report.bad_lines.append(bad)
            if not skip_bad_lines and len(report.bad_lines) > 10 * MAX_LISTED_LINES:
                break  # enough to show; the run fails anyway
            continue
        if len(chunk) >= chunk_size:
            yield from flush()
    if chunk:
        yield from flush()


def resolve_output(output_path: str | os.PathLike[str]) -> Path:
    """A path ending in .mindrecord is the file; anything else is a directory that gets dataset.mindrecord
    (the seed's rule)."""
    path = Path(output_path)
    return path if path.suffix == ".mindrecord" else path / DEFAULT_OUTPUT_NAME


class _MindRecordSink:
    """Writes rows into <tmpdir>/<name> beside the target; `commit` renames the .mindrecord and .db into place."""

    def __init__(self, target: Path, rows_per_write: int = 256) -> None:
        from mindspore.mindrecord import FileWriter  # deferred: only writing needs MindSpore

        self.target = target
        self.created_dirs = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmpdir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        self.writer = FileWriter(str(self.tmpdir / target.name), shard_num=1, overwrite=True)
        self.writer.add_schema(SCHEMA, "telechat2 packed chat samples")
        self.rows_per_write = rows_per_write
        self.pending: list[dict[str, np.ndarray]] = []

    def write(self, input_ids: np.ndarray, labels: np.ndarray) -> None:
        self.pending.append({"input_ids": input_ids, "labels": labels})
        if len(self.pending) >= self.rows_per_write:
            self.writer.write_raw_data(self.pending)
            self.pending = []

    def commit(self) -> None:
        if self.pending:
            self.writer.write_raw_data(self.pending)
        self.writer.commit()
        written = self.tmpdir / self.target.name
        for suffix in (".db", ""):  # index first: a reader finds the data file only once both are in place
            os.replace(f"{written}{suffix}", f"{self.target}{suffix}")
        self.created_dirs = []  # they hold the output now
        self.discard()

    def discard(self) -> None:
        """Remove the temporary directory (and output directories this run created, if left empty)."""
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        for directory in self.created_dirs:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def preprocess(
    input_dataset_file: str | os.PathLike[str],
    vocab_file_path: str | os.PathLike[str],
    max_length: int,
    output_path: str | os.PathLike[str],
    *,
    overlong: str = "error",
    skip_bad_lines: bool = False,
    shuffle: bool = False,
    seed: int = 2024,
    progress: bool = False,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PreprocessReport:
    """Run the whole conversion; raises PreprocessError (and writes nothing) on bad input."""
    from telechat2.tokenizer import TeleChat2Tokenizer

    if max_length < 4:
        raise PreprocessError(f"--max_length must be at least 4, got {max_length}")
    if overlong not in OVERLONG_POLICIES:
        raise PreprocessError(f"--overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_line_bytes < 1:
        raise PreprocessError(f"--max-line-bytes must be positive, got {max_line_bytes}")
    files = input_files(input_dataset_file)
    try:
        tokenizer = TeleChat2Tokenizer(vocab_file_path)
    except ValueError as exc:  # not a sentencepiece model, or not TeleChat2's (a missing file stays FileNotFoundError)
        raise PreprocessError(f"--vocab_file_path: {exc}") from None
    target = resolve_output(output_path)
    report = PreprocessReport(output_file=target, overlong_policy=overlong, row_length=max_length + 1)
    samples: Iterable[tuple[list[int], list[int]]] = iter_samples(
        tokenizer, read_lines(files, progress, max_line_bytes), max_length, report, skip_bad_lines, overlong
    )
    if shuffle:
        samples = list(samples)
        random.Random(seed).shuffle(samples)
    sink = _MindRecordSink(target)
    try:
        for input_ids, labels in pack_samples(samples, max_length):
            report.packs += 1
            report.tokens += len(input_ids) - int(np.argmax(input_ids != PAD_ID))  # pads are only on the left
            if not report.bad_lines or skip_bad_lines:
                sink.write(input_ids, labels)
        _check(report, skip_bad_lines, overlong)
        sink.commit()
    except BaseException:
        sink.discard()
        raise
    return report


def _check(report: PreprocessReport, skip_bad_lines: bool, overlong: str) -> None:
    if report.bad_lines and not skip_bad_lines:
        listed = "; ".join(str(bad) for bad in report.bad_lines[:MAX_LISTED_LINES])
        more = len(report.bad_lines) - MAX_LISTED_LINES
        count = len(report.bad_lines)
        at_least = "at least " if count > 10 * MAX_LISTED_LINES else ""  # reading stopped early
        raise PreprocessError(
            f"{at_least}{count} malformed line(s): {listed}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Fix them or pass --skip-bad-lines; nothing was written."
        )
    if report.overlong_lines and overlong == "error":
        raise PreprocessError(
            f"{len(report.overlong_lines)} sample(s) longer than --max_length {report.row_length - 1} tokens "
            f"at line(s) {_listing(report.overlong_lines)}. Pass --overlong truncate or --overlong skip, or raise "
            "--max_length; nothing was written."
        )
    if report.packs == 0:
        raise PreprocessError("no samples to write (every line was skipped or the input is empty)")


# -- command line -------------------------------------------------------------------------------------------------


def byte_size(text: str) -> int:
    """'4194304', '8MiB', '50MB' -> bytes (for --max-line-bytes)."""
    from telechat2.convert_reversed import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--max_shard_size ", "")) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return size


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input_dataset_file", "--input-dataset-file", required=True, help="jsonl file (or a directory of them)"
    )
    parser.add_argument("--vocab_file_path", "--vocab-file-path", required=True, help="tokenizer.model")
    parser.add_argument("--max_length", "--max-length", type=int, default=8192, help="rows are max_length + 1")
    parser.add_argument(
        "--output_path",
        "--output-path",
        required=True,
        help="a .mindrecord file path, or a directory that receives dataset.mindrecord (and its .db index)",
    )
    parser.add_argument(
        "--overlong",
        choices=OVERLONG_POLICIES,
        default="error",
        help="samples longer than max_length: fail listing their lines (default), keep their first max_length "
        "tokens, or leave them out",
    )
    parser.add_argument(
        "--skip-bad-lines", "--skip_bad_lines", action="store_true", help="report malformed lines instead of failing"
    )
    parser.add_argument(
        "--max-line-bytes",
        "--max_line_bytes",
        type=byte_size,
        default=DEFAULT_MAX_LINE_BYTES,
        help="refuse (as a malformed line) any line longer than this, before parsing it; accepts 8MiB, 50MB, ... "
        f"(default {DEFAULT_MAX_LINE_BYTES // 2**20}MiB)",
    )
    parser.add_argument("--shuffle", action="store_true", help="shuffle samples before packing (the seed does)")
    parser.add_argument("--seed", type=int, default=2024, help="shuffle seed")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar (default: on a tty)"
    )
    from telechat2.completion import add_completion_arguments

    add_completion_arguments(parser)


def preprocess_inputs(args: argparse.Namespace) -> dict:
    """What the output depends on: the jsonl files, the tokenizer and every setting that changes the rows."""
    from telechat2 import completion

    files = [*input_files(args.input_dataset_file), Path(args.vocab_file_path)]
    return completion.describe_inputs(
        files,
        command="preprocess",
        max_length=args.max_length,
        overlong=args.overlong,
        skip_bad_lines=args.skip_bad_lines,
        shuffle=args.shuffle,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    from telechat2 import completion

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    target = resolve_output(args.output_path)
    try:
        inputs = preprocess_inputs(args)
        if args.skip_if_complete and completion.is_complete(target, inputs):
            print(f"{target} is complete for these inputs ({completion.marker_path(target)}): nothing to do")
            return 0
        completion.invalidate(target)
        report = preprocess(
            args.input_dataset_file,
            args.vocab_file_path,
            args.max_length,
            args.output_path,
            overlong=args.overlong,
            skip_bad_lines=args.skip_bad_lines,
            shuffle=args.shuffle,
            seed=args.seed,
            progress=progress,
            max_line_bytes=args.max_line_bytes,
        )
        completion.write_marker(target, inputs, [target, Path(f"{target}.db")])
    except (PreprocessError, OSError, ValueError) as exc:
        print(f"telechat2 preprocess: {exc}", file=sys.stderr)
        completion.write_termination_message(args.termination_message_path, f"telechat2 preprocess: {exc}")
        return 1
    for bad in report.bad_lines:
        print(f"telechat2 preprocess: skipped {bad}", file=sys.stderr)
    print(f"wrote {report.output_file}: {report.summary()}")
    return 0

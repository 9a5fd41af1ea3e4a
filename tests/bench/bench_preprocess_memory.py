"""Peak memory of `telechat2 preprocess` on a dataset holding one huge (50 MB) jsonl line.

    .venv/bin/python tests/bench/bench_preprocess_memory.py [--line-mb 50]
        [--results tests/bench/results/preprocess.md]

Three runs of the real command line, each a child process under GNU `time` (peak RSS = its %M, the child's
`ru_maxrss`; CPU = %U + %S), over the same tiny tokenizer (trained in-process):
- baseline: the dataset without the huge line;
- refused: the dataset with it, default `--max-line-bytes` (4 MiB) and `--skip-bad-lines`, so the line is read and
  dropped in 1 MiB pieces and the run writes the other lines;
- parsed: the same dataset with `--max-line-bytes` raised above the line (and `--overlong skip`): the line goes
  through `json.loads` and sentencepiece, which is what every run did before the limit existed.
The results replace the "Memory on one huge line" section of the results file (bench_preprocess.py keeps it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from telechat2.tokenizer import tiny_corpus, train_tiny_tokenizer  # noqa: E402

HEADING = "## Memory on one huge line"


def measure(command: list[str]) -> tuple[float, int, float, int]:
    """(wall s, peak RSS bytes, CPU s, exit status) of a child process, under GNU time."""
    with tempfile.NamedTemporaryFile(mode="r") as stats:
        started = time.monotonic()
        result = subprocess.run(
            ["/usr/bin/time", "-f", "%M %U %S", "-o", stats.name, *command], capture_output=True, text=True
        )
        wall = time.monotonic() - started
        fields = stats.read().split()
        if len(fields) < 3:
            raise RuntimeError(f"{command} gave no timing: {result.stderr[-2000:]}")
        rss_kib, user, system = fields[-3:]
        return wall, int(rss_kib) * 1024, float(user) + float(system), result.returncode


def huge_record(size: int) -> str:
    """One jsonl record whose input is `size` bytes of the tiny tokenizer's English + Chinese text."""
    block = "\n".join(tiny_corpus(lines=2000, seed=7))
    text = (block * (size // len(block.encode()) + 1)).encode()[:size].decode("utf-8", errors="ignore")
    return json.dumps({"input": text, "output": "an answer"}, ensure_ascii=False)


def replace_section(results: Path, section: str) -> None:
    text = results.read_text() if results.exists() else ""
    head = text.split(HEADING)[0].rstrip("\n")
    results.write_text((head + "\n\n" if head else "") + section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line-mb", type=float, default=50.0, help="size of the huge line in MB (10^6 bytes)")
    parser.add_argument("--results", type=Path, help="results file whose huge-line section is replaced")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-memory-"))
    try:
        vocab = train_tiny_tokenizer(work / "tokenizer.model")
        normal = [
            json.dumps({"input": f"<_user>question {i} about the model", "output": f"answer {i}"}) for i in range(50)
        ]
        (work / "normal.jsonl").write_text("\n".join(normal) + "\n")
        huge = huge_record(int(args.line_mb * 1e6))
        with (work / "huge.jsonl").open("w", encoding="utf-8") as f:
            f.write("\n".join(normal[:25] + [huge] + normal[25:]) + "\n")
        huge_bytes = len(huge.encode())
        del huge

        def preprocess(dataset: str, out: str, *extra: str) -> list[str]:
            return [
                *(sys.executable, "-m", "telechat2.cli", "preprocess", "--input_dataset_file", str(work / dataset)),
                *("--vocab_file_path", str(vocab), "--max_length", "2048", "--output_path", str(work / out)),
                *extra,
            ]

        runs = [
            ("baseline: 50 normal lines, no huge line", preprocess("normal.jsonl", "a")),
            (
                "huge line refused: default `--max-line-bytes` (4 MiB), `--skip-bad-lines`",
                preprocess("huge.jsonl", "b", "--skip-bad-lines"),
            ),
            (
                "huge line parsed and tokenized: `--max-line-bytes 64MiB --overlong skip` (the behaviour before the "
                "limit)",
                preprocess("huge.jsonl", "c", "--max-line-bytes", "64MiB", "--overlong", "skip"),
            ),
        ]
        rows = []
        for name, command in runs:
            wall, rss, cpu, status = measure(command)
            if status != 0:
                raise RuntimeError(f"{name}: exit status {status}")
            rows.append(f"| {name} | {rss / 2**20:,.0f} MiB | {cpu:.1f} s | {wall:.1f} s |")
            print(rows[-1], flush=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    section = "\n".join(
        [
            HEADING,
            "",
            f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} by `tests/bench/bench_preprocess_memory.py "
            f"--line-mb {args.line_mb:g}`: a jsonl of 50 normal lines with one line of {huge_bytes / 1e6:.1f} MB "
            "(English + Chinese text in `input`) in the middle, the tiny tokenizer, `--max_length 2048`. Each run is "
            "`telechat2 preprocess` as a child process under GNU `time`: peak RSS is its %M (`ru_maxrss`), CPU its "
            "%U + %S; wall time is noisy on this shared machine, memory is not.",
            "",
            "| run | peak RSS | CPU | wall |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "The refused line is read in 1 MiB pieces and never decoded, parsed or tokenized, so the run's peak stays "
            "at the baseline's; it is reported as a malformed line naming its number and size (without "
            "`--skip-bad-lines` the run fails and writes nothing).",
            "",
        ]
    )
    print(section)
    if args.results:
        replace_section(args.results, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())

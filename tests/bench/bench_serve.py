"""Continuous batching: `telechat2 serve` with 1, 8 and 32 concurrent clients against sequential requests.

    .venv/bin/python tests/bench/bench_serve.py [--requests 32] [--max-new-tokens 32] [--repeat 3]
        [--clients 1,8,32] [--models tiny,wider,large] [--max-batch-size 32] [--results tests/bench/results/serve.md]

For each model (the tiny TeleChat2; a wider one, 4 layers of hidden 512, whose step on CPU is still mostly
MindSpore's per-operator cost; a large one, ~118M parameters, whose lone decode step is bound by reading the
weights, as a real LLM's decode is on an NPU, and where a batch shares that read), seeded random weights are
written to a checkpoint, a tokenizer is trained in-process and `telechat2 serve` is started as its own process (as
in a pod) with `--max-batch-size`. Then, in the same run and against the same server:
- sequential: one client posting `/generate` one request after another (the baseline: a lone request each time);
- N clients: N client threads, each posting its share of the same requests back to back (closed loop), so up to N
  requests decode together in the server's batch.
Throughput is generated tokens over the wall time of the whole pass; latency is per request (post to answer).
Every answer's token ids (TGI `details`) are checked equal to `generate()` run directly on the same prompt
(greedy), so batching cannot look fast by doing less or by changing answers. (Ids, not text: on a random model a
control token can fall inside a byte-fallback character, and the streamed text of such garbage differs from a
one-shot `decode` of all ids, with or without batching.) Each way runs `--repeat` times after a warm-up pass
(which compiles the batched step for every bucket); the best pass is reported and the slowest too (the machine is
shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # tests/unit/tiny_model.py

MAX_SEQ_LEN = 128
TINY_PREDICT_YAML = Path(__file__).resolve().parents[2] / "telechat2" / "configs" / "telechat2-tiny" / "predict.yaml"
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("tiny (2 layers, hidden 64, 4 heads / 2 KV, FFN 128, vocab 512)", {}),
    "wider": (
        "wider (4 layers, hidden 512, 8 heads / 4 KV, FFN 2048, vocab 512)",
        {"num_layers": 4, "hidden_size": 512, "num_heads": 8, "n_kv_heads": 4, "intermediate_size": 2048},
    ),
    # ~118M parameters (470 MB float32): a lone decode step reads the weights once for one token, the regime of a
    # real LLM's decode, where a batch shares that read (the wider model's step is dominated by per-op costs).
    "large": (
        "large (8 layers, hidden 1024, 16 heads / 8 KV, FFN 4096, vocab 512)",
        {"num_layers": 8, "hidden_size": 1024, "num_heads": 16, "n_kv_heads": 8, "intermediate_size": 4096},
    ),
}


def prompts(count: int) -> list[str]:
    topics = ["data", "training", "the cluster", "memory", "checkpoints", "parallel layers", "tokens", "music"]
    return [f"<_start><_user>please explain {topics[i % len(topics)]} ({i})<_bot>" for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(workdir: Path, name: str, overrides: dict[str, Any]) -> Path:
    """A predict YAML: the packaged telechat2-tiny one with the model's architecture overrides."""
    config = workdir / f"predict_{name}.yaml"
    lines = [f"base_config: [{TINY_PREDICT_YAML}]", "model:", "  model_config:"]
    lines += [f"    {key}: {value}" for key, value in overrides.items()] or ["    seq_length: 64"]
    config.write_text("\n".join(lines) + "\n")
    return config


def start_server(
    config: Path, checkpoint: Path, vocab: Path, port: int, log: Path, max_batch: int, log_level: str = "warning"
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "telechat2.cli", "serve", "--config", str(config),
        "--load_checkpoint", str(checkpoint), "--vocab_file", str(vocab), "--host", "127.0.0.1",
        "--port", str(port), "--max-seq-len", str(MAX_SEQ_LEN), "--max-input-token-len", "96",
        "--max-queue", "256", "--max-batch-size", str(max_batch), "--warm-up", "--log-level", log_level,
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"telechat2 serve did not become ready:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def bench_model(args: argparse.Namespace, key: str, workdir: Path, vocab: Path, clients: list[int]) -> dict:
    """Start a server for one model and measure every way; returns walls, latencies and the workload."""
    from tiny_model import save_tiny_checkpoint

    from telechat2.generation import GenerationConfig, generate
    from telechat2.loading import load_model
    from telechat2.tokenizer import TeleChat2Tokenizer

    label, overrides = MODELS[key]
    tokenizer = TeleChat2Tokenizer(vocab)
    config_file = write_config(workdir, key, overrides)
    _, checkpoint = save_tiny_checkpoint(workdir / f"{key}.ckpt", seed=0, **overrides)
    model = load_model(str(config_file), str(checkpoint), seq_length=MAX_SEQ_LEN)
    texts = prompts(args.requests)
    inputs = [tokenizer.encode(text) for text in texts]
    # Explicit parameters on both sides, so the comparison does not hang on where defaults come from.
    config = GenerationConfig(do_sample=False, repetition_penalty=1.03, max_new_tokens=args.max_new_tokens)
    parameters = {
        "do_sample": False,
        "repetition_penalty": 1.03,
        "max_new_tokens": args.max_new_tokens,
        "details": True,
    }
    expected_ids = [generate(model, ids, config) for ids in inputs]
    generated_tokens = sum(map(len, expected_ids))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = workdir / f"serve-{key}.log"
    server = start_server(config_file, checkpoint, vocab, port, server_log, args.max_batch_size, args.server_log_level)
    ways = ["sequential", *[f"{n} clients" for n in clients]]
    walls: dict[str, list[float]] = {way: [] for way in ways}
    latencies: dict[str, list[list[float]]] = {way: [] for way in ways}
    pool_clients = [httpx.Client(base_url=url, timeout=600) for _ in range(max(clients))]

    def post(client: httpx.Client, index: int) -> float:
        started = time.perf_counter()
        response = client.post("/generate", json={"inputs": texts[index], "parameters": parameters})
        response.raise_for_status()
        got = [token["id"] for token in response.json()["details"]["tokens"]]
        if got != expected_ids[index]:  # ids, not text: see the module docstring
            raise AssertionError(
                f"{key}: request {index}: the server's tokens differ from direct generation:\n"
                f"server {got}\ndirect {expected_ids[index]}"
            )
        return time.perf_counter() - started

    def run(way: str, record: bool) -> None:
        count = 1 if way == "sequential" else int(way.split()[0])
        shares = [list(range(i, len(texts), count)) for i in range(count)]  # client i: requests i, i+count, ...
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=count) as pool:
            per_client = list(pool.map(lambda i: [post(pool_clients[i], j) for j in shares[i]], range(count)))
        wall = time.perf_counter() - started
        if record:
            walls[way].append(wall)
            latencies[way].append([latency for share in per_client for latency in share])

    try:
        wait_ready(url, server, server_log)
        for way in ways:  # warm-up: compiles the batched step for the buckets each way reaches
            run(way, record=False)
        for _ in range(args.repeat):
            for way in ways:
                run(way, record=True)
    finally:
        for client in pool_clients:
            client.close()
        server.terminate()
        server.wait(60)
    return {
        "label": label,
        "inputs": inputs,
        "generated_tokens": generated_tokens,
        "walls": walls,
        "latencies": latencies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--models", default="tiny,wider,large")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument(
        "--server-log-level", default="warning", help="debug: the server log (in the work dir printed) traces each step"
    )
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    from telechat2.tokenizer import train_tiny_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    print(f"work dir (server logs): {workdir}", file=sys.stderr)
    vocab = train_tiny_tokenizer(workdir / "tokenizer.model")
    loads = [os.getloadavg()[0]]
    results = {}
    for key in args.models.split(","):
        results[key] = bench_model(args, key, workdir, vocab, clients)
        loads.append(os.getloadavg()[0])
    report = render(args, results, loads)
    print(report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(report, encoding="utf-8")
        tmp.replace(args.results)
    return 0


def render(args: argparse.Namespace, results: dict[str, dict], loads: list[float]) -> str:
    lines = [
        "# Serving: continuous batching against sequential requests",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC on {platform.machine()}, {os.cpu_count()} cores visible, "
        f"Linux {platform.release()}, Python {platform.python_version()}; load average (1 min) "
        f"{', '.join(f'{load:.1f}' for load in loads)} at the start and after each model (the machine was shared "
        "with other jobs: best and slowest of the repeats are both reported).",
        "",
        f"Command: `.venv/bin/python tests/bench/bench_serve.py --requests {args.requests} --max-new-tokens "
        f"{args.max_new_tokens} --repeat {args.repeat} --clients {args.clients} --models {args.models} "
        f"--max-batch-size {args.max_batch_size}`",
        "",
        f"Workload per pass: {args.requests} prompts, greedy (repetition penalty 1.03), max_new_tokens "
        f"{args.max_new_tokens}, `--max-seq-len {MAX_SEQ_LEN}`, `--max-batch-size {args.max_batch_size}`. The server "
        "is `telechat2 serve` in its own process; clients are threads of the benchmark process. Every answer's "
        "token ids were checked equal to `generate()` run directly on the same prompt. Throughput = generated "
        "tokens / wall time of the pass (best pass); speed-up = against the sequential pass of the same run; "
        "latency = per request, over all repeats; 'vs lone' = p95 latency over the sequential pass's median "
        "latency (a lone request).",
        "",
        "| model | way | wall best s | wall slowest s | tokens/s | speed-up | latency p50 / p95 s | p95 vs lone |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for result in results.values():
        walls, latencies, tokens = result["walls"], result["latencies"], result["generated_tokens"]
        lone = statistics.median([x for run in latencies["sequential"] for x in run])
        for way, times in walls.items():
            flat = [x for run in latencies[way] for x in run]
            speed_up = min(walls["sequential"]) / min(times)
            p95 = percentile(flat, 0.95)
            lines.append(
                f"| {result['label']} | {way} | {min(times):.2f} | {max(times):.2f} | {tokens / min(times):.1f} | "
                f"{speed_up:.2f}x | {statistics.median(flat):.3f} / {p95:.3f} | {p95 / lone:.2f}x |"
            )
            if way != "sequential":
                summary.append(
                    f"{result['label'].split(' ')[0]} {way}: {speed_up:.2f}x throughput, p95 {p95 / lone:.2f}x lone"
                )
        prompt_lengths = [len(ids) for ids in result["inputs"]]
        result["prompt_lengths"] = f"{min(prompt_lengths)}-{max(prompt_lengths)}"
    lines += [
        "",
        "Prompt lengths (tokens): "
        + "; ".join(f"{r['label'].split(' ')[0]} {r['prompt_lengths']}" for r in results.values())
        + "; generated tokens per pass: "
        + "; ".join(f"{r['label'].split(' ')[0]} {r['generated_tokens']}" for r in results.values())
        + ".",
        "",
        "Summary: " + "; ".join(summary) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

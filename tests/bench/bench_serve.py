"""Serving overhead and concurrency: `telechat2 serve` against calling `generate` directly, on the tiny model.

    .venv/bin/python tests/bench/bench_serve.py [--prompts 8] [--max-new-tokens 32] [--repeat 5] [--clients 8]
        [--results tests/bench/results/serve.md]

The tiny TeleChat2 (2 layers, hidden 64, vocab 512, seeded random weights written to a checkpoint; tokenizer
trained in-process), the same prompts and the same greedy parameters, three ways:
- direct: `telechat2.predict.load_model` + `telechat2.generation.generate` in a loop, in this process (the floor);
- server, sequential: `telechat2 serve` started as its own process (as in a pod), one client posting `/generate`
  one request after another (JSON, HTTP, queue hand-off to the generation thread, detokenization);
- server, N concurrent clients: N client threads posting one request each at the same moment; the server queues
  them in front of its single generation thread.
Every server answer is checked equal to the direct one, so the server cannot look fast by doing less. Each repeat
runs the three ways back to back; best and slowest of `--repeat` are reported (the machine is shared). CPU time is
the server process's (from /proc) plus this process's client side, against this process's for direct calls.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # tests/unit/tiny_model.py

MAX_SEQ_LEN = 128
WAYS = {
    "direct": "`generate()` called directly, sequential",
    "sequential": "server `/generate`, one client, sequential",
    "concurrent": "server `/generate`, {clients} concurrent clients",
}


def prompts(count: int) -> list[str]:
    topics = ["data", "training", "the cluster", "memory", "checkpoints", "parallel layers", "tokens", "music"]
    return [f"<_start><_user>please explain {topics[i % len(topics)]} ({i})<_bot>" for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, vocab: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "telechat2.cli", "serve", "--config", "telechat2-tiny",
        "--load_checkpoint", str(checkpoint), "--vocab_file", str(vocab), "--host", "127.0.0.1",
        "--port", str(port), "--max-seq-len", str(MAX_SEQ_LEN), "--max-input-token-len", "96",
        "--max-queue", "64", "--log-level", "warning",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    from tiny_model import save_tiny_checkpoint

    from telechat2.generation import GenerationConfig, generate
    from telechat2.predict import load_model
    from telechat2.tokenizer import TeleChat2Tokenizer, train_tiny_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    vocab = train_tiny_tokenizer(workdir / "tokenizer.model")
    tokenizer = TeleChat2Tokenizer(vocab)
    _, checkpoint = save_tiny_checkpoint(workdir / "tiny.ckpt", seed=0)
    model = load_model("telechat2-tiny", str(checkpoint), seq_length=MAX_SEQ_LEN)
    texts = prompts(args.prompts)
    inputs = [tokenizer.encode(text) for text in texts]
    # Explicit parameters on both sides, so the comparison does not hang on where defaults come from.
    config = GenerationConfig(do_sample=False, repetition_penalty=1.03, max_new_tokens=args.max_new_tokens)
    parameters = {"do_sample": False, "repetition_penalty": 1.03, "max_new_tokens": args.max_new_tokens}
    expected = [tokenizer.decode(generate(model, ids, config), skip_special_tokens=True) for ids in inputs]
    generated_tokens = sum(len(generate(model, ids, config)) for ids in inputs)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = workdir / "serve.log"
    server = start_server(checkpoint, vocab, port, server_log)
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    cpus: dict[str, list[float]] = {way: [] for way in WAYS}  # client (or direct) + server process
    server_cpus: dict[str, list[float]] = {way: [] for way in WAYS}
    latencies: dict[str, list[float]] = {way: [] for way in WAYS}

    def post(client: httpx.Client, text: str) -> tuple[str, float]:
        started = time.perf_counter()
        response = client.post("/generate", json={"inputs": text, "parameters": parameters})
        response.raise_for_status()
        return response.json()["generated_text"], time.perf_counter() - started

    def measure(way: str, run: Callable[[], list[str] | None]) -> None:
        wall, own_cpu, server_cpu = time.perf_counter(), time.process_time(), process_cpu_seconds(server.pid)
        answers = run()
        walls[way].append(time.perf_counter() - wall)
        on_server = process_cpu_seconds(server.pid) - server_cpu if way != "direct" else 0.0
        server_cpus[way].append(on_server)
        cpus[way].append(time.process_time() - own_cpu + on_server)
        if answers is not None and answers != expected:
            raise AssertionError(f"{way}: server answers differ from direct generation")

    def direct() -> None:
        for ids in inputs:
            started = time.perf_counter()
            generate(model, ids, config)
            latencies["direct"].append(time.perf_counter() - started)

    # Clients are made once, outside the measured passes: building an httpx.Client (TLS context) costs more CPU
    # than a request to this server.
    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(args.clients)]

    def sequential() -> list[str]:
        results = [post(clients[0], text) for text in texts]
        latencies["sequential"].extend(latency for _, latency in results)
        return [answer for answer, _ in results]

    def concurrent() -> list[str]:
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            results = list(pool.map(post, [clients[i % len(clients)] for i in range(len(texts))], texts))
        latencies["concurrent"].extend(latency for _, latency in results)
        return [answer for answer, _ in results]

    try:
        wait_ready(url, server, server_log)
        post(clients[0], texts[0])  # warm-up: the server's first request compiles the decode step
        for _ in range(args.repeat):
            measure("direct", direct)
            measure("sequential", sequential)
            measure("concurrent", concurrent)
    finally:
        for client in clients:
            client.close()
        server.terminate()
        server.wait(60)

    report = render(args, inputs, generated_tokens, walls, cpus, server_cpus, latencies)
    print(report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(report, encoding="utf-8")
        tmp.replace(args.results)
    return 0


def render(
    args: argparse.Namespace,
    inputs: list[list[int]],
    generated_tokens: int,
    walls: dict[str, list[float]],
    cpus: dict[str, list[float]],
    server_cpus: dict[str, list[float]],
    latencies: dict[str, list[float]],
) -> str:
    best = {way: min(times) for way, times in walls.items()}
    cpu = {way: min(times) for way, times in cpus.items()}
    requests = len(inputs)
    lines = [
        "# Serving overhead and concurrency",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores visible, Linux "
        f"{platform.release()}, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.1f} (the machine was shared with other jobs: best and slowest of the repeats are "
        "both reported, and CPU seconds, which the sharing disturbs less).",
        "",
        f"Command: `.venv/bin/python tests/bench/bench_serve.py --prompts {args.prompts} --max-new-tokens "
        f"{args.max_new_tokens} --repeat {args.repeat} --clients {args.clients}`",
        "",
        f"Workload: {requests} prompts ({min(map(len, inputs))}-{max(map(len, inputs))} tokens), greedy, "
        f"max_new_tokens {args.max_new_tokens}: {generated_tokens} generated tokens per pass. Model: tiny TeleChat2 "
        "(2 layers, hidden 64, vocab 512, random weights from a checkpoint) on CPU with the KV cache. The server is "
        "`telechat2 serve` in its own process, as in a pod; clients and direct calls run in the benchmark process. "
        "Every server answer was checked equal to the direct `generate` output.",
        "",
        "| way | wall best s | wall slowest s | CPU s (best) | of which server s | tokens/s (best wall) "
        "| request latency p50 / p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for way, label in WAYS.items():
        lat = latencies[way]
        lines.append(
            f"| {label.format(clients=args.clients)} | {best[way]:.2f} | {max(walls[way]):.2f} | {cpu[way]:.2f} | "
            f"{'-' if way == 'direct' else f'{min(server_cpus[way]):.2f}'} | "
            f"{generated_tokens / best[way]:.1f} | {statistics.median(lat):.3f} / {percentile(lat, 0.95):.3f} |"
        )
    overhead_ms = (best["sequential"] - best["direct"]) / requests * 1000
    overhead_cpu_ms = (cpu["sequential"] - cpu["direct"]) / requests * 1000
    lines += [
        "",
        f"- Server overhead per request (best sequential server pass minus best direct pass, divided by "
        f"{requests}): {overhead_ms:.1f} ms wall ({100 * (best['sequential'] / best['direct'] - 1):+.1f}%), "
        f"{overhead_cpu_ms:.1f} ms CPU, client and server together "
        f"({100 * (cpu['sequential'] / cpu['direct'] - 1):+.1f}%), that is "
        f"{overhead_cpu_ms / (generated_tokens / requests):.2f} ms CPU per generated token.",
        f"- Throughput with {args.clients} concurrent clients against sequential requests: "
        f"{best['sequential'] / best['concurrent']:.2f}x.",
        "",
        "How to read it: the server runs one generation at a time on one worker thread (no batching: the generator "
        "decodes one sequence against its KV cache), so concurrent clients are queued, none lost, and throughput "
        "stays that of sequential requests; the waiting requests' HTTP work overlaps the running generation, and "
        "their latency grows with their place in the queue (p95 is about the whole pass).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Serving overhead and concurrency: `telechat2 serve` against calling `generate` directly, on the tiny model.

    .venv/bin/python tests/bench/bench_serve.py [--prompts 8] [--max-new-tokens 16] [--repeat 3]
        [--results tests/bench/results/serve.md]

Same prompts, same greedy config, same model object (tiny TeleChat2: 2 layers, hidden 64, vocab 512, random
weights; tokenizer trained in-process), three ways:
- direct: `telechat2.generation.generate` in a loop, in this process (the floor);
- server, sequential: one client posting `/generate` one request after another to uvicorn on 127.0.0.1
  (JSON, HTTP, queue hand-off to the generation thread, detokenization);
- server, 8 concurrent clients: each client one request at the same time, the server queueing them.
Every server answer is checked equal to the direct one, so the server cannot look fast by doing less. Each
repeat runs the three ways back to back; best and slowest of `--repeat` are reported (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # tests/unit/tiny_model.py


def prompts(count: int) -> list[str]:
    topics = ["data", "training", "the cluster", "memory", "checkpoints", "parallel layers", "tokens", "music"]
    return [f"<_start><_user>please explain {topics[i % len(topics)]} ({i})<_bot>" for i in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    import mindspore as ms
    from tiny_model import build_tiny_model

    from telechat2.generation import GenerationConfig, generate
    from telechat2.serve.app import create_app, serve_in_background
    from telechat2.serve.engine import TeleChat2Engine
    from telechat2.serve.runtime import ServeSettings
    from telechat2.tokenizer import TeleChat2Tokenizer, train_tiny_tokenizer

    ms.set_context(mode=ms.PYNATIVE_MODE)
    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    tokenizer = TeleChat2Tokenizer(train_tiny_tokenizer(workdir / "tokenizer.model"))
    model = build_tiny_model(seed=0, seq_length=128)
    engine = TeleChat2Engine(model, tokenizer)
    texts = prompts(args.prompts)
    inputs = [tokenizer.encode(text) for text in texts]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    body = {"parameters": {"do_sample": False, "max_new_tokens": args.max_new_tokens}}
    settings = ServeSettings(model_name="telechat2-tiny", max_seq_len=128, max_input_token_len=96, max_queue=64)

    expected = [tokenizer.decode(generate(model, ids, config), skip_special_tokens=True) for ids in inputs]  # warm-up
    generated_tokens = sum(len(generate(model, ids, config)) for ids in inputs)
    runs: dict[str, list[float]] = {"direct": [], "sequential": [], "concurrent": []}
    cpu: dict[str, list[float]] = {"direct": [], "sequential": [], "concurrent": []}  # process CPU seconds
    latencies: dict[str, list[float]] = {"direct": [], "sequential": [], "concurrent": []}

    def timed_post(client: httpx.Client, text: str) -> tuple[str, float]:
        started = time.perf_counter()
        response = client.post("/generate", json={"inputs": text, **body})
        response.raise_for_status()
        return response.json()["generated_text"], time.perf_counter() - started

    with (
        serve_in_background(create_app(settings, lambda: engine)) as url,
        httpx.Client(base_url=url, timeout=600) as client,
    ):
        while client.get("/v2/health/ready").status_code != 200:
            time.sleep(0.05)
        timed_post(client, texts[0])  # warm-up
        for _ in range(args.repeat):
            started, cpu_started = time.perf_counter(), time.process_time()
            for ids in inputs:
                t0 = time.perf_counter()
                generate(model, ids, config)
                latencies["direct"].append(time.perf_counter() - t0)
            runs["direct"].append(time.perf_counter() - started)
            cpu["direct"].append(time.process_time() - cpu_started)

            started, cpu_started = time.perf_counter(), time.process_time()
            answers = []
            for text in texts:
                answer, latency = timed_post(client, text)
                answers.append(answer)
                latencies["sequential"].append(latency)
            runs["sequential"].append(time.perf_counter() - started)
            cpu["sequential"].append(time.process_time() - cpu_started)
            assert answers == expected, "server answers differ from direct generation"

            def one_client(text: str) -> tuple[str, float]:
                with httpx.Client(base_url=url, timeout=600) as own:
                    return timed_post(own, text)

            started, cpu_started = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                results = list(pool.map(one_client, texts))
            runs["concurrent"].append(time.perf_counter() - started)
            cpu["concurrent"].append(time.process_time() - cpu_started)
            latencies["concurrent"].extend(latency for _, latency in results)
            assert [answer for answer, _ in results] == expected, "concurrent answers differ"

    best = {name: min(times) for name, times in runs.items()}
    slowest = {name: max(times) for name, times in runs.items()}
    per_request_overhead_ms = (best["sequential"] - best["direct"]) / len(inputs) * 1000
    lines = [
        "# Serving overhead and concurrency",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores visible, Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average at the end {os.getloadavg()[0]:.1f} (the machine was shared with other jobs, so best and "
        "slowest of the repeats are both reported).",
        "",
        f"Command: `.venv/bin/python tests/bench/bench_serve.py --prompts {args.prompts} --max-new-tokens "
        f"{args.max_new_tokens} --repeat {args.repeat} --clients {args.clients}`",
        "",
        f"Workload: {len(inputs)} prompts ({min(map(len, inputs))}-{max(map(len, inputs))} tokens), greedy, "
        f"max_new_tokens {args.max_new_tokens}: {generated_tokens} generated tokens per pass. Model: tiny TeleChat2 "
        "(2 layers, hidden 64, vocab 512, random weights) in MindSpore PyNative on CPU, KV cache on. Every server "
        "answer was checked equal to the direct `generate` output.",
        "",
        "| way | wall best s | wall slowest s | CPU best s | tokens/s (best wall) | request latency p50 / p95 s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "direct": "`generate()` called directly, sequential",
        "sequential": "server `/generate`, one client, sequential",
        "concurrent": f"server `/generate`, {args.clients} concurrent clients",
    }
    for key, label in names.items():
        lat = latencies[key]
        lines.append(
            f"| {label} | {best[key]:.2f} | {slowest[key]:.2f} | {min(cpu[key]):.2f} | "
            f"{generated_tokens / best[key]:.1f} | "
            f"{statistics.median(lat):.2f} / {percentile(lat, 0.95):.2f} |"
        )
    lines += [
        "",
        f"Server overhead per request (best sequential server pass minus best direct pass, per request): "
        f"{per_request_overhead_ms:.1f} ms, {100 * (best['sequential'] / best['direct'] - 1):.1f}% of the direct time; "
        f"in CPU time (whole process: client, server and model, less sensitive to the shared machine) "
        f"{(min(cpu['sequential']) - min(cpu['direct'])) / len(inputs) * 1000:.1f} ms per request, "
        f"{100 * (min(cpu['sequential']) / min(cpu['direct']) - 1):.1f}%.",
        f"Throughput with {args.clients} concurrent clients against sequential requests: "
        f"{best['sequential'] / best['concurrent']:.2f}x.",
        "",
        "How to read it: the server runs one generation at a time on one worker thread (no batching: the generator "
        "decodes one sequence with its KV cache), so concurrent clients are queued, not lost, and throughput stays "
        "that of sequential requests; what concurrency buys is that the HTTP work of the waiting requests overlaps "
        "the running generation. Latency under concurrency grows with the queue (p95 is about the whole batch).",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(report, encoding="utf-8")
        tmp.replace(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

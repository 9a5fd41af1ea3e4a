"""Where a batched request's time goes: `BatchGenerator` alone (no server), per model, best of a few repeats.

    .venv/bin/python tests/bench/profile_batch.py [--models wider,large] [--repeat 5]

For each model (the same architectures as bench_serve.py, seeded random weights built in-process) it times, after a
warm-up that compiles every shape:
- the batched decode step at 1, 8 and 32 rows, and its weight products alone (every layer's and the head's matmuls
  in one compiled graph, same shapes): how much of the step is the arithmetic the rows share;
- the packed prefill of 1, 8 and 32 prompts of 15-22 tokens (the benchmark's prompts), writer included;
- a closed-loop replay of the benchmark's workload (32 requests, 16 new tokens, 1 / 8 / 32 at a time) through
  `BatchGenerator`, with the time spent in prefill steps and in decode-only steps.
The ratios it prints are the ceilings the server can reach on this machine: at N rows the decode throughput is at
most N * step(1) / step(N) times a lone request's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))  # tests/unit/tiny_model.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve.MODELS

SEQ_LENGTH = 128


def best(run, repeat: int) -> float:
    """Best wall seconds of `repeat` calls of run() (each call syncs on its result)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def prompt(length: int, salt: int) -> list[int]:
    return [int(t) for t in (np.arange(length) * 37 + salt * 11) % 490 + 10]


def weight_products(model):
    """A compiled graph of the decode step's weight products only: x [B, H] through every linear layer."""
    import mindspore as ms
    from mindspore import nn, ops

    class Products(nn.Cell):
        def __init__(self, lm) -> None:
            super().__init__(auto_prefix=False)
            self.lm = lm

        @ms.jit
        def construct(self, x):
            out = x
            for layer in self.lm.model.layers:
                attention, mlp = layer.attention, layer.feed_forward
                q, kv = attention.wq(x), attention.wk_v(x)
                context = attention.wo(q)
                hidden = mlp.w2(ops.silu(mlp.w1(context)) * mlp.w3(context))
                out = out + hidden + kv.sum() * 0
            return self.lm.lm_head(out)

    return Products(model)


def profile(key: str, repeat: int) -> list[str]:
    from bench_serve import MODELS
    from mindspore import Tensor
    from tiny_model import build_tiny_model

    from telechat2.batched import BatchGenerator
    from telechat2.generation import GenerationConfig

    label, overrides = MODELS[key]
    model = build_tiny_model(seed=0, seq_length=SEQ_LENGTH, **overrides)
    config = GenerationConfig(max_new_tokens=16, stop_token_ids=(), repetition_penalty=1.03)
    lines = [f"### {label}", ""]
    warm = BatchGenerator(model, 32, compile_prefill=True)
    started = time.perf_counter()
    warm.warm_up()
    lines.append(f"warm-up (compiles): {time.perf_counter() - started:.1f} s")

    products = weight_products(model)
    hidden = model.architecture.hidden_size
    step_ms, product_ms, prefill_ms = {}, {}, {}
    for rows in (1, 8, 32):
        x = Tensor(np.random.default_rng(0).standard_normal((rows, hidden)).astype(np.float32))
        products(x).asnumpy()
        product_ms[rows] = 1e3 * best(lambda x=x: products(x).asnumpy(), repeat)
        batch = BatchGenerator(model, 32, compile_prefill=True)
        for i in range(rows):
            batch.add(i, prompt(15 + i % 8, i), config)
        started = time.perf_counter()
        batch.step()  # the packed prefill of `rows` prompts, their writes, and one decode step
        first = time.perf_counter() - started
        step_ms[rows] = 1e3 * best(batch.step, min(repeat, 10))
        prefill_ms[rows] = 1e3 * first - step_ms[rows]
    lines += [
        "",
        "| rows | decode step ms | of which weight products ms | step / 1-row step | decode ceiling vs lone | "
        "packed prefill of that many prompts ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for rows in (1, 8, 32):
        lines.append(
            f"| {rows} | {step_ms[rows]:.1f} | {product_ms[rows]:.1f} | {step_ms[rows] / step_ms[1]:.2f}x | "
            f"{rows * step_ms[1] / step_ms[rows]:.2f}x | {prefill_ms[rows]:.1f} |"
        )

    lines += [
        "",
        "| clients | wall s | prefill steps s | decode-only steps s | throughput vs 1 client |",
        "|---:|---:|---:|---:|---:|",
    ]
    walls = {}
    for clients in (1, 8, 32):
        batch = BatchGenerator(model, 32, compile_prefill=True)
        prefill_s = decode_s = 0.0
        next_id = done = 0
        started = time.perf_counter()
        while done < 32:
            while len(batch) < clients and next_id < 32:
                batch.add(next_id, prompt(15 + next_id % 8, next_id), config)
                next_id += 1
            had_prompts = bool(batch.pending)
            step_started = time.perf_counter()
            emitted = batch.step()
            elapsed = time.perf_counter() - step_started
            if had_prompts:
                prefill_s += elapsed
            else:
                decode_s += elapsed
            done += sum(1 for e in emitted if e.finish is not None)
        walls[clients] = time.perf_counter() - started
        speed_up = walls[1] / walls[clients]
        lines.append(f"| {clients} | {walls[clients]:.2f} | {prefill_s:.2f} | {decode_s:.2f} | {speed_up:.2f}x |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wider,large")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.1f}")
    for key in args.models.split(","):
        print("\n".join(profile(key, args.repeat)))
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

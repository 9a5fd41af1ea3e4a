"""Tensor parallelism on CPU: one process against two msrun ranks splitting the model, same checkpoint.

    .venv/bin/python tests/bench/bench_tensor_parallel.py [--max-new-tokens 48] [--repeat 5]

For each model (the tiny TeleChat2, and a wider one so the arithmetic weighs more than the per-operator cost), a
seeded random checkpoint is written; then
- one process: `TeleChat2ForCausalLM` loaded from it, greedy `generate` (prefill + compiled static-cache steps),
  best of --repeat after a warm-up;
- two ranks: `msrun --worker_num=2` running tests/unit/tensor_parallel_worker.py, which loads each rank's slices
  with `telechat2.tensor_parallel` and times the same generation the same way (rank 0's figure is reported).
It reports tokens/s both ways, the largest logits difference (prompt pass and every cached decode step), whether
the greedy tokens agree, and the parameter bytes each rank holds against the whole model. Prints a markdown section
(paste it into tests/bench/results/serve.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

UNIT = Path(__file__).resolve().parents[1] / "unit"
sys.path.insert(0, str(UNIT))  # tiny_model.py, tensor_parallel_worker.py

MODELS = {
    "tiny (2 layers, hidden 64, 4 heads / 2 KV, FFN 128, vocab 512)": {},
    "wider (2 layers, hidden 512, 8 heads / 4 KV, FFN 2048, vocab 8192)": {
        "hidden_size": 512,
        "num_heads": 8,
        "n_kv_heads": 4,
        "intermediate_size": 2048,
        "vocab_size": 8192,
    },
}
PROMPT = [1, 4, 57, 91, 230, 18, 77, 140, 5]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import mindspore as ms
    from tensor_parallel_worker import cached_decode_logits
    from tiny_model import build_tiny_model, save_tiny_checkpoint

    from telechat2.generation import GenerationConfig, generate
    from telechat2.tensor_parallel import parameter_bytes

    ms.set_context(mode=ms.PYNATIVE_MODE)
    greedy = GenerationConfig(max_new_tokens=args.max_new_tokens, repetition_penalty=1.0, stop_token_ids=())
    work = Path(tempfile.mkdtemp(prefix="bench_tp_"))
    cases = []
    for index, overrides in enumerate(MODELS.values()):
        _, checkpoint = save_tiny_checkpoint(work / f"m{index}.ckpt", seed=11, **overrides)
        cases.append(
            {
                "name": f"m{index}",
                "checkpoint": str(checkpoint),
                "overrides": overrides,
                "prompt": PROMPT,
                "max_new_tokens": args.max_new_tokens,
                "repeat": args.repeat,
            }
        )
    (work / "cases.json").write_text(json.dumps(cases))
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [
        str(venv_bin / "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_port=28519",
        f"--log_dir={work / 'logs'}", "--join=True", str(UNIT / "tensor_parallel_worker.py"),
        str(work / "cases.json"), str(work),
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
    msrun_seconds = time.perf_counter() - started

    rows = []
    for case, name in zip(cases, MODELS, strict=True):
        model = build_tiny_model(11, **case["overrides"])
        generate(model, PROMPT, greedy)
        seconds = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            tokens = generate(model, PROMPT, greedy)
            seconds = min(seconds, time.perf_counter() - start)
        logits = model.forward(ms.Tensor(np.asarray([PROMPT], np.int32)))[0].asnumpy()[0]
        decode = cached_decode_logits(model, PROMPT, tokens)
        ranks = [np.load(work / f"{case['name']}.rank{rank}.npz") for rank in (0, 1)]
        diff = max(
            max(float(np.abs(r["logits"] - logits).max()), float(np.abs(r["decode_logits"] - decode).max()))
            for r in ranks
        )
        same = all(r["tokens"].tolist() == tokens for r in ranks)
        whole = parameter_bytes(model)
        rows.append(
            f"| {name} | {len(tokens) / seconds:.1f} | {len(tokens) / float(ranks[0]['seconds']):.1f} | {diff:.1e} "
            f"| {'yes' if same else 'NO'} | {whole:,} | {int(ranks[0]['parameter_bytes']):,} / "
            f"{int(ranks[1]['parameter_bytes']):,} ({int(ranks[0]['parameter_bytes']) / whole:.1%}) |"
        )

    load = os.getloadavg()[0]
    print("## Tensor parallel on CPU: one process against 2 msrun ranks\n")
    print(
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {os.cpu_count()} cores visible, Python "
        f"{platform.python_version()}, load average {load:.1f} at the end (machine shared with other jobs).\n"
    )
    print(
        f"Command: `.venv/bin/python tests/bench/bench_tensor_parallel.py --max-new-tokens {args.max_new_tokens} "
        f"--repeat {args.repeat}` (the msrun part took {msrun_seconds:.0f} s including start-up and compiles).\n"
    )
    print(
        f"Workload: a {len(PROMPT)}-token prompt, greedy, {args.max_new_tokens} new tokens with the KV cache "
        "(prefill, then the compiled static-cache step, whose AllReduce/AllGather run inside `mindspore.jit`); "
        f"best of {args.repeat} after a warm-up, float32, same seeded random checkpoint both ways. Logits "
        "difference: the largest absolute difference over the prompt pass and every cached decode step, both "
        "ranks. Parameter bytes: what `model.get_parameters()` holds in each process.\n"
    )
    print(
        "| model | one process tokens/s | 2-rank TP tokens/s | max logits diff | same greedy tokens "
        "| whole model bytes | bytes per rank |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

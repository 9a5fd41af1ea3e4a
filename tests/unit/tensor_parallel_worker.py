"""One msrun worker of the tensor-parallel tests: load tiny checkpoints split over the ranks, record what they do.

    msrun --worker_num=2 ... tensor_parallel_worker.py CASES_JSON OUT_DIR

CASES_JSON lists {"name", "checkpoint", "overrides", "prompt", "max_new_tokens"[, "repeat"]}. For each case every
rank loads its slices of the checkpoint (tiny architecture + overrides) and runs: one forward pass over the
prompt (logits), greedy generation with the KV cache (prefill, then the compiled static-cache step; timed, best of
`repeat`) and the cached decode's logits at every step. Each rank writes OUT_DIR/{name}.rank{R}.npz (with its
parameter bytes and the generation's seconds) and OUT_DIR/seed.rank{R}.npy, the seed `shared_seed` gave it.
Not collected by pytest (no test_ prefix); run by tests/unit/test_tensor_parallel_msrun.py and the benchmark.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import tiny_config


def cached_decode_logits(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits of the prefill's last position, then of each static-cache step fed the given tokens: [n, V]."""
    import mindspore as ms

    decoder = model.static_decoder()
    logits, cache = model.forward(ms.Tensor(np.asarray([prompt], np.int32)), last_only=True)
    rows = [logits.asnumpy()[0, -1]]
    keys, values = decoder.empty_cache(cache)
    position = len(prompt)
    for token in tokens[:-1]:
        logits, keys, values = decoder.step(token, position, keys, values)
        rows.append(logits.asnumpy()[0, -1])
        position += 1
    return np.stack(rows)


def main() -> int:
    import mindspore as ms

    from telechat2 import loading
    from telechat2 import tensor_parallel as tp
    from telechat2.generation import GenerationConfig, generate

    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    group = tp.initialize()
    np.save(out_dir / f"seed.rank{group.rank}.npy", tp.shared_seed())
    for case in cases:
        config = tiny_config(**case["overrides"])
        model = loading.load_tensor_parallel_model(config, case["checkpoint"], group)
        prompt = case["prompt"]
        full_logits, _ = model.forward(ms.Tensor(np.asarray([prompt], np.int32)))
        gen = GenerationConfig(max_new_tokens=case["max_new_tokens"], repetition_penalty=1.0, stop_token_ids=())
        generate(model, prompt, gen)  # warm-up: compiles the decode step
        seconds = float("inf")
        for _ in range(case.get("repeat", 1)):  # best of `repeat` timed runs
            start = time.perf_counter()
            tokens = generate(model, prompt, gen)
            seconds = min(seconds, time.perf_counter() - start)
        np.savez(
            out_dir / f"{case['name']}.rank{group.rank}.npz",
            logits=full_logits.asnumpy()[0],
            tokens=np.asarray(tokens, np.int64),
            decode_logits=cached_decode_logits(model, prompt, tokens),
            parameter_bytes=tp.parameter_bytes(model),
            seconds=seconds,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

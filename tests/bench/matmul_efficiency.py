"""How fast MindSpore's CPU matrix product is against numpy's BLAS on the same cores, at the serving shapes.

    .venv/bin/python tests/bench/matmul_efficiency.py [--rows 8,32,256] [--repeat 20]

The wider benchmark model's FFN product ([rows, 512] x [512, 2048], the weight stored [out, in] and read
transposed, as `TeleChat2Linear` does) at 8 and 32 rows (decode batches) and 256 rows (a packed prefill). It
bounds what batching can win on CPU: once a batch's products are compute-bound, their speed is the kernel's. Both
sides multiply by `chain` different weights (as a step goes through its layers); MindSpore runs them in one
compiled graph (`mindspore.jit`, as the serving steps do), so one launch is shared. Best of `repeat` calls each.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="8,32,256")
    parser.add_argument("--chain", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--inner", type=int, default=512)
    parser.add_argument("--outer", type=int, default=2048)
    args = parser.parse_args()
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    class Chain(nn.Cell):
        """x times each weight, summed (so no product is dropped), in one compiled graph."""

        def __init__(self) -> None:
            super().__init__()
            self.product = ops.MatMul(transpose_b=True)

        @ms.jit
        def construct(self, x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
            total = self.product(x, weights[0])
            for weight in weights[1:]:
                total = total + self.product(x, weight)
            return total

    ms.set_context(mode=ms.PYNATIVE_MODE)
    chained = Chain()
    rng = np.random.default_rng(0)
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.1f}")
    print("| rows | numpy (BLAS) GFLOP/s | MindSpore MatMul GFLOP/s | MindSpore / numpy |")
    print("|---:|---:|---:|---:|")
    for rows in (int(r) for r in args.rows.split(",")):
        x = rng.standard_normal((rows, args.inner), dtype=np.float32)
        weights = [rng.standard_normal((args.outer, args.inner), dtype=np.float32) for _ in range(args.chain)]
        x_tensor, weight_tensors = Tensor(x), ms.mutable(tuple(Tensor(w) for w in weights))
        gflop = 2 * rows * args.inner * args.outer / 1e9
        numpy_seconds = best_seconds(lambda x=x, weights=weights: sum(x @ w.T for w in weights), args.repeat)
        numpy_rate = args.chain * gflop / numpy_seconds
        mindspore_seconds = best_seconds(
            lambda x=x_tensor, weights=weight_tensors: chained(x, weights).asnumpy(), args.repeat
        )
        mindspore_rate = args.chain * gflop / mindspore_seconds
        print(f"| {rows} | {numpy_rate:.1f} | {mindspore_rate:.1f} | {mindspore_rate / numpy_rate:.2f} |")
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

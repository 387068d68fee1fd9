"""Host memory read bandwidth, as a batch-1 decode step sees it: one pass over a large float32
matrix by a jitted matrix-vector product (XLA:CPU, all cores), best of `--repeats`.

    .venv/bin/python tools/bench_bandwidth.py [--gib=1 --repeats=10]

The matrix is far larger than any cache, so each product reads it from memory once; GB/s =
bytes / seconds. docs/performance.md divides the weight bytes read per decoded token by this
figure for the batch-1 bound.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    cols = 4096
    rows = int(args.gib * 2**30 / 4 / cols)
    matrix = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    vector = jnp.ones((cols,), jnp.float32)
    product = jax.jit(lambda m, v: m @ v)
    product(matrix, vector).block_until_ready()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        product(matrix, vector).block_until_ready()
        best = min(best, time.perf_counter() - start)
    size = rows * cols * 4
    print(json.dumps({"bytes": size, "best_seconds": round(best, 5),
                      "read_gb_per_sec": round(size / best / 1e9, 2)}))


if __name__ == "__main__":
    main()

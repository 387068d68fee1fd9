"""`jaxlm bench`: the real train step timed on synthetic tokens.

Every throughput and MFU figure in docs/performance.md comes from here: the step `jaxlm train`
runs (train.jit_train_step, same shardings and donation), compiled once, after `warmup` steps,
with no data pipeline in the way (`jaxlm data bench` times that apart).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxlm import data, metrics, model, pipeline, sharding
from jaxlm.config import Config
from jaxlm.train import _setup, frozen_base, init_state, jit_train_step


def bench(cfg: Config, steps: int = 10, warmup: int = 2) -> dict:
    """Time the real train step on synthetic tokens (no data pipeline), after compiling and
    `warmup` steps. Every performance claim in docs/performance.md cites this."""
    mesh, tx, graphdef, abstract, shardings = _setup(cfg)
    rules = sharding.rules_for(cfg.mesh)
    batch_sharding = data.batch_shardings(cfg, sharding.batch_sharding(mesh, rules))
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    rng = np.random.default_rng(cfg.train.seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (B, L + 1), dtype=np.int32)
    batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((B, L), np.int32),
        "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
        "weights": np.ones((B, L), np.float32),
    }
    if cfg.model.num_labels:  # a classifier's batch: a label and a weight per row
        batch = {**{k: batch[k] for k in ("inputs", "segment_ids", "positions")},
                 "labels": rng.integers(0, cfg.model.num_labels, B, dtype=np.int32),
                 "weights": np.ones(B, np.float32)}
    with jax.set_mesh(mesh), sharding.logical_rules(rules), pipeline.context(cfg.mesh, mesh):
        batch = data.to_global(batch, batch_sharding)
        state = init_state(cfg, tx, shardings, frozen=frozen_base(cfg, None, abstract, shardings))
        step_fn = jit_train_step(cfg, graphdef, tx, shardings, batch_sharding)
        compile_start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - compile_start
        for _ in range(warmup):
            state, out = compiled(state, batch)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(steps):
            state, out = compiled(state, batch)
        jax.block_until_ready(out)
        seconds = time.perf_counter() - start
    peak = metrics.peak_tflops_per_device(cfg.train.peak_tflops)
    rates = metrics.throughput(steps * B * L, seconds, metrics.flops_per_token(cfg.model, L), peak)
    return {
        "tokens_per_sec": round(rates["tokens_per_sec"], 1),
        "step_time_ms": round(1000 * seconds / steps, 2),
        "tflops_per_device": round(rates["tflops_per_device"], 4),
        "mfu": round(rates["mfu"], 4),
        "peak_tflops": round(peak, 4),
        "num_params": model.num_params(cfg.model),
        "num_devices": jax.device_count(),
        "compile_seconds": round(compile_seconds, 2),
        "device": jax.devices()[0].device_kind,
        **pipeline.summary(cfg.mesh, mesh),
    }

"""Metrics: FLOPs per token, device peaks and MFU, and the writer (JSONL, TensorBoard, progress).

FLOPs per token of a training step (forward + backward = 3 x forward), documented in
docs/performance.md:

    6 * (matmul params in the blocks + d_model * vocab)    weights: 2 FLOPs per multiply-add,
                                                          x3 for forward + backward; the output
                                                          projection counts even when tied
                                                          (a classifier has none)
  + 6 * num_layers * seq_len * num_heads * head_dim       causal attention: QK^T and AV over,
                                                          on average, half the row

Norms, RoPE, softmax and the embedding lookup are left out (they are not matmuls). MFU is
achieved FLOP/s per device over the device's peak: a table of dense bf16 peaks for accelerators,
or a measured float32 matmul on CPU; `train.peak_tflops` overrides both.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import jax.numpy as jnp

from jaxlm import paths
from jaxlm.config import ModelConfig
from jaxlm.model import head_dim

# Dense bf16 TFLOP/s per chip, from the vendors' spec sheets. Matched against device_kind.
PEAK_TFLOPS = (
    ("TPU v6 lite", 918.0),  # v6e
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card peaks lower, set train.peak_tflops for it
    ("A100", 312.0),
)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    D, V, N, F = cfg.d_model, cfg.vocab_size, cfg.num_layers, cfg.mlp_dim
    H, G, K = cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    block_matmul_params = N * (D * H * K + 2 * D * G * K + H * K * D + 3 * D * F)
    output = 0 if cfg.num_labels else D * V  # a classifier's head runs on one token per row
    return 6.0 * (block_matmul_params + output) + 6.0 * N * seq_len * H * K


_MEASURED: dict[str, float] = {}


def measured_cpu_peak_tflops(size: int = 1024, repeats: int = 20) -> float:
    """Best float32 matmul rate of this host, in TFLOP/s, shared by its CPU devices."""
    if "cpu" not in _MEASURED:
        device = jax.devices("cpu")[0]
        a = jax.device_put(jnp.ones((size, size), jnp.float32), device)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        _MEASURED["cpu"] = 2.0 * size**3 / best / 1e12
    return _MEASURED["cpu"]


def peak_tflops_per_device(override: float = 0.0) -> float:
    if override > 0:
        return override
    device = jax.devices()[0]
    if device.platform == "cpu":
        # CPU "devices" (real or forced with --xla_force_host_platform_device_count) share cores.
        return measured_cpu_peak_tflops() / jax.local_device_count()
    for name, peak in PEAK_TFLOPS:
        if name in device.device_kind:
            return peak
    raise ValueError(f"no peak FLOP/s known for device '{device.device_kind}'; set "
                     "config key 'train.peak_tflops'")


def throughput(tokens: float, seconds: float, flops_token: float, peak: float) -> dict:
    tokens_per_sec = tokens / seconds
    tflops = flops_token * tokens_per_sec / jax.device_count() / 1e12
    return {
        "tokens_per_sec": tokens_per_sec,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak > 0 else 0.0,
    }


class Writer:
    """Writes metrics.jsonl and TensorBoard events, and shows progress; only on process 0."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.bar = None
        self.tb = None
        if not self.enabled:
            return
        self.jsonl = paths.Appender(paths.join(workdir, "metrics.jsonl"))
        SummaryWriter = _summary_writer_class()
        self.tb = SummaryWriter(paths.join(workdir, "tensorboard"), flush_secs=10)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.show(step, record)

    def show(self, step: int, record: dict) -> None:
        # Lists (a classifier's confusion matrix) go to metrics.jsonl, not into the line.
        parts = [f"{k} {_fmt(v)}" for k, v in record.items()
                 if k != "step" and not isinstance(v, list)]
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(", ".join(parts), refresh=True)
        else:
            print(f"step {step}/{self.total_steps}: " + ", ".join(parts), flush=True)

    def flush(self) -> None:
        """Make every line so far durable (called at each checkpoint; objects are rewritten
        only every few seconds otherwise)."""
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()


def records(workdir: str) -> list[dict]:
    """metrics.jsonl's records, in order ([] without the file)."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.isfile(path):
        return []
    return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def truncate_after(workdir: str, step: int) -> None:
    """Drop metrics.jsonl lines past `step` (written by a run killed after its last checkpoint),
    so a resumed run's log reads as if it had never stopped."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.isfile(path):
        return
    lines = paths.read_text(path).splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        paths.write_text(path, "".join(kept))


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary_writer_class():
    """tensorboardX's SummaryWriter (it writes gs:// itself, with google-cloud-storage), imported
    without torch: tensorboardX imports torch when it is installed, only to accept torch tensors,
    which jaxlm never hands it, and that import is 1.4 s of every `jaxlm train` on a machine with
    torch (the dev extra has it). A torch imported already is left as it is."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter

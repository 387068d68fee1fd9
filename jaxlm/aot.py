"""Ahead-of-time fit check: compile the real train step for a target without allocating anything.

    jaxlm aot --config=configs/llama2_7b.py --devices=8 --device=h100
    jaxlm aot --config=configs/llama2_7b.py --topology=v5p:2x2x1

The train step (`train.make_train_step`, the same jitted function `jaxlm train` runs, with its
shardings, donation, remat and pipeline) is lowered from the abstract train state and compiled:

- for a TPU topology through libtpu (the `tpu` extra), with no TPU present: XLA's TPU compiler
  assigns the buffers, so the bytes are what a real slice would use;
- for N CPU devices (`--devices=N`, fake host devices): the SPMD partitioning is the real one, and
  XLA:CPU's buffer assignment stands in for the GPU's. It is an estimate: the GPU compiler fuses
  differently and needs cuDNN / NCCL workspace on top, which the headroom below is for.

Per-device bytes come from the compiled program's memory analysis: arguments (parameters,
optimizer state, batch), outputs not aliased to a donated argument, and temporaries (activations
kept for the backward pass, gradients, collectives' buffers). `fits` means the total stays under
(1 - headroom) x the device memory. FLOPs are analytic (`metrics.flops_per_token`): XLA's cost
analysis counts a scanned layer body once.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp

from jaxlm import data, metrics, model, pipeline, sharding, train
from jaxlm.config import Config, ConfigError

GIB = 2**30

# Memory per device, GiB (what the chip has; the headroom below leaves room for the runtime).
DEVICE_MEMORY_GIB = {
    "h100": 80.0,  # H100 SXM / PCIe 80 GB
    "h200": 141.0,
    "a100": 80.0,  # A100 80 GB
    "a100-40": 40.0,
    "l4": 24.0,
    "v4": 32.0,  # TPU v4
    "v5e": 16.0,  # TPU v5 lite
    "v5p": 95.0,  # TPU v5p
    "v6e": 32.0,  # TPU v6 lite (Trillium)
}
# jax's device_kind strings for TPUs -> the names above.
_TPU_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
              "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
DEFAULT_HEADROOM = 0.1


class AotError(RuntimeError):
    """The target cannot be set up (no libtpu, unknown topology or device). One line."""


# Topology generation -> (name in TPU accelerator types, TensorCores per chip).
_TPU_GENERATIONS = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5e": ("v5litepod", 1), "v6e": ("v6e", 1)}


def _quiet_libtpu(topology: str) -> None:
    """libtpu reads the host's TPU type and workers from the environment (a TPU VM sets them) and
    logs errors when they are missing; describe the requested slice so it starts quietly."""
    generation, _, shape = topology.partition(":")
    if generation not in _TPU_GENERATIONS or not shape:
        return
    try:
        chips = math.prod(int(n) for n in shape.split("x"))
    except ValueError:
        return
    name, cores = _TPU_GENERATIONS[generation]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{name}-{chips * cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def tpu_devices(topology: str):
    """The devices of a TPU topology such as `v5p:2x2x1`, compiled for without a TPU present."""
    _quiet_libtpu(topology)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise AotError("--topology needs libtpu: install the tpu extra (pip install -e '.[tpu]'; "
                       "`make test` puts it in .venv/tpu: PYTHONPATH=.venv/tpu), or use --devices=N "
                       "for fake CPU devices") from None
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as e:  # libtpu's messages are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AotError(f"--topology={topology!r} is not a TPU topology libtpu knows "
                       f"(e.g. v4:2x2x2, v5p:2x2x1, v5e:2x2): {first}") from None


def cores_per_chip(devices) -> int:
    """TPU v4 topologies compiled for without a TPU list each chip's two cores as two devices
    (a real v4 runs them as one "megacore" device); other targets have one device per chip."""
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    if not all(coords):
        return 1
    return max(1, len(devices) // len(set(coords)))


def device_memory(device: str | None, devices) -> tuple[str, float]:
    """(device name, bytes per device) the program is checked against."""
    if device is None:
        kind = devices[0].device_kind
        device = _TPU_KINDS.get(kind)
        if device is None:
            raise AotError(f"no memory size known for device kind {kind!r}: pass --device "
                           f"({', '.join(DEVICE_MEMORY_GIB)}) or --memory_gib")
    if device not in DEVICE_MEMORY_GIB:
        raise AotError(f"--device={device!r} is unknown; known: {', '.join(DEVICE_MEMORY_GIB)} "
                       "(or give --memory_gib)")
    cores = cores_per_chip(devices)
    if cores > 1:  # each core is a device holding its share of the chip's memory
        return f"{device} core (1/{cores} chip)", DEVICE_MEMORY_GIB[device] * GIB / cores
    return device, DEVICE_MEMORY_GIB[device] * GIB


def abstract_batch(cfg: Config, batch_sharding):
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    if cfg.model.num_labels:  # a classifier's: a label and a weight per row
        shardings = data.batch_shardings(cfg, batch_sharding)
        ints = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=batch_sharding)
        return {"inputs": ints, "segment_ids": ints, "positions": ints,
                "labels": jax.ShapeDtypeStruct((B,), jnp.int32, sharding=shardings["labels"]),
                "weights": jax.ShapeDtypeStruct((B,), jnp.float32, sharding=shardings["weights"])}
    ints = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=batch_sharding)
    return {"inputs": ints, "targets": ints, "segment_ids": ints, "positions": ints,
            "weights": jax.ShapeDtypeStruct((B, L), jnp.float32, sharding=batch_sharding)}


def compile_train_step(cfg: Config, devices):
    """(compiled step, mesh, seconds to lower and compile) for `cfg` on `devices`; nothing is
    allocated: the state and batch are ShapeDtypeStructs with their shardings."""
    mesh, tx, graphdef, abstract, shardings = train._setup(cfg, devices)
    rules = sharding.rules_for(cfg.mesh)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    state = train.with_shardings(abstract, shardings)
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.logical_rules(rules), pipeline.context(cfg.mesh, mesh):
        step = train.jit_train_step(cfg, graphdef, tx, shardings,
                                    data.batch_shardings(cfg, batch_sharding))
        compiled = step.lower(state, abstract_batch(cfg, batch_sharding)).compile()
    return compiled, mesh, time.perf_counter() - start


def check(cfg: Config, devices, memory_bytes: float, headroom: float = DEFAULT_HEADROOM,
          target: str = "") -> dict:
    """Compile `cfg`'s train step for `devices` and compare its per-device bytes with
    `memory_bytes`. Returns the report (see the module docstring)."""
    compiled, mesh, seconds = compile_train_step(cfg, devices)
    stats = compiled.memory_analysis()
    arguments = stats.argument_size_in_bytes
    outputs = stats.output_size_in_bytes - stats.alias_size_in_bytes
    temporaries = stats.temp_size_in_bytes
    code = stats.generated_code_size_in_bytes
    total = arguments + outputs + temporaries + code
    usable = (1.0 - headroom) * memory_bytes
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    flops = metrics.flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    return {
        "target": target,
        "num_devices": len(devices),
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        "num_params": model.num_params(cfg.model),
        "remat": cfg.model.remat,
        "global_batch_size": cfg.train.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "bytes_per_device": {"arguments": arguments, "outputs": outputs, "temporaries": temporaries,
                             "code": code, "total": total},
        "gib_per_device": round(total / GIB, 2),
        "device_memory_bytes": int(memory_bytes),
        "usable_bytes": int(usable),
        "headroom": headroom,
        "fits": total <= usable,
        "flops_per_step": flops,
        "flops_per_device_per_step": flops / len(devices),
        "compile_seconds": round(seconds, 2),
    }


def check_generate(cfg: Config, devices, memory_bytes: float, headroom: float, target: str,
                   batch: int, seq_len: int, new_tokens: int, kind: str = "none") -> dict:
    """Compile generation's prefill (a `seq_len - new_tokens` prompt into a cache of
    `seq_len - new_tokens + bucket(new_tokens)` slots) and decode loop for `batch` rows, with
    float or int8 weights, and compare the larger per-device total with `memory_bytes`."""
    from flax import nnx

    from jaxlm import generate, quantize

    prompt_len = seq_len - new_tokens
    if prompt_len < 1:
        raise ConfigError(f"--seq_len ({seq_len}) must exceed --new_tokens ({new_tokens})")
    # The mesh `jaxlm.load(..., mesh="config")` builds: the config's, without pipeline stages.
    mesh = sharding.make_mesh(cfg.replace(mesh=sharding.without_stages(cfg.mesh)).mesh, devices)
    rules = sharding.DEFAULT_RULES
    sharding.check_divisible(mesh, cfg.model, rules)
    if batch % sharding.batch_shards(mesh, rules):
        raise ConfigError(f"--batch ({batch}) must be divisible by mesh.data x mesh.fsdp "
                          f"({sharding.batch_shards(mesh, rules)})")
    graphdef, state = nnx.split(model.abstract(cfg.model), nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    params = nnx.to_pure_dict(state)
    if kind == "int8":
        params = jax.eval_shape(lambda p: quantize.quantize_params(p, cfg.model.tie_embeddings), params)
    shardings = generate.param_shardings(params, specs, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                          shardings)
    buffer = generate.bucket(new_tokens)
    row = sharding.named_sharding(mesh, ("batch",), rules)
    rows = sharding.named_sharding(mesh, ("batch", None), rules)
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows if a.ndim == 2 else row)
                 for a in generate.abstract_inputs(batch, prompt_len, cfg.model.vocab_size))
    s = jax.eval_shape(lambda: generate.settings(new_tokens))
    seed = jax.ShapeDtypeStruct((), jnp.uint32)
    begin = time.perf_counter()
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        prefill = jax.jit(generate.make_prefill(cfg.model, graphdef, buffer))
        compiled_prefill = prefill.lower(params, None, *args, seed, s).compile()
        decode_state = jax.eval_shape(prefill, params, None, *args, seed, s)
        decode = jax.jit(generate.make_decode(graphdef), donate_argnums=(2,))
        compiled_decode = decode.lower(params, None, decode_state, jnp.int32(0), s).compile()
    seconds = time.perf_counter() - begin
    totals = {}
    for name, compiled in (("prefill", compiled_prefill), ("decode", compiled_decode)):
        stats = compiled.memory_analysis()
        totals[name] = {
            "arguments": stats.argument_size_in_bytes,
            "outputs": stats.output_size_in_bytes - stats.alias_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes,
            "code": stats.generated_code_size_in_bytes,
        }
        totals[name]["total"] = sum(totals[name].values())
    worst = max(totals, key=lambda k: totals[k]["total"])
    total = totals[worst]["total"]
    usable = (1.0 - headroom) * memory_bytes
    n = len(devices)
    cache_bytes = (2 * cfg.model.num_layers * batch * (prompt_len + buffer) * cfg.model.num_kv_heads
                   * model.head_dim(cfg.model) * jnp.dtype(cfg.model.dtype).itemsize)
    return {
        "mode": "generate", "target": target, "num_devices": n,
        "mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names},
        "num_params": model.num_params(cfg.model), "quantize": kind,
        "param_dtype": cfg.model.param_dtype, "dtype": cfg.model.dtype,
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "cache_slots": prompt_len + buffer,
        "weight_bytes": quantize.num_bytes(params), "kv_cache_bytes": cache_bytes,
        "bytes_per_device": totals[worst], "peak_program": worst, "programs": totals,
        "gib_per_device": round(total / GIB, 2),
        "device_memory_bytes": int(memory_bytes), "usable_bytes": int(usable),
        "headroom": headroom, "fits": total <= usable, "compile_seconds": round(seconds, 2),
    }


def describe_generate(report: dict) -> str:
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a}{n}" for a, n in report["mesh"].items() if n > 1) or "one device"
    lines = [f"target      {report['target']}  mesh {mesh}",
             f"weights     {gib(report['weight_bytes'])}   in all ({report['quantize']}, "
             f"params {report['param_dtype']})",
             f"KV cache    {gib(report['kv_cache_bytes'])}   in all ({report['batch']} rows x "
             f"{report['cache_slots']} slots, {report['dtype']})"]
    for name, b in report["programs"].items():
        lines.append(f"{name:11s} {gib(b['total'])}   per device (arguments {b['arguments'] / GIB:.2f}, "
                     f"outputs {b['outputs'] / GIB:.2f}, temporaries {b['temporaries'] / GIB:.2f})")
    lines.append(f"peak        {gib(report['bytes_per_device']['total'])}   of "
                 f"{report['usable_bytes'] / GIB:.2f} GiB usable: "
                 f"{'fits' if report['fits'] else 'DOES NOT FIT'}   compile {report['compile_seconds']} s")
    return "\n".join(lines)


def suggestions(cfg: Config, mesh: dict) -> list[str]:
    """Knobs that lower per-device memory, most effective first, given what cfg already does and
    the resolved `mesh` sizes."""
    out = []
    if mesh["data"] > 1:
        out.append(f"shard the state over the data-parallel devices too: mesh.fsdp (now "
                   f"{mesh['fsdp']}, data {mesh['data']}; e.g. --config.mesh.data=1 --config.mesh.fsdp=-1)")
    if cfg.model.remat != "full":
        out.append(f"recompute activations: model.remat=full (now {cfg.model.remat}) or save_attn")
    out.append(f"fewer rows per microbatch: optim.grad_accum_steps (now {cfg.optim.grad_accum_steps}) "
               f"up, or train.global_batch_size (now {cfg.train.global_batch_size}) down")
    if cfg.model.dtype == "float32":
        out.append("compute in bfloat16: model.dtype=bfloat16")
    if mesh["tensor"] == 1:
        out.append("split long activations too: mesh.tensor > 1 with mesh.sequence_parallel=true")
    return out


def not_fitting_message(cfg: Config, report: dict) -> str:
    over = report["bytes_per_device"]["total"] - report["usable_bytes"]
    pct = 100.0 * over / report["usable_bytes"]
    return (f"does not fit: {report['bytes_per_device']['total'] / GIB:.2f} GiB per device, "
            f"{report['usable_bytes'] / GIB:.2f} GiB usable ({report['device_memory_bytes'] / GIB:.0f} GiB "
            f"less {report['headroom']:.0%} headroom): over by {over / GIB:.2f} GiB ({pct:.0f}%); try: "
            + "; ".join(suggestions(cfg, report["mesh"])))


def describe(report: dict) -> str:
    """The human-readable lines printed before the JSON."""
    b = report["bytes_per_device"]
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a}{n}" for a, n in report["mesh"].items() if n > 1) or "one device"
    return "\n".join([
        f"target      {report['target']}  mesh {mesh}",
        f"arguments   {gib(b['arguments'])}   (params, optimizer state, batch)",
        f"outputs     {gib(b['outputs'])}   (not aliased to donated inputs)",
        f"temporaries {gib(b['temporaries'])}   (activations, gradients, buffers)",
        f"total       {gib(b['total'])}   of {report['usable_bytes'] / GIB:.2f} GiB usable: "
        f"{'fits' if report['fits'] else 'DOES NOT FIT'}",
        f"FLOPs/step  {report['flops_per_step']:.3e}   compile {report['compile_seconds']} s",
    ])


def fake_cpu_devices(n: int):
    """n CPU devices; the process must have been started with at least n host devices."""
    have = jax.devices("cpu")
    if len(have) < n:
        raise AotError(f"--devices={n} but this process has {len(have)} CPU devices (jaxlm aot sets "
                       "XLA_FLAGS itself; in Python, start with "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return have[:n]


def memory_arg(device: str | None, memory_gib: float | None, devices) -> tuple[str, float]:
    if memory_gib is not None:
        if not (memory_gib > 0 and math.isfinite(memory_gib)):
            raise ConfigError(f"--memory_gib must be > 0, got {memory_gib}")
        return f"{memory_gib:g} GiB device", memory_gib * GIB
    return device_memory(device, devices)

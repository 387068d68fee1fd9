"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule built from shard_map + ppermute.

The stacked decoder layers are split along their leading `layers` axis into `mesh.stage` equal
stages (the sharding rule layers -> stage already stores them that way: stage s holds layers
[s*N/S, (s+1)*N/S)). The batch is cut into M microbatches (`mesh.pipeline_microbatches`; row m,
m+M, m+2M, ... go to microbatch m, so every data shard feeds every microbatch). At tick t, stage s
runs its layers on microbatch t - s and hands the result to stage s+1 with one `ppermute`:

    tick:     0    1    2    3    4          S = 3 stages, M = 3 microbatches,
    stage 0:  m0   m1   m2   .    .          M + S - 1 = 5 ticks; "." is bubble: a stage
    stage 1:  .    m0   m1   m2   .          computing on a value nobody reads.
    stage 2:  .    .    m0   m1   m2

The bubble fraction is (S - 1) / (M + S - 1): more microbatches, less idle time, smaller matmuls.
Only `stage` is manual inside the shard_map; data, fsdp and tensor stay automatic, so inside a
stage the usual sharding rules (FSDP, Megatron tensor parallelism, sequence sharding) apply as
in the rest of the model. Everything outside the blocks (embedding, final norm, logits, loss) runs
replicated over `stage`. The backward pass comes from autodiff: the transpose of a ppermute is
the reverse ppermute, so gradients flow from the last stage back to the first.

This module and sharding.py are the only ones that name mesh axes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "stage"

_MICROBATCHES: contextvars.ContextVar[int] = contextvars.ContextVar(
    "jaxlm_pipeline_microbatches", default=0
)


@contextlib.contextmanager
def microbatches(n: int) -> Iterator[None]:
    """Within this context, a pipelined model cuts each batch into `n` microbatches (0: twice the
    number of stages)."""
    token = _MICROBATCHES.set(n)
    try:
        yield
    finally:
        _MICROBATCHES.reset(token)


def resolve_microbatches(configured: int, stages: int) -> int:
    """`mesh.pipeline_microbatches`, with 0 meaning twice the number of stages."""
    return configured or 2 * stages


def context(mesh_cfg, mesh):
    """`microbatches(...)` for models run under `mesh`, from the config's `mesh` group (a no-op
    without stages)."""
    return microbatches(resolve_microbatches(mesh_cfg.pipeline_microbatches, mesh.shape["stage"]))


def summary(mesh_cfg, mesh) -> dict:
    """{stages, microbatches, bubble fraction} of the GPipe schedule; {} without pipelining."""
    stages = mesh.shape["stage"]
    if stages == 1:
        return {}
    micro = resolve_microbatches(mesh_cfg.pipeline_microbatches, stages)
    return {"pipeline_stages": stages, "pipeline_microbatches": micro,
            "pipeline_bubble": round(bubble_fraction(stages, micro), 4)}


def num_stages() -> int:
    """Stages of the current mesh (1 when there is no mesh or no `stage` axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[AXIS]


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Share of stage-ticks spent idle in a GPipe schedule (forward and backward alike)."""
    return (stages - 1) / (microbatches + stages - 1)


def run(
    run_layers: Callable,
    x_BLD: jax.Array,
    stacked,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array | None,
) -> jax.Array:
    """`run_layers(x_BLD, layers, positions_BL, segment_ids_BL)` over all stacked layers, as a
    pipeline over the mesh's `stage` axis. Equal to calling `run_layers` on the whole stack."""
    S = num_stages()
    M = _MICROBATCHES.get() or 2 * S
    B = x_BLD.shape[0]
    if B % M:
        raise ValueError(f"batch of {B} rows cannot be cut into {M} pipeline microbatches")

    def split(a_B):  # [B, ...] -> [M, B/M, ...]; microbatch m holds rows m, m+M, m+2M, ...
        return a_B.reshape(B // M, M, *a_B.shape[1:]).swapaxes(0, 1)

    segments = segment_ids_BL is not None
    args = (stacked, split(x_BLD), split(positions_BL)) + ((split(segment_ids_BL),) if segments else ())

    def per_stage(layers, x_MbLD, positions_MbL, *maybe_segments_MbL):
        stage = jax.lax.axis_index(AXIS)
        shift = [(i, i + 1) for i in range(S - 1)]  # the last stage sends nothing on

        def tick(held_bLD, t):
            # Stage 0 takes microbatch t from the input; the others what their neighbour sent.
            first_bLD = x_MbLD[jnp.clip(t, 0, M - 1)]
            in_bLD = jnp.where(stage == 0, first_bLD, held_bLD)
            m = jnp.clip(t - stage, 0, M - 1)  # the microbatch this stage works on at tick t
            seg_bL = maybe_segments_MbL[0][m] if segments else None
            out_bLD = run_layers(in_bLD, layers, positions_MbL[m], seg_bL)
            return jax.lax.ppermute(out_bLD, AXIS, shift), out_bLD

        held_bLD = jnp.zeros_like(x_MbLD[0])
        _, outs_TbLD = jax.lax.scan(tick, held_bLD, jnp.arange(M + S - 1))
        # The last stage finished microbatch m at tick m + S - 1; give its results to every stage.
        outs_MbLD = jnp.where(stage == S - 1, outs_TbLD[S - 1:], jnp.zeros_like(outs_TbLD[S - 1:]))
        return jax.lax.psum(outs_MbLD, AXIS)

    in_specs = (P(AXIS), P(), P()) + ((P(),) if segments else ())
    # check_vma=False: Pallas kernels (splash attention) inside a stage build outputs that carry
    # no per-stage variation, and jax 0.10 rejects their cotangents when it tracks variation.
    # The schedule is checked against the plain model by tests/test_pipeline.py either way.
    outs_MbLD = jax.shard_map(per_stage, in_specs=in_specs, out_specs=P(), axis_names={AXIS},
                              check_vma=False)(*args)
    return outs_MbLD.swapaxes(0, 1).reshape(x_BLD.shape)

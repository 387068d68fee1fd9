"""Attention kernels behind one function: `attention(q, k, v, segment_ids, implementation)`.

Inputs are already projected and rotated. Masking is causal by index within the row, and a query
attends only to keys of its own segment, so packed documents never see each other. Scores and
softmax are computed in float32 whatever the compute dtype.

Implementations (`model.attention`):
  xla     the reference below, plain jnp; runs everywhere, materializes the [L, S] scores.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention on
          NVIDIA GPUs, bfloat16 or float16 only.
  splash  Pallas splash attention on TPU (blockwise, causal blocks above the diagonal skipped),
          run per shard under `shard_map` since a Pallas kernel is not partitioned by XLA.
  auto    splash on TPU, cudnn on a GPU with a 16-bit dtype, xla otherwise; the choice is printed.
Asking for a kernel the devices cannot run is a ConfigError, never a silent fallback.

Dimension key: B batch, L query length, S key length, H query heads, G kv heads,
R = H // G query heads per kv head, K head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.config import ConfigError

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")

# Tests run the splash kernel on CPU through the Pallas interpreter (slow, same numerics).
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxlm_interpret", default=False)
_ANNOUNCED: set[tuple[str, str]] = set()


@contextlib.contextmanager
def interpret_kernels() -> contextlib.AbstractContextManager[None]:
    """Within this context the Pallas kernels (splash) run in interpret mode, on any platform."""
    token = _INTERPRET.set(True)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


def platform() -> str:
    """Platform of the devices being compiled for: the current mesh's (which may be a TPU
    topology compiled for from a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def resolve(implementation: str, dtype, where: str | None = None) -> str:
    """The concrete implementation for `implementation` on platform `where` (default: the
    current one). Raises ConfigError when the platform cannot run it."""
    where = where or platform()
    if implementation == "auto":
        if where == "tpu":
            choice = "splash"
        elif where in ("gpu", "cuda") and jnp.dtype(dtype).itemsize == 2:
            choice = "cudnn"
        else:
            choice = "xla"
        if (where, choice) not in _ANNOUNCED:
            _ANNOUNCED.add((where, choice))
            print(f"attention: auto -> {choice} on {where}", file=sys.stderr, flush=True)
        return choice
    if _INTERPRET.get():
        return implementation
    if implementation == "cudnn":
        if where not in ("gpu", "cuda"):
            raise ConfigError(f"config key 'model.attention' is 'cudnn', which needs an NVIDIA GPU; "
                              f"these devices are {where}: use 'xla' or 'auto'")
        if jnp.dtype(dtype).itemsize != 2:
            raise ConfigError(f"config key 'model.attention' is 'cudnn', which needs "
                              f"model.dtype bfloat16 or float16, not {jnp.dtype(dtype).name}")
    if implementation == "splash" and where != "tpu":
        raise ConfigError(f"config key 'model.attention' is 'splash', a TPU kernel; these devices "
                          f"are {where}: use 'xla' or 'auto'")
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"config key 'model.attention' is {implementation!r}; valid: "
                          f"{', '.join(IMPLEMENTATIONS)}")
    return implementation


def attention_mask(segment_ids_BL: jax.Array | None, length: int) -> jax.Array:
    """Boolean mask [B or 1, L, S]: causal, and within the same segment when segments are given."""
    causal_LS = jnp.tril(jnp.ones((length, length), dtype=bool))
    if segment_ids_BL is None:
        return causal_LS[None]
    same_BLS = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
    return causal_LS[None] & same_BLS


def xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None):
    """Reference attention in plain jnp; XLA fuses it well on CPU and is the ground truth."""
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K) * jnp.asarray(K**-0.5, q_BLHK.dtype)
    scores_BGRLS = jnp.einsum(
        "BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32
    )
    mask_BLS = attention_mask(segment_ids_BL, L)
    scores_BGRLS = jnp.where(mask_BLS[:, None, None], scores_BGRLS, -jnp.inf)
    # Every query sees at least itself (causal diagonal, own segment), so no row is all -inf.
    probs_BGRLS = jax.nn.softmax(scores_BGRLS, axis=-1).astype(v_BSGK.dtype)
    out_BLGRK = jnp.einsum("BGRLS,BSGK->BLGRK", probs_BGRLS, v_BSGK)
    return out_BLGRK.reshape(B, L, H, K)


def dot_product_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None, *, implementation="cudnn"):
    """`jax.nn.dot_product_attention` with our masking (causal + same segment). With
    implementation="cudnn" this is the GPU kernel; tests run the same call with "xla"."""
    mask_B1LS = None
    if segment_ids_BL is not None:
        mask_B1LS = (segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BLHK, k_BSGK, v_BSGK, mask=mask_B1LS, is_causal=True,
        scale=q_BLHK.shape[-1] ** -0.5, implementation=implementation,
    )


def _splash_one_shard(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL):
    """Splash attention over the (local) arrays: one kernel per row, heads first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    B, L, H, K = q_BLHK.shape
    block = min(512, L)
    if L % block:
        raise ConfigError(f"config key 'data.seq_len' ({L}) must be a multiple of {block} for "
                          "model.attention='splash'")
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                              block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((L, L))] * H),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=_INTERPRET.get())
    q_BHLK = (q_BLHK * jnp.asarray(K**-0.5, q_BLHK.dtype)).transpose(0, 2, 1, 3)
    k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
    if segment_ids_BL is None:
        out_BHLK = jax.vmap(kernel)(q_BHLK, k_BGSK, v_BGSK)
    else:
        def row(q_HLK, k_GSK, v_GSK, seg_L):
            return kernel(q_HLK, k_GSK, v_GSK, segment_ids=splash.SegmentIds(seg_L, seg_L))

        out_BHLK = jax.vmap(row)(q_BHLK, k_BGSK, v_BGSK, segment_ids_BL)
    return out_BHLK.transpose(0, 2, 1, 3)


def splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None):
    """Splash attention, each device running the kernel on its batch rows and heads."""
    specs = sharding.current_specs((("batch", None, "heads", None), ("batch", None, "kv_heads", None),
                                    ("batch", None)))
    if specs is None:
        return _splash_one_shard(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)
    q_spec, kv_spec, seg_spec = specs
    # A Mosaic kernel must see every mesh axis as manual (the pipeline's `stage` already is).
    mesh = jax.sharding.get_abstract_mesh()
    axes = set(mesh.axis_names) - set(mesh.manual_axes)
    if not axes:
        return _splash_one_shard(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)
    if segment_ids_BL is None:
        fn = lambda q, k, v: _splash_one_shard(q, k, v, None)  # noqa: E731
        return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                             axis_names=axes, check_vma=False)(q_BLHK, k_BSGK, v_BSGK)
    return jax.shard_map(_splash_one_shard, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, axis_names=axes,
                         check_vma=False)(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)


def attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None, *, implementation: str = "xla"):
    match resolve(implementation, q_BLHK.dtype):
        case "xla":
            return xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)
        case "cudnn":
            return dot_product_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, implementation="cudnn")
        case "splash":
            return splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)

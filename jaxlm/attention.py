"""Attention kernels behind one function: `attention(q, k, v, segment_ids, implementation)`.

Inputs are already projected and rotated. Masking is causal by index within the row, and a query
attends only to keys of its own segment, so packed documents never see each other. Scores and
softmax are computed in float32 whatever the compute dtype.

Implementations (`model.attention`):
  xla     blockwise attention in plain jnp: skips the blocks above the causal diagonal, keeps
          no [L, S] probabilities for the backward pass (recomputes them, as flash attention
          does); runs everywhere, one (row, kv head) at a time on CPU, where that fits in cache
          (all at once in programs that are never differentiated: `forward_only`).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention on
          NVIDIA GPUs, bfloat16 or float16 only.
  splash  Pallas splash attention on TPU (blockwise, causal blocks above the diagonal skipped),
          run per shard under `shard_map` since a Pallas kernel is not partitioned by XLA.
  auto    splash on TPU, cudnn on a GPU with a 16-bit dtype, xla otherwise; the choice is printed.
Asking for a kernel the devices cannot run is a ConfigError, never a silent fallback. Only
`xla` also gives each query's attention entropy (`entropy=True`, for loss.attention_entropy).

Dimension key: B batch, L query length, S key length, H query heads, G kv heads,
R = H // G query heads per kv head, K head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys

import jax
import jax.numpy as jnp

from jaxlm import sharding
from jaxlm.config import ConfigError

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "auto")

# Tests run the splash kernel on CPU through the Pallas interpreter (slow, same numerics).
_INTERPRET: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxlm_interpret", default=False)
_ANNOUNCED: set[tuple[str, str]] = set()


# Set while tracing a program that is never differentiated (scoring, prefill, evaluation): there
# the `xla` kernel runs its (row, kv head) pairs batched on CPU too (see below).
_FORWARD_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxlm_forward_only",
                                                                      default=False)


def forward_only(fn):
    """`fn` traced as a forward-only program: on CPU the `xla` kernel runs every (row, kv head)
    pair at once instead of one by one, which only pays for itself when a backward pass follows
    (docs/performance.md). Same numerics; differentiating such a program is still correct."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        token = _FORWARD_ONLY.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _FORWARD_ONLY.reset(token)

    return traced


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


def real_queries(segment_ids_BL, shape):
    """float32 [B, L]: 1 at a real token (segment id not 0, or every token without segments)."""
    if segment_ids_BL is None:
        return jnp.ones(shape, jnp.float32)
    return (segment_ids_BL != 0).astype(jnp.float32)


def reference_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None):
    """Attention as the textbook writes it, in plain jnp: the ground truth the kernels are tested
    against. It materializes the [B, H, L, S] scores and, under autodiff, keeps the probabilities."""
    return masked_attention(q_BLHK, k_BSGK, v_BSGK, attention_mask(segment_ids_BL, q_BLHK.shape[1]))


def probabilities(q_BLHK, k_BSGK, segment_ids_BL=None):
    """float32 attention probabilities [B, H, L, S] of the reference path: each query's softmax
    over the keys it may see (causal, its own segment), exact zeros elsewhere. For looking at
    the attention (LM.attention_maps), never for training: it is [L, S] per head."""
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    q_BLGRK = q_BLHK.astype(jnp.float32).reshape(B, L, G, H // G, K) * K**-0.5
    scores_BGRLS = jnp.einsum("BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK.astype(jnp.float32))
    allowed_BLS = attention_mask(segment_ids_BL, L)
    scores_BGRLS = jnp.where(allowed_BLS[:, None, None], scores_BGRLS, -jnp.inf)
    probs_BGRLS = jnp.where(allowed_BLS[:, None, None], jax.nn.softmax(scores_BGRLS, axis=-1), 0.0)
    return probs_BGRLS.reshape(B, H, L, L)


def masked_attention(q_BLHK, k_BSGK, v_BSGK, allowed_BLS):
    """Attention of queries [B, L] over keys [B, S] where `allowed_BLS` (or [1, L, S]) is true.

    The reference path's core (`reference_attention`); decoding over the KV cache, whose layout
    differs, uses `cached_attention`. Every query must be allowed at least one key (no row of
    -inf)."""
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K) * jnp.asarray(K**-0.5, q_BLHK.dtype)
    scores_BGRLS = jnp.einsum(
        "BLGRK,BSGK->BGRLS", q_BLGRK, k_BSGK, preferred_element_type=jnp.float32
    )
    scores_BGRLS = jnp.where(allowed_BLS[:, None, None], scores_BGRLS, -jnp.inf)
    probs_BGRLS = jax.nn.softmax(scores_BGRLS, axis=-1).astype(v_BSGK.dtype)
    out_BLGRK = jnp.einsum("BGRLS,BSGK->BLGRK", probs_BGRLS, v_BSGK)
    return out_BLGRK.reshape(B, L, H, K)


def cached_attention(q_BLHK, k_BGTK, v_BGKT, allowed_BLT):
    """Attention of L new queries over a KV cache's keys [B, G, T] (their own already written
    there) where `allowed_BLT` is true (jaxlm/kv_cache.py makes the mask, and says why the
    cache's values are [B, G, K, T]). The decode step has L = 1: one row of scores per head,
    so materializing them costs nothing. Every query must be allowed at least one key."""
    B, L, H, K = q_BLHK.shape
    G = k_BGTK.shape[1]
    q_BLGRK = q_BLHK.reshape(B, L, G, H // G, K) * jnp.asarray(K**-0.5, q_BLHK.dtype)
    scores_BGRLT = jnp.einsum(
        "BLGRK,BGTK->BGRLT", q_BLGRK, k_BGTK, preferred_element_type=jnp.float32)
    scores_BGRLT = jnp.where(allowed_BLT[:, None, None], scores_BGRLT, -jnp.inf)
    probs_BGRLT = jax.nn.softmax(scores_BGRLT, axis=-1).astype(v_BGKT.dtype)
    out_BLGRK = jnp.einsum("BGRLT,BGKT->BLGRK", probs_BGRLT, v_BGKT)
    return out_BLGRK.reshape(B, L, H, K)


# --- The `xla` implementation: blockwise, in plain jnp. ------------------------------------------
#
# Work is split per (batch row, kv head) and into blocks of BLOCK queries. A query block only
# meets the keys up to its last row, so the blocks above the causal diagonal are never computed
# (3/8 of the score matmuls at 4 blocks). Each head's forward is under `jax.checkpoint`: the
# backward pass recomputes it from q, k and v instead of keeping probabilities, so nothing of size
# [L, S] is kept between the forward and the backward pass (as in flash attention).
#
# On CPU the (batch row, kv head) pairs run one after another under `lax.map`, so that one head's
# blocks, forward and backward, stay in cache: memory bandwidth, not arithmetic, is what limits
# attention on a CPU (docs/performance.md). Elsewhere they run batched (vmap), which suits a GPU,
# and so do they on CPU in programs traced under `forward_only`: without a backward pass, the
# loop's per-iteration overhead costs more than the cache saves (scoring ~1.2x faster batched).
#
# Local dimension key: N = B * G (batch row, kv head) pairs, Q a block of queries.

BLOCK = 128


def _head_attention(q_RLK, k_SK, v_SK, seg_L, entropy=False):
    """One kv head of one batch row: [R, L, K] from queries [R, L, K], keys/values [S, K]. With
    `entropy`, also each query's attention entropy [R, L] (float32), from the same blocks."""
    R, L, K = q_RLK.shape
    outs, entropies = [], []
    for q_lo in range(0, L, BLOCK):
        q_hi = min(q_lo + BLOCK, L)
        scores_RQS = jnp.einsum("RQK,SK->RQS", q_RLK[:, q_lo:q_hi], k_SK[:q_hi],
                                preferred_element_type=jnp.float32) * K**-0.5
        allowed_QS = jnp.arange(q_lo, q_hi)[:, None] >= jnp.arange(q_hi)[None, :]
        if seg_L is not None:
            allowed_QS &= seg_L[q_lo:q_hi, None] == seg_L[None, :q_hi]
        # Every query sees at least itself (causal diagonal, own segment): no row is all -inf.
        masked_RQS = jnp.where(allowed_QS, scores_RQS, -jnp.inf)
        probs_RQS = jax.nn.softmax(masked_RQS, axis=-1)
        outs.append(jnp.einsum("RQS,SK->RQK", probs_RQS.astype(v_SK.dtype), v_SK[:q_hi]))
        if entropy:
            # -sum p log p = logsumexp(s) - sum p s over the allowed keys (p is 0 elsewhere).
            lse_RQ = jax.nn.logsumexp(masked_RQS, axis=-1)
            entropies.append(lse_RQ - jnp.sum(probs_RQS * jnp.where(allowed_QS, scores_RQS, 0.0),
                                              axis=-1))
    out_RLK = jnp.concatenate(outs, axis=1)
    return (out_RLK, jnp.concatenate(entropies, axis=1)) if entropy else out_RLK


def _blockwise_one_shard(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, per_head, entropy=False):
    B, L, H, K = q_BLHK.shape
    G = k_BSGK.shape[2]
    q_NRLK = q_BLHK.reshape(B, L, G, H // G, K).transpose(0, 2, 3, 1, 4).reshape(B * G, H // G, L, K)
    k_NSK = k_BSGK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    v_NSK = v_BSGK.transpose(0, 2, 1, 3).reshape(B * G, L, K)
    arrays = (q_NRLK, k_NSK, v_NSK)
    if segment_ids_BL is not None:
        arrays += (jnp.repeat(segment_ids_BL, G, axis=0),)
    head = jax.checkpoint(lambda q, k, v, seg=None: _head_attention(q, k, v, seg, entropy))
    if per_head:
        # batch_size=1 vmaps each step over a batch of one, so that the score matmuls have a
        # batch dimension and the save_dots remat policy does not keep them.
        result = jax.lax.map(lambda xs: head(*xs), arrays, batch_size=1)
    else:
        result = jax.vmap(head)(*arrays)
    out_NRLK, entropy_NRL = result if entropy else (result, None)
    out_BLHK = out_NRLK.reshape(B, G, H // G, L, K).transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)
    if not entropy:
        return out_BLHK
    return out_BLHK, entropy_NRL.reshape(B, G, H // G, L).transpose(0, 3, 1, 2).reshape(B, L, H)


def xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None, entropy=False):
    """The `xla` implementation: blockwise attention in plain jnp (see above), run per shard.
    With `entropy`, returns (output, float32 entropy [B, L, H] of each query's distribution)."""
    if jax.sharding.get_abstract_mesh().manual_axes:
        # Inside the pipeline's shard_map: batched, and left to XLA to split over the other mesh
        # axes (splash, which must run per shard, nests a shard_map there instead).
        return _blockwise_one_shard(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, per_head=False,
                                    entropy=entropy)
    per_head = platform() == "cpu" and not _FORWARD_ONLY.get()
    return _per_shard(functools.partial(_blockwise_one_shard, per_head=per_head, entropy=entropy),
                      q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, entropy=entropy)


def _per_shard(local_fn, q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, entropy=False):
    """`local_fn(q, k, v, segment_ids)` run by each device on its batch rows and heads (whole
    sequences), under `shard_map` over every mesh axis not already manual; plainly without a mesh.
    With `entropy`, `local_fn` also returns a [B, L, H] array, placed like the queries."""
    specs = sharding.current_specs((("batch", None, "heads", None), ("batch", None, "kv_heads", None),
                                    ("batch", None), ("batch", None, "heads")))
    mesh = jax.sharding.get_abstract_mesh()
    axes = set() if specs is None else set(mesh.axis_names) - set(mesh.manual_axes)
    if not axes:
        return local_fn(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)
    args, in_specs = (q_BLHK, k_BSGK, v_BSGK), tuple(specs[:2]) + (specs[1],)
    fn = local_fn
    if segment_ids_BL is None:
        fn = lambda q, k, v: local_fn(q, k, v, None)  # noqa: E731
    else:
        args, in_specs = args + (segment_ids_BL,), in_specs + (specs[2],)
    out_specs = (specs[0], specs[3]) if entropy else specs[0]
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, axis_names=axes,
                         check_vma=False)(*args)


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
    """Splash attention, each device running the kernel on its batch rows and heads (a Mosaic
    kernel must see every mesh axis as manual; the pipeline's `stage` already is)."""
    return _per_shard(_splash_one_shard, q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)


def attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None, *, implementation: str = "xla",
              entropy: bool = False):
    """Attention output [B, L, H, K]; with `entropy` (loss.attention_entropy), the pair (output,
    float32 entropy [B, L, H] of each query's attention distribution), which only `xla` gives."""
    match resolve(implementation, q_BLHK.dtype):
        case "xla":
            return xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, entropy=entropy)
        case choice if entropy:
            raise ConfigError(f"config key 'loss.attention_entropy' needs the 'xla' attention "
                              f"kernel, which gives the attention entropy block by block; "
                              f"model.attention resolves to {choice!r} here: set model.attention=xla")
        case "cudnn":
            return dot_product_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL, implementation="cudnn")
        case "splash":
            return splash_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)

"""The KV cache of generation and scoring: every layer's keys and values, in slots per row.

k is [N, B, G, T, K] and v [N, B, G, K, T], in the model dtype (layers, batch, kv heads, cache
slots, head dim), with the logical names of K_AXES and V_AXES, so `sharding.py` puts batch over
data/fsdp and kv heads over tensor. The layout comes from measurements on XLA:CPU
(docs/performance.md):

- kv heads before slots. The decode step's attention (attention.cached_attention) is two
  products batched over (B, G); with slots first, XLA:CPU copied each layer's whole cache into
  [B, G, T, K] order on every step (llama_125m, batch 8: a third of a decode step).
- values with the slots last. At batch 1 XLA:CPU computes the probabilities-times-values
  product as a matrix-vector product that wants [K, T] rows, and copied [T, K] values into that
  order each step (7x the time of the product itself); at batch 8 either order runs alike.
- one buffer per layer on the per-layer path, from batch 2. Generation on CPU runs the blocks
  from per-layer weight buffers (model.unstack_layers); there the cache is lists of N
  per-layer buffers (`per_layer=True`), because XLA:CPU also copies the slice `k[i]` of a
  stacked buffer before a product reads it (batch 8: 1.15-1.25x tokens/s per-layer). Not at
  batch 1: there XLA:CPU folds the size-1 batch axis away in the attention's reads, fuses a
  second copy of the in-place update into them, and then copies each per-layer buffer several
  times a step (0.8x of the stacked cache's tokens/s). Elsewhere (scanned layers, GPUs, TPUs)
  the cache is the stacked arrays.

Slots are filled left to right, the same slot for every row at once (rows are left-padded, so
their last prompt tokens line up). This module imports nothing of jaxlm's but its config and the
sharding names.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.sharding import constrain

# Logical names of the stacked k [N, B, G, T, K] and v [N, B, G, K, T] (T: cache length, in
# slots); a per-layer buffer has the same names without "layers".
K_AXES = ("layers", "batch", "kv_heads", "cache_length", "head_dim")
V_AXES = ("layers", "batch", "kv_heads", "head_dim", "cache_length")


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for a batch of left-padded rows, in T slots per row.

    `index` slots are written. Row b's real tokens start at slot `start_B[b]` (its left pads
    come before and are never attended). The whole cache goes through the layer loop; layer i
    writes its new keys and values into its buffers in place (`write`: a dynamic-update-slice of
    a loop-carried buffer) and attends over them (attention.cached_attention). `fresh` (static)
    marks the prefill call: the cache is empty and the whole prompt is written at slot 0, so
    attention runs the configured kernel over the prompt itself rather than over the cache.
    """

    k_NBGTK: jax.Array | list[jax.Array]  # stacked, or N per-layer [B, G, T, K] buffers
    v_NBGKT: jax.Array | list[jax.Array]  # stacked, or N per-layer [B, G, K, T] buffers
    index: jax.Array  # int32 scalar
    start_B: jax.Array  # int32 [B]
    fresh: bool = dataclasses.field(default=False, metadata={"static": True})

    @staticmethod
    def empty(cfg: ModelConfig, batch: int, length: int, start_B, per_layer: bool = False) -> KVCache:
        G, K, dt = cfg.num_kv_heads, head_dim(cfg), jnp.dtype(cfg.dtype)
        k_shape, v_shape = (batch, G, length, K), (batch, G, K, length)
        if per_layer:
            k, v = ([jnp.zeros(shape, dt) for _ in range(cfg.num_layers)]
                    for shape in (k_shape, v_shape))
        else:
            k, v = (jnp.zeros((cfg.num_layers, *shape), dt) for shape in (k_shape, v_shape))
        cache = KVCache(k, v, jnp.zeros((), jnp.int32), start_B, fresh=True)
        return cache.constrained()

    def constrained(self) -> KVCache:
        """The cache with its arrays placed by their logical names."""
        def place(x, axes):
            return [constrain(a, axes[1:]) for a in x] if isinstance(x, list) else constrain(x, axes)
        return dataclasses.replace(self, k_NBGTK=place(self.k_NBGTK, K_AXES),
                                   v_NBGKT=place(self.v_NBGKT, V_AXES))


def write(cache: KVCache, layer, k_BLGK, v_BLGK) -> tuple[KVCache, jax.Array, jax.Array]:
    """(cache, layer `layer`'s k [B, G, T, K], its v [B, G, K, T]) after writing the layer's new
    keys and values at slots index..index + L - 1. `cache` holds that layer's buffers or the
    stacked arrays."""
    stacked = cache.k_NBGTK.ndim == 5
    lead, i = ((layer,) if stacked else ()), cache.index

    def put(buffer, new, at):
        new = new.astype(buffer.dtype)
        return jax.lax.dynamic_update_slice(buffer, new[None] if stacked else new, lead + at)

    k = put(cache.k_NBGTK, k_BLGK.transpose(0, 2, 1, 3), (0, 0, i, 0))
    v = put(cache.v_NBGKT, v_BLGK.transpose(0, 2, 3, 1), (0, 0, 0, i))
    cache = dataclasses.replace(cache, k_NBGTK=k, v_NBGKT=v)
    return (cache, k[layer], v[layer]) if stacked else (cache, k, v)


def allowed(cache: KVCache, L: int, segment_ids_BL=None) -> jax.Array:
    """[B, L, T] bool: the slots each of the L new queries (in slots index..index + L - 1, already
    written) sees: the row's real slots up to its own. With `segment_ids_BL` (scoring.py: a chunk
    of several segments after a shared prefix) each sees the cached prefix and, among the new
    slots, only its own segment's."""
    T = cache.k_NBGTK.shape[-2]  # a layer's buffers or the stacked arrays: slots come second-last
    slot_T = jnp.arange(T)
    allowed_BLT = ((slot_T[None, None, :] >= cache.start_B[:, None, None])
                   & (slot_T[None, None, :] <= cache.index + jnp.arange(L)[None, :, None]))
    if segment_ids_BL is not None:
        key_segment_BT = jax.lax.dynamic_update_slice(
            jnp.full((segment_ids_BL.shape[0], T), -1, jnp.int32),
            segment_ids_BL.astype(jnp.int32), (0, cache.index))
        allowed_BLT &= ((slot_T[None, None, :] < cache.index)
                        | (key_segment_BT[:, None, :] == segment_ids_BL[:, :, None]))
    return allowed_BLT

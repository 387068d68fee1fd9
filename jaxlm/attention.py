"""Attention kernels behind one function: `attention(q, k, v, segment_ids, implementation)`.

Inputs are already projected and rotated. Masking is causal by index within the row, and a query
attends only to keys of its own segment, so packed documents never see each other. Scores and
softmax are computed in float32 whatever the compute dtype.

Dimension key: B batch, L query length, S key length, H query heads, G kv heads,
R = H // G query heads per kv head, K head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


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


def attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL=None, *, implementation: str = "xla"):
    match implementation:
        case "xla":
            return xla_attention(q_BLHK, k_BSGK, v_BSGK, segment_ids_BL)
        case _:
            raise ValueError(
                f"unknown attention implementation {implementation!r}; "
                f"valid: {', '.join(IMPLEMENTATIONS)}"
            )

"""int8 weight-only quantization: per-output-channel absmax scales, multiplied inside jit.

    lm = jaxlm.load("runs/tiny", quantize="int8")

Every block matmul weight (q, k, v, o, gate, up, down) and the output projection (the embedding
table when it is tied) becomes a `QArray`: int8 values of the weight's shape and float32 scales
of the same rank, with the contraction axes kept at size 1. Scale = max |w| over the contraction
axes / 127, so each output channel uses the whole int8 range; the stacked `layers` axis stays in
front of both, so the layer scan slices them like any other parameter.

jaxlm stores weights [out, in] (HF's layout), so the contraction axes are always the trailing
ones, and the output of every model einsum ends with the weight's output axes in order: the
scale is applied to the matmul's output (x @ (q * s)^T = (x @ q^T) * s for a per-output scale),
never to a dequantized copy of the weight. On GPUs and TPUs the int8 weight is converted to the
compute dtype inside the matmul; on CPU the product runs on int8 kernels (`_int8_product`).

Not qwix: on stacked layers run by a raw `lax.scan` it finds no modules to quantize and changes
nothing, silently (../shared/DESIGN.md). This module imports nothing of jaxlm's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

KINDS = ("none", "int8")

# Parameter name -> how many trailing axes its matmul contracts (the input axes).
CONTRACTED = {
    "w_q_HKD": 1, "w_k_GKD": 1, "w_v_GKD": 1, "w_o_DHK": 2,
    "w_gate_FD": 1, "w_up_FD": 1, "w_down_DF": 1,
    "w_out_VD": 1,
}


class QuantizeError(ValueError):
    """An unknown quantization kind. One line."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QArray:
    """An int8 weight and its float32 scales; `contracted` trailing axes are reduced (size 1)."""

    q: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, the weight's shape with the contracted axes of size 1
    contracted: int = dataclasses.field(metadata={"static": True})

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def check_kind(kind: str | None) -> str:
    kind = kind or "none"
    if kind not in KINDS:
        raise QuantizeError(f"unknown quantization {kind!r}; valid: {', '.join(KINDS)}")
    return kind


def quantize_array(w: jax.Array, contracted: int) -> QArray:
    """Symmetric int8 with one scale per output channel (absmax over the contracted axes)."""
    w = jnp.asarray(w, jnp.float32)
    axes = tuple(range(w.ndim - contracted, w.ndim))
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QArray(q, scale, contracted)


def quantize_params(params: dict, tie_embeddings: bool) -> dict:
    """A copy of jaxlm's pure-dict params with the matmul weights as QArrays."""

    def walk(tree: dict) -> dict:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                out[name] = walk(value)
            elif name in CONTRACTED or (name == "embed_VD" and tie_embeddings):
                out[name] = quantize_array(value, CONTRACTED.get(name, 1))
            else:
                out[name] = value
        return out

    return walk(params)


# On CPU, products with at most this many rows (decoding: one per sequence) put the weight on
# the left: XLA:CPU reads an [out, in] weight 1.3x (1 row) to 1.9x (8 rows) faster that way.
SMALL_ROWS = 32


def einsum(spec: str, x, w, dtype, *, cpu: bool = False, **kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for the model's weight matmuls, `w` cast to `dtype` (a QArray's
    scales multiply the output). `cpu`: compiling for XLA:CPU, which gets the forms below.

    The specs follow one convention, checked here: the weight is [output axes, contracted axes],
    `x` ends with the same contracted axes, and the result is x's other axes then the weight's
    output axes (e.g. "BLHK,DHK->BLD"). So the matmul is computed as one 2-D [rows, in] x
    [out, in] product on free reshapes: XLA:CPU copies a 3-D weight such as [H, K, D] into
    another layout before multiplying, which made the q, k, v and o projections of a decode
    step 4x slower than the same product in 2-D (docs/performance.md)."""
    inputs, out_axes = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    c = len(w_axes) - len(set(w_axes) & set(out_axes))
    if not (x_axes.endswith(w_axes[len(w_axes) - c:]) and out_axes == x_axes[:len(x_axes) - c]
            + w_axes[:len(w_axes) - c]):
        raise ValueError(f"einsum spec {spec!r} is not [.., in] x [out, in] -> [.., out]")
    q = w.q if isinstance(w, QArray) else w
    n_in = math.prod(q.shape[q.ndim - c:])
    n_out = math.prod(q.shape[: q.ndim - c])
    x_RI, q_OI = x.reshape(-1, n_in), q.reshape(n_out, n_in)
    if isinstance(w, QArray) and cpu:
        out = _int8_product(x_RI, q_OI).astype(kwargs.get("preferred_element_type") or dtype)
    elif cpu and x_RI.shape[0] <= SMALL_ROWS:
        # The barrier keeps XLA from folding the transpose back into the product.
        out = jax.lax.optimization_barrier(
            jax.lax.dot_general(q_OI.astype(dtype), x_RI, (((1,), (1,)), ((), ())), **kwargs)).T
    else:
        out = jax.lax.dot_general(x_RI, q_OI.astype(dtype), (((1,), (1,)), ((), ())), **kwargs)
    out = out.reshape(x.shape[: x.ndim - c] + q.shape[: q.ndim - c])
    if not isinstance(w, QArray):
        return out
    scale = w.scale.reshape(w.scale.shape[: w.scale.ndim - w.contracted])
    return out * scale.astype(out.dtype)


def split16(x_RI: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(int8 [2R, I]: rows `hi` then rows `lo`, float32 scale [R, 1]) with x ~= scale * (256 hi +
    lo): each row rounded to 16 bits of its absmax (a relative error below 2^-15 of it, finer
    than bfloat16's 2^-8), carried as two int8 halves."""
    x_RI = x_RI.astype(jnp.float32)
    scale_R1 = jnp.max(jnp.abs(x_RI), axis=-1, keepdims=True) / (127.0 * 256.0)
    scale_R1 = jnp.where(scale_R1 > 0, scale_R1, 1.0)
    x16_RI = jnp.round(x_RI / scale_R1)  # in [-32512, 32512]
    hi_RI = jnp.floor(x16_RI / 256.0 + 0.5)  # in [-127, 127]
    lo_RI = x16_RI - 256.0 * hi_RI  # in [-128, 127]
    return jnp.concatenate([hi_RI, lo_RI]).astype(jnp.int8), scale_R1


def _int8_product(x_RI: jax.Array, q_OI: jax.Array) -> jax.Array:
    """float32 x @ q^T for int8 q, on XLA:CPU's int8 x int8 -> int32 kernels.

    XLA:CPU does not fuse an int8 -> float conversion into a matmul: dequantizing first wrote
    and read a float32 copy of every weight on every step, slower than the float32 model. Here
    the weight stays int8 and the activations are split into two int8 halves (`split16`), so the
    product reads one byte per weight and, up to the activations' 16-bit rounding, equals the
    product with the dequantized weight. int32 sums cannot overflow below 2^31 / (127 * 128) =
    132,000 input features."""
    R = x_RI.shape[0]
    x8_RI, scale_R1 = split16(x_RI)
    acc = jax.lax.dot_general(x8_RI, q_OI, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.int32).astype(jnp.float32)
    return (acc[:R] * 256.0 + acc[R:]) * scale_R1


def take_rows(table: QArray, ids, dtype) -> jax.Array:
    """Embedding lookup in a quantized [V, D] table: the rows, dequantized."""
    return (jnp.take(table.q, ids, axis=0).astype(jnp.float32)
            * jnp.take(table.scale, ids, axis=0)).astype(dtype)


def num_bytes(params) -> int:
    """Bytes of a params tree (QArrays counted as int8 + scales)."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))

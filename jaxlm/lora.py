"""LoRA: low-rank adapters on the block matmuls, stacked along `layers` like the params.

For a target weight W [out, in] (jaxlm's and HF's orientation), the adapted matmul is

    y = x W^T + scale * (x A^T) B^T,    A [r, in], B [out, r],    scale = alpha / r
                                                                  (alpha / sqrt(r) with rslora)

A and B are PEFT's `lora_A` / `lora_B` exactly (so export is a rename), with the `layers` axis
in front: A [N, r, in], B [N, out, r], where `in` and `out` are the weight's contracted and output
axes flattened (o: in = H*K; q: out = H*K; k, v: out = G*K). A starts as PEFT's default
(kaiming-uniform, bound 1/sqrt(in)), B at zero, so the adapted model starts bitwise equal to
its base.

In a run, the factors are the only parameters the optimizer sees: `train.py` keeps them as the
state's params and the base as its frozen part, and the model runs on `combine(base, factors)`,
whose target weights are `LoraWeight`s. `einsum` (called by the model's `_matmul`) computes the
two products without ever forming W + BA, so the frozen base may stay in bfloat16 (or int8) and
the gradient reaches only A and B. `merge` forms W + scale * BA (in float32, then cast) for
export and loading. PEFT import/export is `jaxlm/peft.py`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxlm import quantize

# lora.targets name -> (block part, parameter): every block matmul.
TARGETS = {
    "q": ("attn", "w_q_HKD"), "k": ("attn", "w_k_GKD"), "v": ("attn", "w_v_GKD"),
    "o": ("attn", "w_o_DHK"), "gate": ("mlp", "w_gate_FD"), "up": ("mlp", "w_up_FD"),
    "down": ("mlp", "w_down_DF"),
}
# Logical axis names of each weight's flattened output and input (for sharding the factors).
AXES = {
    "w_q_HKD": ("heads", "embed"), "w_k_GKD": ("kv_heads", "embed"),
    "w_v_GKD": ("kv_heads", "embed"), "w_o_DHK": ("embed", "heads"),
    "w_gate_FD": ("mlp", "embed"), "w_up_FD": ("mlp", "embed"), "w_down_DF": ("embed", "mlp"),
}
FACTORS = ("w_a", "w_b")  # "w_": weight decay treats them as matrices (optim.decay_mask)


class LoraError(ValueError):
    """A LoRA setting or adapter does not fit the model. One line naming the key or tensor."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraWeight:
    """A frozen weight with its factors (one layer's, or stacked: leading `layers` axes on all)."""

    base: jax.Array  # or a quantize.QArray
    a: jax.Array  # [..., r, in]
    b: jax.Array  # [..., out, r]
    scale: float = dataclasses.field(metadata={"static": True})


def parse_targets(text: str) -> tuple[str, ...]:
    """`lora.targets` (validated by config.py) in model order, without repeats."""
    names = {t.strip() for t in text.split(",")}
    return tuple(t for t in TARGETS if t in names)


def scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def in_out(name: str, shape) -> tuple[int, int]:
    """(in, out) sizes of a stacked weight [N, out..., in...]."""
    c = quantize.CONTRACTED[name]
    return math.prod(shape[len(shape) - c:]), math.prod(shape[1:len(shape) - c])


def init_factors(base: dict, targets, rank: int, seed: int) -> dict:
    """{"blocks": {part: {name: {"w_a", "w_b"}}}} for `base`'s stacked weights: A uniform in
    +-1/sqrt(in) (PEFT's kaiming-uniform default), B zero; float32."""
    out: dict = {"blocks": {}}
    key = jax.random.key(seed)
    for i, t in enumerate(targets):
        part, name = TARGETS[t]
        w = base["blocks"][part][name]
        n_in, n_out = in_out(name, w.shape)
        bound = 1.0 / math.sqrt(n_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (w.shape[0], rank, n_in), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((w.shape[0], n_out, rank), jnp.float32)
        out["blocks"].setdefault(part, {})[name] = {"w_a": a, "w_b": b}
    return out


def factor_specs(factors: dict) -> dict:
    """Logical PartitionSpecs of the factors (`factors["blocks"]`): A [layers, -, in], B
    [layers, out, -]."""
    spec = jax.sharding.PartitionSpec
    return {"blocks": {part: {name: {"w_a": spec("layers", None, AXES[name][1]),
                                     "w_b": spec("layers", AXES[name][0], None)}
                              for name in weights}
                       for part, weights in factors["blocks"].items()}}


def combine(base: dict, factors: dict, lora_scale: float) -> dict:
    """`base` with each adapted weight replaced by a LoraWeight (what the model runs on).
    Entries of `factors` beside "blocks" are whole trained params (a classifier's score head),
    added as they are."""
    blocks = {part: dict(weights) for part, weights in base["blocks"].items()}
    for part, weights in factors["blocks"].items():
        for name, f in weights.items():
            blocks[part][name] = LoraWeight(blocks[part][name], f["w_a"], f["w_b"], lora_scale)
    return {**base, **factors, "blocks": blocks}


def delta(name: str, shape, a, b, lora_scale: float):
    """scale * B A in float32, shaped like the stacked weight [N, out..., in...]."""
    return (lora_scale * jnp.einsum("nor,nri->noi", b.astype(jnp.float32),
                                    a.astype(jnp.float32))).reshape(shape)


def merge(base: dict, factors: dict, lora_scale: float, dtype=None) -> dict:
    """Plain params W + scale * B A, summed in float32 and cast to `dtype` (default: each
    weight's own); the other params are cast to `dtype` too."""
    blocks = {part: dict(weights) for part, weights in base["blocks"].items()}
    for part, weights in factors["blocks"].items():
        for name, f in weights.items():
            w = blocks[part][name]
            merged = w.astype(jnp.float32) + delta(name, w.shape, f["w_a"], f["w_b"], lora_scale)
            blocks[part][name] = merged.astype(dtype or w.dtype)
    merged = {**base, **factors, "blocks": blocks}
    return merged if dtype is None else jax.tree.map(lambda x: x.astype(dtype), merged)


def einsum(spec: str, x, w: LoraWeight, dtype, **kwargs):
    """quantize.einsum's product with the frozen base, plus the low-rank path: x A^T, then B."""
    out = quantize.einsum(spec, x, w.base, dtype, **kwargs)
    n_in = w.a.shape[-1]
    low = jax.lax.dot_general(x.reshape(-1, n_in).astype(dtype), w.a.astype(dtype),
                              (((1,), (1,)), ((), ())))
    up = jax.lax.dot_general(low, w.b.astype(dtype), (((1,), (1,)), ((), ())))
    return out + (w.scale * up).astype(out.dtype).reshape(out.shape)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))

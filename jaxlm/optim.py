"""The optimizer: learning-rate schedules, AdamW with a weight-decay mask, gradient clipping.

Schedules all start with a linear warmup, lr * (step + 1) / warmup_steps, so the first update is
not wasted on lr 0; after warmup they go from lr to lr * min_lr_ratio at the last step:
  constant  stays at lr (min_lr_ratio unused)
  cosine    half a cosine wave down
  linear    a straight line down
  wsd       warmup-stable-decay: lr until the last decay_fraction of the steps, then linear down

Weight decay applies to matrices only (`w_*` parameters), and to the embedding table when
`optim.decay_embeddings` is set; norm scales are never decayed. Gradient accumulation lives in
`train.py` (it is part of the step, not of the optimizer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import Config, OptimConfig


def schedule(cfg: OptimConfig, total_steps: int):
    """step -> learning rate (a jnp function, usable inside jit)."""
    peak, low = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = cfg.warmup_steps

    def lr_at(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum((step + 1.0) / max(warmup, 1), 1.0)
        t = jnp.clip((step - warmup) / max(total_steps - 1 - warmup, 1), 0.0, 1.0)
        match cfg.schedule:
            case "constant":
                after = jnp.full_like(t, peak)
            case "cosine":
                after = low + (peak - low) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
            case "linear":
                after = peak - (peak - low) * t
            case "wsd":
                d = cfg.decay_fraction
                after = peak - (peak - low) * jnp.clip((t - (1.0 - d)) / d, 0.0, 1.0)
            case _:
                raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: constant, cosine, "
                                 "linear, wsd")
        return jnp.where(step < warmup, warm, after)

    return lr_at


def decay_mask(params, decay_embeddings: bool):
    """True for the parameters weight decay applies to: `w_*` matrices (+ the embedding)."""

    def decays(path, _):
        name = path[-1].key
        return name.startswith("w_") or (decay_embeddings and name == "embed_VD")

    return jax.tree_util.tree_map_with_path(decays, params)


def make(cfg: Config) -> optax.GradientTransformation:
    """Clip by global norm (when optim.clip_norm > 0), then AdamW on the schedule."""
    o = cfg.optim
    adamw = optax.adamw(
        learning_rate=schedule(o, cfg.train.steps),
        b1=o.b1, b2=o.b2, eps=o.eps,
        weight_decay=o.weight_decay,
        mask=lambda params: decay_mask(params, o.decay_embeddings),
    )
    if o.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return adamw

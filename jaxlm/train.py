"""Training. For now: the loss, and a smoke run of the tiny model on a synthetic batch.

The full loop (data pipeline, checkpoints, metrics, resume) lands with the training issue; until
then `jaxlm smoke` proves the model, loss and optimizer compile and learn on this machine.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlm import model
from jaxlm.config import Config


def cross_entropy(logits_BLV, targets_BL, mask_BL=None):
    """Mean token cross-entropy in float32 over the tokens where `mask_BL` is true."""
    logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    nll_BL = -jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]
    if mask_BL is None:
        return nll_BL.mean()
    mask_BL = mask_BL.astype(jnp.float32)
    return (nll_BL * mask_BL).sum() / jnp.maximum(mask_BL.sum(), 1.0)


def smoke(cfg: Config, steps: int) -> dict:
    """AdamW steps on one fixed synthetic batch: the loss must fall (the model can memorize it)."""
    m = cfg.model
    decoder = model.init(m, seed=cfg.train.seed)
    graphdef, params = nnx.split(decoder, nnx.Param)
    tx = optax.adamw(cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    opt_state = tx.init(params)
    key = jax.random.key(cfg.train.seed)
    batch = min(cfg.train.global_batch_size, 8)
    tokens_BL = jax.random.randint(key, (batch, cfg.data.seq_len + 1), 0, m.vocab_size)

    def loss_fn(params):
        logits_BLV = nnx.merge(graphdef, params)(tokens_BL[:, :-1])
        return cross_entropy(logits_BLV, tokens_BL[:, 1:])

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
        print(f"smoke step {i + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    return {
        "smoke": True,
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "num_params": model.num_params(m),
        "seconds": round(time.perf_counter() - start, 2),
    }

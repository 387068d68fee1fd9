"""Objectives: the losses the one training loop (train.py) optimises, as sums over tokens.

Every objective returns `(objective sum, (nll sum, weight sum))` for a batch: sums, not means,
so gradient-accumulation microbatches add up to exactly the whole batch, and the loop divides
once by the total weight. The reported loss is always the plain weighted cross-entropy (the nll
sum over the weight sum), whatever else the objective adds, so runs with and without extra terms
compare. Weights come from the batch (`batch["weights"]`: 1 for a counted target), never from
the pad id: SFT marks its prompt tokens 0 there (jaxlm/sft.py).

Classification (jaxlm/classify.py) has one example per row: its batch carries `labels` and
`weights` per row ([B]) and the objective is the cross-entropy of the score head's logits, so
its "loss" is nats per example.

`for_config(cfg)` picks the objective of a run; this module imports no data or mesh code.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def cross_entropy(logits_BLV, targets_BL, mask_BL=None):
    """Mean token cross-entropy in float32 over the tokens where `mask_BL` is true."""
    nll_BL, _ = nll_and_lse(logits_BLV, targets_BL)
    if mask_BL is None:
        return nll_BL.mean()
    mask_BL = mask_BL.astype(jnp.float32)
    return (nll_BL * mask_BL).sum() / jnp.maximum(mask_BL.sum(), 1.0)


def nll_and_lse(logits_BLV, targets_BL):
    """Per-token negative log-likelihood and logsumexp, in float32."""
    logits_BLV = logits_BLV.astype(jnp.float32)
    lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return lse_BL - target_logit_BL, lse_BL


def lm_sums(graphdef, params, batch, z_loss: float = 0.0):
    """Next-token cross-entropy over the weighted targets, plus `z_loss` x logsumexp^2 (which
    keeps the output layer's logits from drifting; PaLM)."""
    logits_BLV = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    nll_BL, lse_BL = nll_and_lse(logits_BLV, batch["targets"])
    w_BL = batch["weights"]
    nll_sum = (nll_BL * w_BL).sum()
    objective = nll_sum + z_loss * (jnp.square(lse_BL) * w_BL).sum()
    return objective, (nll_sum, w_BL.sum())


def class_logits(graphdef, params, batch):
    """float32 [B, C] logits of a classification batch (model.Decoder.classify)."""
    return nnx.merge(graphdef, params).classify(batch["inputs"], batch["segment_ids"],
                                                batch["positions"])


def classify_sums(graphdef, params, batch):
    """Cross-entropy of each row's label under the score head, summed over weighted rows."""
    nll_B, _ = nll_and_lse(class_logits(graphdef, params, batch), batch["labels"])
    nll_sum = (nll_B * batch["weights"]).sum()
    return nll_sum, (nll_sum, batch["weights"].sum())


def for_config(cfg):
    """(graphdef, params, batch) -> (objective sum, (nll sum, weight sum)) for the run `cfg`."""
    if cfg.model.num_labels:
        return classify_sums
    return functools.partial(lm_sums, z_loss=cfg.optim.z_loss)

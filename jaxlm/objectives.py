"""Objectives: the losses the one training loop (train.py) optimises, as sums over tokens.

Every objective returns `(objective sum, (nll sum, weight sum))` for a batch: sums, not means,
so gradient-accumulation microbatches add up to exactly the whole batch, and the loop divides
once by the total weight. The reported loss is always the plain weighted cross-entropy (the nll
sum over the weight sum), whatever else the objective adds, so runs with and without extra terms
compare. Weights come from the batch (`batch["weights"]`: 1 for a counted target), never from
the pad id: SFT marks its prompt tokens 0 there (jaxlm/sft.py).

Two switches weight the LM cross-entropy by difficulty (`loss.*`; off, the objective is the plain
one, the same program bit for bit):

- `loss.focal_gamma` = gamma: each token's cross-entropy times (1 - p)^gamma, p the model's
  probability of the target (the softmax focal loss of Lin et al., 2017, at the token level:
  confident tokens count less, gradient through both factors);
- `loss.sequence_weighting=mean_loss`: each packed document (a segment of a row) weighted by its
  difficulty, its mean token loss d under stop_gradient: w = min((d / mean d)^beta, cap), then
  normalised so the weights average 1 over the microbatch's weighted tokens, so the objective
  keeps the scale of the plain one (`loss.sequence_beta`, `loss.sequence_cap`).

Distillation (`distill.teacher`, temperature T, `distill.alpha` a): the objective is
a * T^2 * KL(teacher_T || student_T) + (1 - a) * cross-entropy, summed over the same weighted
tokens, the teacher's logits computed in the same step under stop_gradient (train.py keeps its
params in the state's frozen part).

The attention-entropy regulariser (`loss.attention_entropy` = lambda) adds lambda times the mean,
over layers, heads and real query positions, of the entropy of each query's attention
distribution (within its segment, causal): lambda > 0 pushes the attention to concentrate,
lambda < 0 to spread. The `xla` kernel computes the entropies block by block from the same scores
as its output, under its checkpoint, so nothing of size [L, S] is kept for the backward pass
(jaxlm/attention.py). The mean is the microbatch's; with gradient accumulation each microbatch's
mean counts by its target weight. The objectives then return a third aux element, the
entropies' (sum, count), which the loop logs as the metric `attention_entropy`.

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


def _forward(graphdef, params, batch, attention_entropy: float, classify: bool = False):
    """(logits, attention entropy (sum, count) or None) of the model on the batch."""
    model = nnx.merge(graphdef, params)
    fn = model.classify if classify else model
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    if not attention_entropy:
        return fn(*args), None
    return fn(*args, attention_entropy=True)


def _with_entropy(objective, aux, entropy, weight: float, w_sum):
    """The objective plus `weight` x the mean attention entropy x the weight sum (so that,
    divided by the weight sum as the loop does, it adds weight x the mean), and the entropy's
    (sum, count) as a third aux element; unchanged when `entropy` is None."""
    if entropy is None:
        return objective, aux
    entropy_sum, count = entropy
    mean = entropy_sum / jnp.maximum(count, 1.0)
    return objective + weight * w_sum * mean, (*aux, (entropy_sum, count))


def lm_sums(graphdef, params, batch, z_loss: float = 0.0, focal_gamma: float = 0.0,
            sequence: tuple[float, float] | None = None, attention_entropy: float = 0.0):
    """Next-token cross-entropy over the weighted targets, plus `z_loss` x logsumexp^2 (which
    keeps the output layer's logits from drifting; PaLM). `focal_gamma` and `sequence` (beta,
    cap) turn on the difficulty weightings, `attention_entropy` the attention-entropy term, of
    the module docstring."""
    logits_BLV, entropy = _forward(graphdef, params, batch, attention_entropy)
    nll_BL, lse_BL = nll_and_lse(logits_BLV, batch["targets"])
    w_BL = batch["weights"]
    nll_sum = (nll_BL * w_BL).sum()
    if not focal_gamma and sequence is None:
        objective = nll_sum
    else:
        term_BL = nll_BL if not focal_gamma else nll_BL * focal_factor(nll_BL, focal_gamma)
        scale_BL = w_BL if sequence is None else w_BL * sequence_weights(
            nll_BL, w_BL, batch["segment_ids"], *sequence)
        objective = (term_BL * scale_BL).sum()
    objective = objective + z_loss * (jnp.square(lse_BL) * w_BL).sum()
    return _with_entropy(objective, (nll_sum, w_BL.sum()), entropy, attention_entropy, w_BL.sum())


def focal_factor(nll_BL, gamma: float):
    """(1 - p)^gamma with p = exp(-nll), the target's probability (clamped at 0 against rounding)."""
    return jnp.maximum(-jnp.expm1(-nll_BL), 0.0) ** gamma


def sequence_weights(nll_BL, w_BL, segment_ids_BL, beta: float, cap: float):
    """Per-token weights [B, L], constant over each (row, segment): the document's relative
    difficulty (its mean weighted nll over the batch's mean, to the power beta, capped), scaled
    so that they average 1 over the weighted tokens. No gradient flows through them."""
    nll_BL = jax.lax.stop_gradient(nll_BL)
    L = nll_BL.shape[1]

    def per_row(nll_L, w_L, seg_L):
        total = jax.ops.segment_sum(nll_L * w_L, seg_L, num_segments=L + 1)
        count = jax.ops.segment_sum(w_L, seg_L, num_segments=L + 1)
        return (total / jnp.maximum(count, 1e-9))[seg_L]

    difficulty_BL = jax.vmap(per_row)(nll_BL, w_BL, segment_ids_BL)
    tokens = jnp.maximum(w_BL.sum(), 1e-9)
    mean = (difficulty_BL * w_BL).sum() / tokens
    relative_BL = jnp.minimum((difficulty_BL / jnp.maximum(mean, 1e-9)) ** beta, cap)
    norm = (relative_BL * w_BL).sum() / tokens
    return jax.lax.stop_gradient(relative_BL / jnp.maximum(norm, 1e-9))


def distill_sums(graphdef, params, batch, teacher_params, *, teacher_graphdef,
                 temperature: float, alpha: float, z_loss: float = 0.0,
                 attention_entropy: float = 0.0):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy (+ z-loss, + the
    student's attention-entropy term), summed over the weighted targets; the reported nll is
    the plain cross-entropy."""
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    logits_BLV, entropy = _forward(graphdef, params, batch, attention_entropy)
    teacher_BLV = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher_params)(*args))
    nll_BL, lse_BL = nll_and_lse(logits_BLV, batch["targets"])
    w_BL = batch["weights"]
    nll_sum = (nll_BL * w_BL).sum()
    log_q_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32) / temperature, axis=-1)
    log_p_BLV = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / temperature, axis=-1)
    kl_BL = (jnp.exp(log_p_BLV) * (log_p_BLV - log_q_BLV)).sum(-1)
    objective = (alpha * temperature**2 * (kl_BL * w_BL).sum() + (1.0 - alpha) * nll_sum
                 + z_loss * (jnp.square(lse_BL) * w_BL).sum())
    return _with_entropy(objective, (nll_sum, w_BL.sum()), entropy, attention_entropy, w_BL.sum())


def class_logits(graphdef, params, batch):
    """float32 [B, C] logits of a classification batch (model.Decoder.classify)."""
    return nnx.merge(graphdef, params).classify(batch["inputs"], batch["segment_ids"],
                                                batch["positions"])


def classify_sums(graphdef, params, batch, attention_entropy: float = 0.0):
    """Cross-entropy of each row's label under the score head, summed over weighted rows (+ the
    attention-entropy term)."""
    logits_BC, entropy = _forward(graphdef, params, batch, attention_entropy, classify=True)
    nll_B, _ = nll_and_lse(logits_BC, batch["labels"])
    w_sum = batch["weights"].sum()
    nll_sum = (nll_B * batch["weights"]).sum()
    return _with_entropy(nll_sum, (nll_sum, w_sum), entropy, attention_entropy, w_sum)


def for_config(cfg, teacher_graphdef=None):
    """(graphdef, params, batch) -> (objective sum, (nll sum, weight sum)) for the run `cfg`;
    with `teacher_graphdef` (distillation with alpha > 0), a fourth argument: the teacher's params."""
    entropy = cfg.loss.attention_entropy
    if cfg.model.num_labels:
        return functools.partial(classify_sums, attention_entropy=entropy)
    if teacher_graphdef is not None:
        return functools.partial(distill_sums, teacher_graphdef=teacher_graphdef,
                                 temperature=cfg.distill.temperature, alpha=cfg.distill.alpha,
                                 z_loss=cfg.optim.z_loss, attention_entropy=entropy)
    sequence = ((cfg.loss.sequence_beta, cfg.loss.sequence_cap)
                if cfg.loss.sequence_weighting == "mean_loss" else None)
    return functools.partial(lm_sums, z_loss=cfg.optim.z_loss, focal_gamma=cfg.loss.focal_gamma,
                             sequence=sequence, attention_entropy=entropy)

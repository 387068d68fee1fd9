"""Difficulty-weighted LM objectives (loss.focal_gamma, loss.sequence_weighting): off they are
the plain program bit for bit; on, loss and gradients equal a hand computation; the reported
loss stays the plain cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import config, model, objectives
from jaxlm.config import ConfigError


def setup(**loss):
    cfg = config.from_dict({
        "model": {"vocab_size": 61, "d_model": 16, "num_layers": 1, "num_heads": 2,
                  "num_kv_heads": 1, "mlp_dim": 32, "max_seq_len": 16},
        "data": {"seq_len": 12}, "loss": loss})
    graphdef, params = nnx.split(model.init(cfg.model, seed=3), nnx.Param)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 61, (2, 13)).astype(np.int32)
    # Row 0: documents 1 (6 tokens) and 2 (4) then padding; row 1: one document, one masked target.
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 12], np.int32)
    positions = np.array([list(range(6)) + list(range(4)) + [0, 0], list(range(12))], np.int32)
    weights = (segments > 0).astype(np.float32)
    weights[0, 5] = weights[0, 9] = 0.0  # a document's last input predicts no target of it
    weights[1, 3] = 0.0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
             "positions": positions, "weights": weights}
    return cfg, graphdef, nnx.to_pure_dict(params), batch


def reference(graphdef, params, batch, gamma=0.0, beta=None, cap=None):
    """The objective written out with probabilities, documents found by hand."""
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.take_along_axis(probs, batch["targets"][..., None], axis=-1)[..., 0]
    nll = -jnp.log(p)
    w = batch["weights"]
    term = nll * (1 - p) ** gamma
    if beta is not None:
        d = np.zeros(w.shape, np.float32)
        n = np.asarray(jax.lax.stop_gradient(nll))
        for row in range(w.shape[0]):
            for seg in set(batch["segment_ids"][row]) - {0}:
                at = batch["segment_ids"][row] == seg
                d[row, at] = (n[row] * w[row])[at].sum() / w[row][at].sum()
        mean = (d * w).sum() / w.sum()
        rel = np.minimum((d / mean) ** beta, cap)
        rel = rel / ((rel * w).sum() / w.sum())
        w = w * rel
    return (term * w).sum()


def test_off_is_the_plain_objective_bit_for_bit():
    cfg, graphdef, params, batch = setup()
    plain = jax.jit(jax.value_and_grad(
        lambda p: objectives.lm_sums(graphdef, p, batch)[0]))(params)
    switched = jax.jit(jax.value_and_grad(
        lambda p: objectives.for_config(cfg)(graphdef, p, batch)[0]))(params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(switched), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", [{"focal_gamma": 2.0}, {"focal_gamma": 0.5},
                                  {"sequence_weighting": "mean_loss", "sequence_beta": 2.0},
                                  {"sequence_weighting": "mean_loss", "sequence_beta": 3.0,
                                   "sequence_cap": 1.2},
                                  {"focal_gamma": 1.0, "sequence_weighting": "mean_loss"}])
def test_weighted_objective_and_gradient_equal_a_hand_computation(loss):
    cfg, graphdef, params, batch = setup(**loss)
    objective = objectives.for_config(cfg)
    (got, (nll_sum, weight)), grads = jax.value_and_grad(
        lambda p: objective(graphdef, p, batch), has_aux=True)(params)
    seq = cfg.loss.sequence_weighting == "mean_loss"
    ref = lambda p: reference(graphdef, p, batch, cfg.loss.focal_gamma,  # noqa: E731
                              cfg.loss.sequence_beta if seq else None, cfg.loss.sequence_cap)
    want, want_grads = jax.value_and_grad(ref)(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The reported loss is the plain cross-entropy whatever the weighting.
    _, (plain_sum, plain_weight) = objectives.lm_sums(graphdef, params, batch)
    assert float(nll_sum) == float(plain_sum) and float(weight) == float(plain_weight)
    # The weighting did act (a random model finds its documents about equally hard, so the
    # sequence weights stay near 1: a small but real change).
    assert float(got) != pytest.approx(float(plain_sum), rel=1e-6)


def test_sequence_weights_average_one_and_respect_the_cap():
    _, graphdef, params, batch = setup()
    logits = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    nll, _ = objectives.nll_and_lse(logits, batch["targets"])
    w = batch["weights"]
    for beta, cap in ((1.0, 4.0), (4.0, 1.1)):
        weights = np.asarray(objectives.sequence_weights(nll, w, batch["segment_ids"], beta, cap))
        assert (weights * w).sum() / w.sum() == pytest.approx(1.0, abs=1e-6)
        for row, seg in ((0, 1), (0, 2), (1, 1)):  # constant over a document
            at = (batch["segment_ids"][row] == seg) & (w[row] > 0)
            assert np.ptp(weights[row][at]) < 1e-6
    with pytest.raises(ConfigError, match="sequence_weighting' is 'hard'; valid choices: \"\", mean_loss"):
        config.from_dict({"loss": {"sequence_weighting": "hard"}})
    with pytest.raises(ConfigError, match="'loss.sequence_cap' must be >= 1"):
        config.from_dict({"loss": {"sequence_cap": 0.5}})

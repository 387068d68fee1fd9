"""Optimizer: schedule values, the weight-decay mask, accumulation equal to the big batch,
and a model that can memorize one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config, metrics, model, optim, train


def optim_cfg(**kw):
    base = {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1, "decay_fraction": 0.2}
    base.update(kw)
    return config.from_dict({"optim": base}).optim


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # step:          0     4    9    10   55    100   (total 101 steps: the last is 100)
        ("constant", [0.1, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.1, 0.5, 1.0, 1.0, 0.55, 0.1]),
        ("linear", [0.1, 0.5, 1.0, 1.0, 0.55, 0.1]),
        ("wsd", [0.1, 0.5, 1.0, 1.0, 1.0, 0.1]),
    ],
)
def test_schedule_values(schedule, expected):
    lr_at = optim.schedule(optim_cfg(schedule=schedule), total_steps=101)
    got = [float(lr_at(s)) for s in (0, 4, 9, 10, 55, 100)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_wsd_decays_only_in_its_last_fraction():
    lr_at = optim.schedule(optim_cfg(schedule="wsd"), total_steps=101)
    assert float(lr_at(80)) == 1.0  # t = 70/90 < 0.8: still stable
    assert 0.1 < float(lr_at(95)) < 1.0  # inside the final 20%


def test_decay_mask(tiny_cfg):
    params = jax.tree.map(jnp.zeros_like, _params(tiny_cfg))
    for decay_embeddings in (False, True):
        mask = optim.decay_mask(params, decay_embeddings)
        assert mask["embed_VD"] is decay_embeddings
        assert mask["final_norm"]["scale_D"] is False
        assert mask["blocks"]["attn_norm"]["scale_D"] is False
        assert mask["blocks"]["attn"]["w_q_HKD"] is True
        assert mask["blocks"]["mlp"]["w_down_DF"] is True


def test_weight_decay_leaves_norms_alone(tiny_cfg):
    """With zero gradients, AdamW's update is pure decay: norms and embedding must not move."""
    cfg = tiny_cfg.replace(optim={"weight_decay": 0.5, "lr": 0.1, "warmup_steps": 0, "clip_norm": 0.0})
    tx = optim.make(cfg)
    params = _params(cfg)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.asarray(updates["final_norm"]["scale_D"]) == 0)
    assert np.all(np.asarray(updates["embed_VD"]) == 0)
    assert np.any(np.asarray(updates["blocks"]["mlp"]["w_up_FD"]) != 0)


def _params(cfg):
    from flax import nnx

    _, state = nnx.split(model.init(cfg.model), nnx.Param)
    return nnx.to_pure_dict(state)


def _batch(cfg, rows, seed=0, seq=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, cfg.model.vocab_size, (rows, seq + 1), dtype=np.int32)
    weights = np.ones((rows, seq), np.float32)
    weights[1, 5:] = 0.0  # uneven weights: accumulation must weigh tokens, not microbatches
    segments = np.ones((rows, seq), np.int32)
    segments[0, 9:] = 2
    positions = np.tile(np.arange(seq, dtype=np.int32), (rows, 1))
    positions[0, 9:] -= 9
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions, "weights": weights}


def _one_step(cfg, batch):
    tx = optim.make(cfg)
    graphdef, abstract, _ = train.abstract_state(cfg, tx)
    state = train.TrainState(jnp.zeros((), jnp.int32), _params(cfg), tx.init(_params(cfg)))
    step = jax.jit(train.make_train_step(cfg, graphdef, tx))
    return step(state, batch)


def test_accumulation_equals_big_batch(tiny_cfg):
    cfg = tiny_cfg.replace(train={"global_batch_size": 8}, optim={"warmup_steps": 0})
    batch = _batch(cfg, 8)
    state1, out1 = _one_step(cfg, batch)
    state4, out4 = _one_step(cfg.replace(optim={"grad_accum_steps": 4}), batch)
    np.testing.assert_allclose(out1["loss"], out4["loss"], rtol=1e-6)
    np.testing.assert_allclose(out1["grad_norm"], out4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state4.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(state4.step) == 1


def test_z_loss_changes_gradients_not_reported_loss(tiny_cfg):
    cfg = tiny_cfg.replace(optim={"warmup_steps": 0})
    batch = _batch(cfg, 4)
    plain, out_plain = _one_step(cfg, batch)
    zl, out_z = _one_step(cfg.replace(optim={"z_loss": 1e-2}), batch)
    np.testing.assert_allclose(out_plain["loss"], out_z["loss"], rtol=1e-6)
    assert float(out_plain["grad_norm"]) != float(out_z["grad_norm"])


def test_overfits_one_batch(tiny_cfg):
    cfg = tiny_cfg.replace(optim={"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
                                  "weight_decay": 0.0}, train={"steps": 150})
    batch = _batch(cfg, 4, seq=16)
    batch["weights"][:] = 1.0
    tx = optim.make(cfg)
    graphdef, _, _ = train.abstract_state(cfg, tx)
    params = _params(cfg)
    state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    step = jax.jit(train.make_train_step(cfg, graphdef, tx), donate_argnums=0)
    first = None
    for _ in range(150):
        state, out = step(state, batch)
        first = first if first is not None else float(out["loss"])
    assert first > 4.0 and float(out["loss"]) < 0.05


def test_flops_per_token_formula():
    cfg = config.from_dict({"model": {"vocab_size": 100, "d_model": 8, "num_layers": 2,
                                      "num_heads": 2, "num_kv_heads": 1, "mlp_dim": 16}}).model
    block = 2 * (8 * 2 * 4 + 2 * 8 * 1 * 4 + 2 * 4 * 8 + 3 * 8 * 16)
    expected = 6 * (block + 8 * 100) + 6 * 2 * 32 * 2 * 4
    assert metrics.flops_per_token(cfg, 32) == expected

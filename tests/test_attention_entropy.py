"""The attention-entropy regulariser (loss.attention_entropy): the xla kernel's blockwise
entropies and their gradients equal those of the reference probabilities, under every remat
policy, scanned and unrolled, sharded and not; lambda = 0 is the plain step bit for bit; the
objective adds exactly lambda x the mean; the train step logs the mean; other kernels and
pipeline stages refuse in one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import attention, config, model, objectives, sharding, train
from jaxlm.config import ConfigError


def reference_entropy_BHL(q, k, seg):
    """-sum p log p of the reference path's probabilities (0 log 0 = 0), [B, H, L]."""
    p = attention.probabilities(q, k, seg)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


def qkv(L=160, B=2, H=4, G=2, K=8, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, L, H, K).astype(np.float32)) * 2
    k = jnp.asarray(rng.randn(B, L, G, K).astype(np.float32)) * 2
    v = jnp.asarray(rng.randn(B, L, G, K).astype(np.float32))
    # Row 0: three documents and padding (0); row 1: one document. L > BLOCK: two query blocks.
    seg = np.ones((B, L), np.int32)
    seg[0, 40:130], seg[0, 130:150], seg[0, 150:] = 2, 3, 0
    return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("per_head,segments", [(True, True), (False, True), (True, False)],
                         ids=["per_head", "batched", "no_segments"])
def test_blockwise_entropy_and_gradient_equal_the_reference(per_head, segments):
    q, k, v, seg = qkv()
    seg = seg if segments else None
    weights_BLH = jnp.asarray(np.random.RandomState(1).rand(*q.shape[:3]).astype(np.float32))

    def kernel(q, k):
        out, ent_BLH = attention._blockwise_one_shard(q, k, v, seg, per_head, entropy=True)
        return (ent_BLH * weights_BLH).sum(), (out, ent_BLH)

    def reference(q, k):
        ent_BLH = reference_entropy_BHL(q, k, seg).transpose(0, 2, 1)
        return (ent_BLH * weights_BLH).sum(), ent_BLH

    (_, (out, ent)), grads = jax.jit(jax.value_and_grad(kernel, (0, 1), has_aux=True))(q, k)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(reference, (0, 1), has_aux=True))(q, k)
    # The kernel's logsumexp(s) - sum(p s) loses about max|s| * 2**-23 to cancellation where the
    # entropy is small; 1e-5 was crossed by 1.2e-5 (1.8e-5 in its gradient) on some hosts.
    np.testing.assert_allclose(ent, ref, atol=3e-5)
    assert float(ent.max()) > 1.0  # real distributions, not one-hot: the check can fail
    np.testing.assert_allclose(out, attention.reference_attention(q, k, v, seg), atol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):  # the same cancellation, differentiated
        np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
    # The output is what the kernel gives without the entropy.
    plain = jax.jit(attention._blockwise_one_shard, static_argnums=4)(q, k, v, seg, per_head)
    np.testing.assert_allclose(out, plain, atol=1e-6)


def small_cfg(**over):
    base = {"model": {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4,
                      "num_kv_heads": 2, "mlp_dim": 32, "max_seq_len": 16},
            "data": {"seq_len": 12}, "loss": {"attention_entropy": 0.3}}
    for key, value in over.items():
        base.setdefault(key, {}).update(value)
    return config.from_dict(base)


def batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 61, (2, 13)).astype(np.int32)
    segments = np.array([[1] * 6 + [2] * 4 + [0] * 2, [1] * 12], np.int32)
    positions = np.array([list(range(6)) + list(range(4)) + [0, 0], list(range(12))], np.int32)
    weights = (segments > 0).astype(np.float32)
    weights[0, 5] = weights[0, 9] = 0.0
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions, "weights": weights}


def reference_mean_entropy(graphdef, params, b):
    """The mean over layers, heads and real queries, from the reference maps (attention_maps)."""
    maps_NBHLS = nnx.merge(graphdef, params).attention_maps(b["inputs"], b["segment_ids"],
                                                            b["positions"])
    p = maps_NBHLS
    ent_NBHL = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    real_BL = jnp.asarray(b["segment_ids"] != 0, jnp.float32)
    return (ent_NBHL * real_BL[None, :, None]).sum() / (ent_NBHL.shape[0] * ent_NBHL.shape[2]
                                                        * real_BL.sum())


@pytest.mark.parametrize("remat,scan", [("none", True), ("full", False), ("save_dots", True),
                                        ("save_attn", False), ("save_dots", False)])
def test_objective_adds_lambda_times_the_mean_entropy(remat, scan):
    lam = 0.3
    cfg = small_cfg(model={"remat": remat, "scan_layers": scan})
    graphdef, params = nnx.split(model.init(cfg.model, seed=3), nnx.Param)
    params = nnx.to_pure_dict(params)
    b = batch()
    objective = objectives.for_config(cfg)

    def reference(p):
        plain, (nll, w) = objectives.lm_sums(graphdef, p, b)
        return plain + lam * w * reference_mean_entropy(graphdef, p, b)

    (value, aux), grads = jax.jit(jax.value_and_grad(
        lambda p: objective(graphdef, p, b), has_aux=True))(params)
    want, want_grads = jax.jit(jax.value_and_grad(reference))(params)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5),
                 grads, want_grads)
    nll, w, (entropy_sum, count) = aux
    np.testing.assert_allclose(entropy_sum / count, reference_mean_entropy(graphdef, params, b),
                               rtol=1e-5)
    assert count == 2 * 4 * 22  # layers x heads x real queries
    # The reported loss is still the plain cross-entropy.
    np.testing.assert_allclose(nll, objectives.lm_sums(graphdef, params, b)[1][0], rtol=1e-6)


def test_negative_lambda_spreads_and_positive_concentrates():
    """One SGD step on lambda x entropy alone moves the mean entropy the way its sign says."""
    cfg = small_cfg()
    graphdef, params = nnx.split(model.init(cfg.model, seed=3), nnx.Param)
    params = nnx.to_pure_dict(params)
    b = batch()
    start = float(reference_mean_entropy(graphdef, params, b))
    for lam, moves in ((1.0, -1), (-1.0, 1)):
        def term(p, lam=lam):
            objective, aux = objectives.lm_sums(graphdef, p, b, attention_entropy=lam)
            return objective - aux[0]  # the entropy term only
        grads = jax.jit(jax.grad(term))(params)
        stepped = jax.tree.map(lambda p, g: p - 5.0 * g, params, grads)
        after = float(reference_mean_entropy(graphdef, stepped, b))
        assert np.sign(after - start) == moves, (lam, start, after)


def one_step(cfg, mesh_keys, devices):
    """(params, metrics) after one train step from the seed on 8 rows (4 copies of `batch()`)."""
    cfg = cfg.replace(mesh=mesh_keys, train={"global_batch_size": 8})
    mesh, tx, graphdef, abstract, shardings = train._setup(cfg, devices)
    rules = sharding.rules_for(cfg.mesh)
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        state = train.init_state(cfg, tx, shardings)
        bs = sharding.batch_sharding(mesh, rules)
        step = train.jit_train_step(cfg, graphdef, tx, shardings, bs)
        rows = {k: np.concatenate([v] * 4) for k, v in batch().items()}
        state, metrics = step(state, {k: jax.device_put(v, bs) for k, v in rows.items()})
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.slow
def test_train_step_lambda_zero_is_plain_and_sharded_equals_one_device():
    one = jax.devices()[:1]
    plain_cfg = small_cfg(loss={"attention_entropy": 0.0}, optim={"grad_accum_steps": 2})
    plain = config.from_dict({**plain_cfg.to_dict(), "loss": {}})
    p_zero, m_zero = one_step(plain_cfg, {"data": 1}, one)
    p_plain, m_plain = one_step(plain, {"data": 1}, one)
    jax.tree.map(np.testing.assert_array_equal, p_zero, p_plain)
    assert "attention_entropy" not in m_zero and m_zero["loss"] == m_plain["loss"]

    on = small_cfg(optim={"grad_accum_steps": 2})
    p_one, m_one = one_step(on, {"data": 1}, one)
    p_mesh, m_mesh = one_step(on, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
    graphdef, params = nnx.split(model.init(on.model, seed=on.train.seed), nnx.Param)
    want = reference_mean_entropy(graphdef, nnx.to_pure_dict(params), batch())
    # Every microbatch holds copies of the same rows, so the logged mean is the batch's.
    np.testing.assert_allclose(m_one["attention_entropy"], want, rtol=1e-5)
    np.testing.assert_allclose(m_mesh["attention_entropy"], want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_mesh, p_one)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, p_one, p_zero)))


def test_classifier_objective_takes_the_term():
    cfg = small_cfg(model={"num_labels": 3})
    graphdef, params = nnx.split(model.init(cfg.model, seed=3), nnx.Param)
    params = nnx.to_pure_dict(params)
    b = {**batch(), "labels": np.array([0, 2], np.int32), "weights": np.ones(2, np.float32)}
    value, (nll, w, (entropy_sum, count)) = objectives.for_config(cfg)(graphdef, params, b)
    np.testing.assert_allclose(value, nll + 0.3 * w * entropy_sum / count, rtol=1e-6)
    np.testing.assert_allclose(entropy_sum / count, reference_mean_entropy(graphdef, params, b),
                               rtol=1e-5)


def test_other_kernels_and_pipeline_stages_refuse_in_one_line():
    for kernel in ("cudnn", "splash"):
        with pytest.raises(ConfigError, match="'loss.attention_entropy' needs the 'xla'"):
            small_cfg(model={"attention": kernel})
    with pytest.raises(ConfigError, match="not supported with pipeline stages"):
        small_cfg(mesh={"stage": 2})
    # `auto` resolves at trace time: a kernel other than xla refuses there.
    q, k, v, seg = qkv(L=16)
    with attention.interpret_kernels(), pytest.raises(ConfigError, match="resolves to 'splash'"):
        attention.attention(q, k, v, seg, implementation="splash", entropy=True)

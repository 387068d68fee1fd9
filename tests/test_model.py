"""Properties of the decoder: shapes and dtypes, causality, segment isolation, scan/loop and
remat equivalence, logical axis names, and sharding constraints that leave values unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from jaxlm import config, model, objectives, sharding

B, L = 2, 12
VOCABULARY = {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers"}


def tokens(cfg, seed=0, shape=(B, L)):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.model.vocab_size)


def split(cfg, seed=0):
    return nnx.split(model.init(cfg.model, seed), nnx.Param)


def logits_and_grads(cfg, params, graphdef, toks):
    def loss(p):
        logits = nnx.merge(graphdef, p)(toks[:, :-1])
        return objectives.cross_entropy(logits, toks[:, 1:]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


def assert_trees_close(a, b, atol, rtol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                   atol=atol, rtol=rtol)


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("remat", config.REMAT_POLICIES)
def test_shapes_dtypes_finite(tiny_cfg, scan, remat):
    cfg = tiny_cfg.replace(model={"scan_layers": scan, "remat": remat})
    graphdef, params = split(cfg)
    loss, logits, grads = logits_and_grads(cfg, params, graphdef, tokens(cfg, shape=(B, L + 1)))
    assert logits.shape == (B, L, cfg.model.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    # Random init: the loss starts near log(vocab).
    assert abs(float(loss) - np.log(cfg.model.vocab_size)) < 0.5


def test_bf16_compute_f32_params(tiny_cfg):
    cfg32 = tiny_cfg
    cfg16 = tiny_cfg.replace(model={"dtype": "bfloat16"})
    graphdef16, params = split(cfg16)
    graphdef32, _ = split(cfg32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    toks = tokens(cfg16)
    out16 = nnx.merge(graphdef16, params)(toks)
    out32 = nnx.merge(graphdef32, params)(toks)
    assert out16.dtype == jnp.float32  # logits stay float32 under bf16 compute
    assert not np.array_equal(np.asarray(out16), np.asarray(out32))  # bf16 really was used
    np.testing.assert_allclose(out16, out32, atol=0.05)


def test_bf16_params(tiny_cfg):
    cfg = tiny_cfg.replace(model={"param_dtype": "bfloat16", "dtype": "bfloat16"})
    graphdef, params = split(cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert nnx.merge(graphdef, params)(tokens(cfg)).dtype == jnp.float32


def test_causality_through_gradients(tiny_cfg):
    """d logits[t] / d embeddings[s] is exactly zero for every s > t."""
    graphdef, params = split(tiny_cfg)
    decoder = nnx.merge(graphdef, params)
    x_BLD = decoder.embed(tokens(tiny_cfg))
    for t in (0, 5, L - 2):
        grad = jax.grad(lambda x, t=t: decoder.from_embeddings(x)[:, t].sum())(x_BLD)
        grad_norm_L = np.abs(np.asarray(grad)).sum(axis=(0, 2))
        assert np.all(grad_norm_L[t + 1:] == 0.0), f"position {t} sees the future"
        assert np.all(grad_norm_L[: t + 1] > 0.0), f"position {t} ignores its past"


def test_segment_isolation(tiny_cfg):
    """A packed row of two documents gives each document the logits it has alone."""
    graphdef, params = split(tiny_cfg)
    decoder = nnx.merge(graphdef, params)
    doc_a, doc_b = tokens(tiny_cfg, 1, (1, 5)), tokens(tiny_cfg, 2, (1, 7))
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    out = decoder(packed, segment_ids, positions)
    np.testing.assert_allclose(out[:, :5], decoder(doc_a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], decoder(doc_b), atol=1e-5)
    # Without segment ids the second document would see the first: the test can fail.
    leaky = decoder(packed, None, positions)
    assert np.abs(np.asarray(leaky[:, 5:] - decoder(doc_b))).max() > 1e-3


def test_positions_default_to_arange(tiny_cfg):
    graphdef, params = split(tiny_cfg)
    decoder = nnx.merge(graphdef, params)
    toks = tokens(tiny_cfg)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    np.testing.assert_array_equal(decoder(toks), decoder(toks, None, pos))
    # RoPE is relative: a uniform shift changes nothing, a restart mid-row does.
    np.testing.assert_allclose(decoder(toks), decoder(toks, None, pos + 3), atol=1e-5)
    restarted = jnp.where(pos < 6, pos, pos - 6)
    assert np.abs(np.asarray(decoder(toks) - decoder(toks, None, restarted))).max() > 1e-4


def test_scan_equals_loop(tiny_cfg):
    scanned = tiny_cfg.replace(model={"scan_layers": True})
    looped = tiny_cfg.replace(model={"scan_layers": False})
    graphdef_s, params = split(scanned)
    graphdef_l, params_l = split(looped)
    # One parameter layout for both: the looped model's init has the same tree and shapes.
    assert jax.tree.structure(params) == jax.tree.structure(params_l)
    toks = tokens(tiny_cfg, shape=(B, L + 1))
    loss_s, logits_s, grads_s = logits_and_grads(scanned, params, graphdef_s, toks)
    loss_l, logits_l, grads_l = logits_and_grads(looped, params, graphdef_l, toks)
    np.testing.assert_allclose(logits_s, logits_l, atol=1e-5)
    assert_trees_close(grads_s, grads_l, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_attn"])
def test_remat_equals_none(tiny_cfg, remat):
    base = tiny_cfg.replace(model={"remat": "none"})
    other = tiny_cfg.replace(model={"remat": remat})
    graphdef_n, params = split(base)
    graphdef_r, _ = split(other)
    toks = tokens(tiny_cfg, shape=(B, L + 1))
    loss_n, logits_n, grads_n = logits_and_grads(base, params, graphdef_n, toks)
    loss_r, logits_r, grads_r = logits_and_grads(other, params, graphdef_r, toks)
    np.testing.assert_allclose(loss_n, loss_r, rtol=1e-6)
    assert_trees_close(grads_n, grads_r, atol=1e-6)


def test_remat_policy_changes_the_backward(tiny_cfg):
    """The policies really differ: full remat recomputes matmuls that `none` keeps."""

    def count_dots(remat):
        cfg = tiny_cfg.replace(model={"remat": remat})
        graphdef, params = split(cfg)
        toks = tokens(cfg, shape=(B, L + 1))

        def loss(p):
            return objectives.cross_entropy(nnx.merge(graphdef, p)(toks[:, :-1]), toks[:, 1:])

        return str(jax.make_jaxpr(jax.grad(loss))(params)).count("dot_general")

    # (save_dots vs none is not compared: the attention kernel's own per-head checkpoint already
    # recomputes its two matmuls under every policy, which blurs a count of the jaxpr's text.)
    full = count_dots("full")
    assert full > count_dots("save_dots") and full > count_dots("none")


def test_every_param_has_logical_names(tiny_cfg):
    for untied in (True, False):
        cfg = tiny_cfg.replace(model={"tie_embeddings": not untied})
        state = nnx.state(model.abstract(cfg.model), nnx.Param)
        for path, var in nnx.to_flat_state(state):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == len(var.shape), path
            assert set(names) <= VOCABULARY, (path, names)
            if path[0] == "blocks":
                assert names[0] == "layers", path


def test_model_file_names_no_mesh_axis():
    import inspect

    source = inspect.getsource(model)
    for axis in sharding.MESH_AXES:
        assert f'"{axis}"' not in source, f"model.py names mesh axis {axis!r}"


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((2, 3, 4))
    assert sharding.constrain(x, ("batch", "length", "embed")) is x
    with sharding.logical_rules():
        assert sharding.constrain(x, ("batch", "length", "embed")) is x


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = (("batch", ("data", "fsdp")), ("embed", ("fsdp",)), ("mlp", ("tensor",)))
    spec = sharding.logical_to_spec(("batch", "length", "embed"), rules)
    assert spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )


def test_sharded_forward_equals_unsharded(tiny_cfg):
    """With a 2x2x2 mesh and the default rules, activation constraints change placement only."""
    cfg = tiny_cfg.replace(model={"num_heads": 4, "num_kv_heads": 2})
    graphdef, params = split(cfg)
    toks = tokens(cfg, shape=(4, L))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    expected = forward(params, toks)
    mesh = jax.make_mesh((2, 1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), sharding.logical_rules():
        got = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, toks)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cross_entropy_matches_optax_and_masks():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(objectives.cross_entropy(logits, targets), ref.mean(), rtol=1e-6)
    mask = jnp.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    np.testing.assert_allclose(objectives.cross_entropy(logits, targets, mask), ref[mask].mean(),
                               rtol=1e-6)
    # The gradient too (softmax minus the target's one-hot), masked tokens included.
    got = jax.grad(objectives.cross_entropy)(logits, targets, mask)
    want = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets)[mask].mean())(
        logits)
    np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": True},
        {"num_kv_heads": 1},
        {"head_dim": 16},
        {"num_layers": 1, "mlp_dim": 8, "vocab_size": 5},
        {"num_labels": 3},  # a classifier: a score head, no output layer
        {"num_labels": 3, "tie_embeddings": True},
    ],
)
def test_num_params_matches_formula(tiny_cfg, overrides):
    cfg = tiny_cfg.replace(model=overrides).model
    graphdef, params = nnx.split(model.init(cfg), nnx.Param)
    allocated = sum(x.size for x in jax.tree.leaves(params))
    assert model.num_params(cfg) == model.num_params_formula(cfg) == allocated


def test_llama2_7b_param_count_without_allocating():
    cfg = config.load("configs/llama2_7b.py")
    assert model.num_params(cfg.model) == 6_738_415_616
    assert model.num_params_formula(cfg.model) == 6_738_415_616
    leaves = jax.tree.leaves(nnx.state(model.abstract(cfg.model)))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)

"""Attention backends: the plain reference and the blockwise `xla` kernel against a per-head loop
(values, gradients, ragged blocks, GQA, bf16, sharded), the cuDNN call's plumbing (run with jax's
xla implementation), splash attention through the Pallas interpreter (alone, sharded, and inside
the decoder), and the platform rules (auto, clear errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from jaxlm import attention, config, model, sharding


def qkv(B=2, L=128, H=4, G=2, K=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(B, L, h, K)), jnp.float32) for h in (H, G, G))
    segments = np.ones((B, L), np.int32)
    segments[0, 40:] = 2  # row 0 packs two documents, row 1 three
    segments[1, 30:], segments[1, 90:] = 2, 3
    return q, k, v, jnp.asarray(segments)


def loop_reference(q, k, v, segments):
    """Softmax attention one row and one head at a time, in numpy float64."""
    q, k, v, segments = (np.asarray(x, np.float64) for x in (q, k, v, segments))
    B, L, H, K = q.shape
    R = H // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            scores = q[b, :, h] @ k[b, :, h // R].T / np.sqrt(K)
            allowed = np.tril(np.ones((L, L), bool)) & (segments[b][:, None] == segments[b][None, :])
            scores = np.where(allowed, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // R]
    return out


def test_reference_matches_loop_reference():
    q, k, v, seg = qkv()
    np.testing.assert_allclose(attention.reference_attention(q, k, v, seg),
                               loop_reference(q, k, v, seg), atol=1e-5)


def grads_of(fn, q, k, v, seg):
    weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), q.dtype)
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * weights), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("per_head", [True, False], ids=["lax_map", "vmap"])
@pytest.mark.parametrize(
    "B,L,H,G,K,segmented",
    [
        (2, 128, 4, 2, 16, True),  # one block, GQA, packed rows
        (2, 300, 4, 2, 16, True),  # 128 + 128 + 44: a ragged last block
        (2, 260, 6, 1, 8, False),  # multi-query, no segment ids
        (2, 256, 4, 4, 16, True),  # one kv head per query head
    ],
)
def test_xla_kernel_matches_reference_values_and_gradients(per_head, B, L, H, G, K, segmented):
    """The blockwise kernel (its forward and its hand-written backward) equals the plain
    reference, whether the heads run one at a time (CPU) or batched (elsewhere)."""
    q, k, v, _ = qkv(B=B, L=L, H=H, G=G, K=K, seed=L)
    seg = None
    if segmented:
        seg = np.ones((B, L), np.int32)
        seg[0, L // 3:] = 2
        seg[-1, L // 2:], seg[-1, L - 5:] = 3, 4  # a five-token document at the end
        seg = jnp.asarray(seg)

    def kernel(q, k, v, seg):
        return attention._blockwise_one_shard(q, k, v, seg, per_head=per_head)

    np.testing.assert_allclose(jax.jit(kernel)(q, k, v, seg),
                               loop_reference(q, k, v, jnp.ones((B, L)) if seg is None else seg),
                               atol=1e-5)
    got = jax.jit(lambda q, k, v: grads_of(kernel, q, k, v, seg))(q, k, v)
    want = grads_of(attention.reference_attention, q, k, v, seg)
    for name, a, b in zip("qkv", got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_forward_only_runs_the_heads_batched_on_cpu():
    """A program traced under `forward_only` (scoring, prefill, evaluation) runs the xla kernel's
    (row, kv head) pairs batched on CPU, with no loop over them, and gives the same values and
    gradients; outside it, and after it, the CPU path loops again."""
    q, k, v, seg = qkv()

    def loops(fn):
        return "scan" in str(jax.make_jaxpr(fn)(q, k, v, seg))

    batched = attention.forward_only(attention.xla_attention)
    assert loops(attention.xla_attention)
    assert not loops(batched)
    assert loops(attention.xla_attention)
    np.testing.assert_allclose(jax.jit(batched)(q, k, v, seg),
                               jax.jit(attention.xla_attention)(q, k, v, seg), atol=1e-6)
    for a, b in zip(grads_of(batched, q, k, v, seg), grads_of(attention.xla_attention, q, k, v, seg),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_xla_kernel_keeps_no_score_matrix_for_the_backward_pass():
    """Its residuals are q, k, v, the output and the log-sum-exp: nothing of size [L, S]."""
    q, k, v, seg = qkv(B=2, L=256, H=4, G=2, K=16)
    _, backward = jax.vjp(lambda q, k, v: attention.xla_attention(q, k, v, seg), q, k, v)
    sizes = [x.size for x in jax.tree.leaves(backward)]
    assert sizes and max(sizes) <= q.size
    _, backward = jax.vjp(lambda q, k, v: attention.reference_attention(q, k, v, seg), q, k, v)
    assert max(x.size for x in jax.tree.leaves(backward)) >= 2 * 4 * 256 * 256  # the probabilities


@pytest.mark.parametrize("policy", ["save_dots", "save_attn", "full"])
def test_xla_kernel_keeps_no_scores_under_the_remat_policies(policy):
    """Under the model's remat policies too (save_dots keeps matmul outputs without a batch
    dimension: the per-head score matmuls must not be among them)."""
    q, k, v, seg = qkv(B=2, L=256, H=4, G=2, K=16)
    fn = jax.checkpoint(lambda q, k, v: attention.xla_attention(q, k, v, seg),
                        policy=model.remat_policy(policy))
    _, backward = jax.vjp(fn, q, k, v)
    assert max(x.size for x in jax.tree.leaves(backward)) <= q.size


def test_xla_kernel_in_bfloat16_is_close_to_float32():
    q, k, v, seg = qkv(L=256)
    want = loop_reference(q, k, v, seg)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(attention.xla_attention)(*bf16, seg)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)
    grads = jax.jit(lambda q, k, v: grads_of(attention.xla_attention, q, k, v, seg))(*bf16)
    for a, b in zip(grads, grads_of(attention.reference_attention, q, k, v, seg), strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=0.1, rtol=0.05)


def test_xla_kernel_runs_per_shard_under_a_mesh():
    """Batch over data x fsdp and heads over tensor, sequence-sharded inputs: values and gradients
    equal the unsharded reference."""
    q, k, v, seg = qkv(B=4, L=256)
    mesh = jax.make_mesh((2, 1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    rules = sharding.DEFAULT_RULES + (("length", ("tensor",)),)  # mesh.sequence_parallel
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        q, k, v = (jax.device_put(x, sharding.named_sharding(mesh, ("batch", "length"), rules))
                   for x in (q, k, v))
        fn = jax.jit(lambda q, k, v, s: attention.attention(q, k, v, s, implementation="xla"))
        out = fn(q, k, v, seg)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg))
        grads = jax.jit(lambda q, k, v: grads_of(attention.xla_attention, q, k, v, seg))(q, k, v)
    np.testing.assert_allclose(out, loop_reference(q, k, v, seg), atol=1e-5)
    for a, b in zip(grads, grads_of(attention.reference_attention, q, k, v, seg), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_cudnn_call_masks_like_the_reference():
    """The arguments the cudnn backend passes (mask layout, causal flag, scale, GQA shapes) give
    the reference result when jax runs them with its xla implementation."""
    q, k, v, seg = qkv()
    out = attention.dot_product_attention(q, k, v, seg, implementation="xla")
    np.testing.assert_allclose(out, loop_reference(q, k, v, seg), atol=1e-5)
    out = attention.dot_product_attention(q, k, v, None, implementation="xla")
    np.testing.assert_allclose(out, loop_reference(q, k, v, jnp.ones_like(seg)), atol=1e-5)


def test_splash_matches_reference_values_and_gradients():
    q, k, v, seg = qkv()

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg)))

    with attention.interpret_kernels():
        out = jax.jit(attention.splash_attention)(q, k, v, seg)
        grads = jax.jit(jax.grad(loss(attention.splash_attention), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, loop_reference(q, k, v, seg), atol=1e-5)
    ref_grads = jax.grad(loss(attention.reference_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_runs_per_shard_under_a_mesh():
    """Batch over data x fsdp and heads over tensor: each device runs the kernel on its part."""
    q, k, v, seg = qkv(B=4)
    mesh = jax.make_mesh((2, 1, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), sharding.logical_rules(), attention.interpret_kernels():
        fn = jax.jit(lambda q, k, v, s: attention.attention(q, k, v, s, implementation="splash"))
        out = fn(q, k, v, seg)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg))
    np.testing.assert_allclose(out, loop_reference(q, k, v, seg), atol=1e-5)


def test_decoder_with_splash_equals_decoder_with_xla():
    cfg = config.from_dict({"model": {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4,
                                      "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 128},
                           "data": {"seq_len": 128}})
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 128)), jnp.int32)
    _, _, _, seg = qkv()
    xla = model.init(cfg.model, seed=1)
    splash = model.init(cfg.replace(model={"attention": "splash"}).model, seed=1)
    nnx.update(splash, nnx.state(xla, nnx.Param))
    with attention.interpret_kernels():
        got = splash(tokens, seg)
    np.testing.assert_allclose(got, xla(tokens, seg), atol=2e-5)


def test_auto_picks_per_platform():
    assert attention.resolve("auto", jnp.float32) == "xla"  # the CPU here
    assert attention.resolve("auto", jnp.bfloat16, "cpu") == "xla"
    assert attention.resolve("auto", jnp.bfloat16, "tpu") == "splash"
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN needs 16-bit inputs
    assert attention.resolve("cudnn", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("splash", jnp.float32, "tpu") == "splash"


@pytest.mark.parametrize(
    "implementation,dtype,where,says",
    [
        ("cudnn", jnp.bfloat16, "cpu", "needs an NVIDIA GPU"),
        ("splash", jnp.float32, "cpu", "a TPU kernel"),
        ("splash", jnp.bfloat16, "gpu", "a TPU kernel"),
        ("cudnn", jnp.float32, "gpu", "bfloat16 or float16"),
    ],
)
def test_unrunnable_backend_is_a_one_line_config_error(implementation, dtype, where, says):
    with pytest.raises(config.ConfigError) as info:
        attention.resolve(implementation, dtype, where)
    message = str(info.value)
    assert "model.attention" in message and says in message and "\n" not in message


def test_config_choices_are_the_implementations():
    assert config.CHOICES["model.attention"] == attention.IMPLEMENTATIONS

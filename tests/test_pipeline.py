"""Pipeline parallelism (jaxlm/pipeline.py) on 8 fake CPU devices: the pipelined decoder gives the
logits and gradients of the plain one for several stage and microbatch counts, really passes
activations between stages, and trains through `train.run` with its bubble logged."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

import jaxlm
from jaxlm import attention, config, model, objectives, pipeline, sharding, train


def pipeline_cfg(seq_len=16, **model_overrides):
    return config.from_dict({
        "model": {"vocab_size": 128, "d_model": 32, "num_layers": 4, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": seq_len, **model_overrides},
        "data": {"seq_len": seq_len},
    })


def packed_batch(B=8, L=16, vocab=128):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
    segments = np.ones((B, L), np.int32)
    segments[:, 10:] = 2  # two documents per row: segments must survive the microbatch split
    positions = np.tile(np.concatenate([np.arange(10), np.arange(L - 10)]), (B, 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "positions": positions, "weights": rng.uniform(0.5, 1.0, (B, L)).astype(np.float32)}


def logits_and_grads(cfg, params, batch, mesh_shape=None, microbatches=0, rules=sharding.DEFAULT_RULES):
    graphdef, _ = nnx.split(model.abstract(cfg.model), nnx.Param)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model.abstract(cfg.model), nnx.Param)))

    def loss(p, b):
        return objectives.lm_sums(graphdef, p, b)[0]

    def logits(p, b):
        return nnx.merge(graphdef, p)(b["inputs"], b["segment_ids"], b["positions"])

    if mesh_shape is None:
        return jax.jit(logits)(params, batch), jax.jit(jax.grad(loss))(params, batch), ""
    mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    with jax.set_mesh(mesh), sharding.logical_rules(rules), pipeline.microbatches(microbatches):
        assert pipeline.num_stages() == mesh.shape["stage"]
        params = jax.device_put(params, sharding.tree_shardings(mesh, specs, rules))
        grad_fn = jax.jit(jax.grad(loss))
        hlo = grad_fn.lower(params, batch).compile().as_text()
        return jax.jit(logits)(params, batch), grad_fn(params, batch), hlo


@pytest.fixture(scope="module")
def reference():
    cfg = pipeline_cfg()
    params = nnx.to_pure_dict(nnx.split(model.init(cfg.model, seed=3), nnx.Param)[1])
    batch = packed_batch()
    return cfg, params, batch, logits_and_grads(cfg, params, batch)


@pytest.mark.parametrize(
    "mesh_shape,microbatches",
    [
        ((1, 2, 1, 1), 1),  # the degenerate pipeline: one microbatch, stages run one after the other
        ((1, 2, 2, 2), 2),
        ((2, 2, 2, 1), 4),
        ((2, 4, 1, 1), 2),  # fewer microbatches than stages
        ((1, 4, 1, 1), 8),  # one row per microbatch
    ],
)
def test_pipeline_equals_plain_model(reference, mesh_shape, microbatches):
    cfg, params, batch, (ref_logits, ref_grads, _) = reference
    logits, grads, hlo = logits_and_grads(cfg, params, batch, mesh_shape, microbatches)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4)
    # Activations really move between stages (forward and backward), they are not gathered.
    assert "collective-permute" in hlo


@pytest.mark.parametrize(
    "overrides,rules",
    [
        ({"scan_layers": False, "remat": "full"}, sharding.DEFAULT_RULES),
        ({"remat": "save_dots"}, sharding.DEFAULT_RULES + (("length", ("tensor",)),)),  # + sequence
    ],
)
def test_pipeline_composes_with_remat_loop_and_sequence_sharding(reference, overrides, rules):
    _, params, batch, (ref_logits, ref_grads, _) = reference
    cfg = pipeline_cfg(**overrides)
    logits, grads, _ = logits_and_grads(cfg, params, batch, (1, 2, 2, 2), 2, rules)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4)


def test_bubble_fraction_and_default_microbatches():
    assert pipeline.bubble_fraction(1, 4) == 0.0
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline.bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert pipeline.resolve_microbatches(0, 4) == 8
    assert pipeline.resolve_microbatches(3, 4) == 3
    assert pipeline.num_stages() == 1  # no mesh: nothing is pipelined


def test_batch_not_divisible_by_microbatches_is_a_clear_error(reference):
    cfg, params, batch, _ = reference
    with pytest.raises(ValueError, match="3 pipeline microbatches"):
        logits_and_grads(cfg, params, batch, (1, 2, 1, 1), 3)


@pytest.mark.slow
def test_pipelined_training_run_logs_bubble_and_restores_on_one_device(tmp_path, capsys,
                                                                       stdlib_data_dir):
    cfg = config.from_dict({
        "model": {"vocab_size": 512, "d_model": 32, "num_layers": 4, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 32},
        "data": {"seq_len": 32, "data_dir": stdlib_data_dir},
        "optim": {"warmup_steps": 1, "lr": 3e-3},
        "train": {"steps": 3, "global_batch_size": 8, "eval_every": 3, "eval_batches": 1,
                  "log_every": 1},
        "checkpoint": {"every": 3},
        "mesh": {"data": 2, "stage": 4, "pipeline_microbatches": 2},
    })
    state, result = train.run(cfg, str(tmp_path / "run"))
    assert "pipeline: 4 stages, 2 microbatches, bubble fraction 0.6" in capsys.readouterr().out
    assert result["step"] == 3 and np.isfinite(result["eval_loss"])
    layers = state.params["blocks"]["mlp"]["w_up_FD"]
    assert layers.sharding.spec[0] == "stage"  # each stage stores only its own layers
    lm = jaxlm.load(str(tmp_path / "run"))  # onto one device: the pipeline is a layout, not a format
    for a, b in zip(jax.tree.leaves(jax.device_get(lm.params)),
                    jax.tree.leaves(jax.device_get(state.params)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_splash_inside_the_pipeline_equals_the_plain_model():
    """The splash kernel (Pallas interpreter here) runs per shard inside each stage: logits and
    gradients equal the plain model's with the xla kernel."""
    plain = pipeline_cfg(seq_len=128, num_layers=2)  # 128: the kernel's smallest block
    params = nnx.to_pure_dict(nnx.split(model.init(plain.model, seed=3), nnx.Param)[1])
    batch = packed_batch(B=8, L=128)
    ref_logits, ref_grads, _ = logits_and_grads(plain, params, batch)
    with attention.interpret_kernels():
        splash = pipeline_cfg(seq_len=128, num_layers=2, attention="splash")
        logits, grads, hlo = logits_and_grads(splash, params, batch, (1, 2, 2, 2), microbatches=2)
    np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-4)
    assert "collective-permute" in hlo

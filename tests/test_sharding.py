"""Parallel layouts on 8 fake CPU devices: each gives the single-device losses, gradients and
parameters; golden PartitionSpecs; clear errors for meshes that do not fit; restore onto another
mesh."""

import json
import os

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm import checkpoint, config, objectives, pipeline, sharding, train

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_partition_specs.json")

LAYOUTS = {
    "dp8": {"data": 8},
    "fsdp8": {"data": 1, "fsdp": 8},
    "tp8": {"data": 1, "tensor": 8},
    "dp2_fsdp2_tp2": {"data": 2, "fsdp": 2, "tensor": 2},
    "dp4_tp2_sequence": {"data": 4, "tensor": 2, "sequence_parallel": True},
    # Pipelines (jaxlm/pipeline.py): 2 stages x 4 microbatches of 2 rows split over fsdp; 4 stages
    # (one layer each) x 4 microbatches of 2 rows split over data.
    "stage2_fsdp2_tp2": {"data": 1, "stage": 2, "fsdp": 2, "tensor": 2},
    "stage4_dp2": {"data": 2, "stage": 4, "pipeline_microbatches": 4},
}


def layout_cfg(mesh, kv_heads=2):
    return config.from_dict({
        "model": {"vocab_size": 128, "d_model": 32, "num_layers": max(2, mesh.get("stage", 1)),
                  "num_heads": 8,
                  "num_kv_heads": 8 if mesh.get("tensor") == 8 else kv_heads, "mlp_dim": 64,
                  "max_seq_len": 16},
        "data": {"seq_len": 16},
        "optim": {"warmup_steps": 0, "lr": 1e-2},
        "train": {"global_batch_size": 8, "steps": 5},
        "mesh": {"data": 1, "stage": 1, "fsdp": 1, "tensor": 1, **mesh},
    })


def batches(cfg, n):
    rng = np.random.default_rng(0)
    B, L = cfg.train.global_batch_size, cfg.data.seq_len
    for _ in range(n):
        tokens = rng.integers(4, cfg.model.vocab_size, (B, L + 1), dtype=np.int32)
        segments = np.ones((B, L), np.int32)
        segments[:, L // 2:] = 2
        positions = np.concatenate([np.arange(L // 2), np.arange(L - L // 2)]).astype(np.int32)
        yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
               "positions": np.tile(positions, (B, 1)), "weights": np.ones((B, L), np.float32)}


def run_layout(cfg, devices, init_params):
    """(first-step grads, losses of 5 steps, final state) under cfg.mesh on `devices`."""
    mesh, tx, graphdef, _, shardings = train._setup(cfg, devices)
    rules = sharding.rules_for(cfg.mesh)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), sharding.logical_rules(rules), pipeline.context(cfg.mesh, mesh):
        params = jax.device_put(init_params, shardings.params)
        state = train.TrainState(jax.device_put(np.int32(0), shardings.step), params,
                                 jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
        step = jax.jit(train.make_train_step(cfg, graphdef, tx),
                       in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        grad = jax.jit(jax.grad(lambda p, b: objectives.lm_sums(graphdef, p, b)[0]),
                       in_shardings=(shardings.params, batch_sharding),
                       out_shardings=shardings.params)
        losses, first_grads = [], None
        for batch in batches(cfg, 5):
            batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items()}
            if first_grads is None:
                first_grads = grad(state.params, batch)
            state, out = step(state, batch)
            losses.append(float(out["loss"]))
    return jax.device_get(first_grads), losses, state


_SINGLE_DEVICE_RUNS = {}


def single_device_run(cfg):
    """(initial params, run_layout on one device) for cfg's model; layouts that share a model
    share the run (3 distinct references for the 7 layouts)."""
    single = cfg.replace(mesh={"data": 1, "stage": 1, "fsdp": 1, "tensor": 1,
                               "sequence_parallel": False, "pipeline_microbatches": 0})
    key = repr(single)
    if key not in _SINGLE_DEVICE_RUNS:
        init = jax.device_get(nnx_params(single))
        _SINGLE_DEVICE_RUNS[key] = init, run_layout(single, jax.devices()[:1], init)
    return _SINGLE_DEVICE_RUNS[key]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_equals_single_device(name):
    cfg = layout_cfg(LAYOUTS[name])
    init, (ref_grads, ref_losses, ref_state) = single_device_run(cfg)
    grads, losses, state = run_layout(cfg, jax.devices(), init)
    # The layout really is spread over the 8 devices.
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
    # Adam's update is about lr * sign(g) where g is tiny (an embedding row seen once), so float
    # noise from the reduction order can flip single elements; compare whole tensors instead.
    params, ref_params = jax.device_get(state.params), jax.device_get(ref_state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b)


def nnx_params(cfg):
    from flax import nnx

    return nnx.to_pure_dict(nnx.split(jaxlm.model.init(cfg.model, cfg.train.seed), nnx.Param)[1])


def golden_table():
    table = {}
    for name, mesh in LAYOUTS.items():
        cfg = layout_cfg(mesh)
        _, _, _, _, shardings = train._setup(cfg)
        flat = jax.tree_util.tree_flatten_with_path(shardings.params)[0]
        table[name] = {
            "/".join(k.key for k in path): str(s.spec) for path, s in flat
        }
    return table


def test_golden_partition_specs():
    """A sharding change shows up as a diff of tests/golden_partition_specs.json.
    Regenerate after an intended change: JAXLM_REGENERATE_GOLDEN=1 pytest tests/test_sharding.py"""
    table = golden_table()
    if os.environ.get("JAXLM_REGENERATE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")
    with open(GOLDEN) as f:
        assert table == json.load(f)


def test_golden_specs_spot_checks():
    table = golden_table()
    assert table["fsdp8"]["embed_VD"] == "P(None, 'fsdp')"
    assert table["tp8"]["blocks/attn/w_q_HKD"] == "P(None, 'tensor', None, None)"
    assert table["tp8"]["blocks/mlp/w_down_DF"] == "P(None, None, 'tensor')"
    assert table["dp8"]["blocks/mlp/w_up_FD"] == "P(None, None, None)"
    assert table["dp2_fsdp2_tp2"]["blocks/mlp/w_up_FD"] == "P(None, 'tensor', 'fsdp')"
    assert table["stage2_fsdp2_tp2"]["blocks/mlp/w_up_FD"] == "P('stage', 'tensor', 'fsdp')"
    assert table["fsdp8"]["w_out_VD"] == "P(None, 'fsdp')"
    assert table["stage4_dp2"]["embed_VD"] == "P(None, None)"


@pytest.mark.parametrize(
    "mesh,model,batch,named",
    [
        ({"data": 3}, {}, 8, "mesh.data"),
        ({"data": -1, "tensor": 3}, {}, 8, "cannot fill 8 devices"),
        ({"data": 1, "tensor": 8}, {"num_heads": 4, "num_kv_heads": 4}, 8, "model.num_heads"),
        ({"data": 2, "tensor": 4}, {"num_kv_heads": 2}, 8, "model.num_kv_heads"),
        ({"data": 2, "tensor": 4}, {"num_kv_heads": 4, "mlp_dim": 66}, 8, "model.mlp_dim"),
        ({"data": 2, "tensor": 4}, {"num_kv_heads": 4, "vocab_size": 126}, 8, "model.vocab_size"),
        ({"data": 1, "fsdp": 8}, {"d_model": 36, "num_heads": 6, "num_kv_heads": 6}, 8,
         "model.d_model"),
        ({"data": 4, "stage": 2}, {"num_layers": 3}, 8, "model.num_layers"),
        ({"data": 8}, {}, 12, "train.global_batch_size"),
        ({"data": 2, "stage": 4, "pipeline_microbatches": 8}, {"num_layers": 4}, 8,
         "mesh.pipeline_microbatches"),
    ],
)
def test_layout_errors_name_the_key(mesh, model, batch, named):
    cfg = layout_cfg(mesh).replace(model=model, train={"global_batch_size": batch})
    with pytest.raises(config.ConfigError) as info:
        train._setup(cfg)
        train._check_batch_fits(cfg, sharding.make_mesh(cfg.mesh))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_sequence_parallel_needs_tensor():
    with pytest.raises(config.ConfigError, match="mesh.sequence_parallel"):
        layout_cfg({"data": 8, "sequence_parallel": True})


@pytest.mark.slow
def test_restore_onto_other_meshes(tmp_path, stdlib_data_dir):
    """A dp2 x fsdp2 x tp2 checkpoint restores bitwise onto fsdp8 and onto one device, and
    training continues on the new mesh."""
    data_dir = stdlib_data_dir
    base = layout_cfg(LAYOUTS["dp2_fsdp2_tp2"]).replace(
        model={"vocab_size": 512}, data={"data_dir": data_dir},
        train={"steps": 2, "eval_every": 100, "eval_batches": 1}, checkpoint={"every": 2})
    workdir = str(tmp_path / "run")
    state, _ = train.run(base, workdir)
    saved = jax.device_get(state.params)

    fsdp = base.replace(mesh={"data": 1, "fsdp": 8, "tensor": 1})
    mesh, _, _, abstract, shardings = train._setup(fsdp)
    _, params = checkpoint.restore_params(workdir, train.with_shardings(abstract.params, shardings.params))
    assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(params))
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)

    one = jaxlm.load(workdir)  # one device
    for a, b in zip(jax.tree.leaves(jax.device_get(one.params)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)

    state, result = train.run(fsdp.replace(train={"steps": 3}), workdir)
    assert result["step"] == 3 and int(state.step) == 3
    assert np.isfinite(result["eval_loss"])

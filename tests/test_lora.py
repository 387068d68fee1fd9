"""LoRA in the one loop: factors only are trained, the adapted model starts as its base, layouts
agree, and adapters round-trip with PEFT (peft's own code loads ours, ours loads peft's)."""

import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import cli, config, lora, lora_runs, optim, peft, sharding, train

pytestmark = pytest.mark.slow

# Non-square on purpose: H*K (48) != D (32), kv heads < heads, F (80) != D, so a transposed or
# mislabelled factor cannot pass.
MODEL = {"vocab_size": 512, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 12, "mlp_dim": 80, "max_seq_len": 64, "tie_embeddings": False}
RUN = {"train": {"steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 4,
                 "eval_batches": 1}, "checkpoint": {"every": 4}}


def lora_cfg(**lora_keys):
    return config.from_dict({"model": MODEL, "data": {"seq_len": 32},
                             "lora": {"rank": 4, "alpha": 8.0, **lora_keys}, **RUN})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_data_dir):
    """A base run on the embedded corpus, then a LoRA run from it (lr high enough that B moves)."""
    root = tmp_path_factory.mktemp("lora")
    data = {"data_dir": stdlib_data_dir, "seq_len": 32}
    base = str(root / "base")
    train.train(config.from_dict({"model": MODEL, "data": data, **RUN}), base)
    adapted = str(root / "adapted")
    train.train(config.from_dict({
        "data": data, "optim": {"lr": 2e-2, "warmup_steps": 1},
        "lora": {"rank": 4, "alpha": 8.0, "targets": "q,k,v,o,gate,up,down"},
        **{**RUN, "train": {**RUN["train"], "init_from": base}}}), adapted)
    return base, adapted


def test_adapted_model_starts_bitwise_as_its_base_and_trains_only_factors():
    cfg = lora_cfg(targets="q,v,down")
    mesh, tx, graphdef, abstract, shardings = train._setup(cfg.replace(mesh={"data": 1}),
                                                           jax.devices()[:1])
    frozen = train.frozen_base(cfg, None, abstract, shardings)
    state = train.init_state(cfg, tx, shardings, frozen=frozen)
    tokens = np.random.RandomState(0).randint(4, 512, (2, 20))
    adapted = nnx.merge(graphdef, train.model_params(cfg, state.params, state.frozen))(tokens)
    plain = nnx.merge(graphdef, state.frozen)(tokens)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))

    # The trained params and the optimizer's moments are the factors of the targets only.
    names = {(part, name) for part, ws in state.params["blocks"].items() for name in ws}
    assert names == {("attn", "w_q_HKD"), ("attn", "w_v_GKD"), ("mlp", "w_down_DF")}
    assert set(state.params) == {"blocks"}
    factor_shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
    mu = state.opt_state[1][0].mu  # clip, then adamw's scale_by_adam state
    assert sorted(x.shape for x in jax.tree.leaves(mu)) == factor_shapes
    a, b = (state.params["blocks"]["attn"]["w_q_HKD"][k] for k in ("w_a", "w_b"))
    assert a.shape == (2, 4, 32) and b.shape == (2, 48, 4) and float(jnp.abs(b).max()) == 0

    # One step: every factor gets a gradient, the base does not change.
    batch = {"inputs": tokens[:, :-1].repeat(4, 0), "targets": tokens[:, 1:].repeat(4, 0),
             "segment_ids": np.ones((8, 19), np.int32),
             "positions": np.broadcast_to(np.arange(19, dtype=np.int32), (8, 19)).copy(),
             "weights": np.ones((8, 19), np.float32)}
    before = jax.device_get(state.frozen)
    step = train.jit_train_step(cfg, graphdef, tx, shardings, sharding.replicated(mesh))
    with jax.set_mesh(mesh):
        new, out = step(state, batch)
    for x in jax.tree.leaves(jax.device_get(new.params["blocks"]["attn"]["w_q_HKD"]["w_b"])):
        assert np.abs(x).max() > 0
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new.frozen)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.isfinite(float(out["loss"]))


def test_lora_step_on_eight_devices_equals_one_device():
    cfg = lora_cfg(targets="q,k,v,o,gate,up,down")
    rng = np.random.RandomState(1)
    tokens = rng.randint(4, 512, (8, 17))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
             "weights": np.ones((8, 16), np.float32)}
    results = []
    for mesh_keys, devices in (({"data": 1}, jax.devices()[:1]),
                               ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
        c = cfg.replace(mesh=mesh_keys)
        mesh, tx, graphdef, abstract, shardings = train._setup(c, devices)
        rules = sharding.rules_for(c.mesh)
        with jax.set_mesh(mesh), sharding.logical_rules(rules):
            state = train.init_state(c, tx, shardings, frozen=train.frozen_base(c, None, abstract, shardings))
            bs = sharding.batch_sharding(mesh, rules)
            step = train.jit_train_step(c, graphdef, tx, shardings, bs)
            for _ in range(2):
                state, out = step(state, {k: jax.device_put(v, bs) for k, v in batch.items()})
            results.append((jax.device_get(state.params), float(out["loss"])))
    (one, loss_one), (many, loss_many) = results
    assert loss_many == pytest.approx(loss_one, rel=1e-5)
    for x, y in zip(jax.tree.leaves(one), jax.tree.leaves(many), strict=True):
        np.testing.assert_allclose(x, y, atol=2e-6)


def _hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def test_peft_loads_our_adapter_with_our_logits(runs, tmp_path):
    import transformers
    from peft import PeftModel

    base, adapted = runs
    lm = jaxlm.load(adapted)  # base + factors, merged on load
    base_lm = jaxlm.load(base)
    tokens = np.random.RandomState(2).randint(4, 512, (2, 24))
    ours = np.asarray(lm.logits(tokens))
    assert np.abs(ours - np.asarray(base_lm.logits(tokens))).max() > 1e-3  # the adapter acts

    hf_base, adapter = str(tmp_path / "hf_base"), str(tmp_path / "adapter")
    base_lm.save_hf(hf_base)
    assert cli.main(["jaxlm", "export", f"--workdir={adapted}", "--format=peft",
                     f"--out={adapter}"]) == 0
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    written = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert written["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"]
    assert written["r"] == 4 and written["lora_alpha"] == 8.0

    model = transformers.LlamaForCausalLM.from_pretrained(hf_base, attn_implementation="eager")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    # peft only warns about adapter keys it cannot place ("Found missing adapter keys", unexpected
    # keys), and then runs the base model: any such warning is a failure.
    messages = [str(w.message) for w in seen]
    assert not [m for m in messages if "adapter" in m.lower() or "keys" in m.lower()], messages
    np.testing.assert_allclose(_hf_logits(peft_model, tokens), ours, atol=1e-4)

    # The merged HF export gives the same logits in plain transformers.
    merged = str(tmp_path / "merged")
    assert cli.main(["jaxlm", "export", f"--workdir={adapted}", "--format=hf", f"--out={merged}"]) == 0
    plain = transformers.LlamaForCausalLM.from_pretrained(merged, attn_implementation="eager")
    np.testing.assert_allclose(_hf_logits(plain, tokens), ours, atol=1e-4)


def test_we_load_an_adapter_written_by_peft(runs, tmp_path):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    base, _ = runs
    hf_base = str(tmp_path / "hf_base")
    jaxlm.load(base).save_hf(hf_base)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_base, attn_implementation="eager")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(
        r=3, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"], use_rslora=True,
        init_lora_weights=False))  # random A and B: a nonzero update
    adapter = str(tmp_path / "peft_adapter")
    peft_model.save_pretrained(adapter)
    tokens = np.random.RandomState(3).randint(4, 512, (2, 24))
    theirs = _hf_logits(peft_model, tokens)
    ours = np.asarray(jaxlm.load(hf_base, adapter=adapter).logits(tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(ours - np.asarray(jaxlm.load(hf_base).logits(tokens))).max() > 1e-3


def test_adapter_that_does_not_fit_names_the_tensor(runs, tmp_path, capsys):
    base, adapted = runs
    adapter = str(tmp_path / "adapter")
    lora_runs.save_peft(adapted, adapter)
    import safetensors.numpy

    path = os.path.join(adapter, peft.WEIGHTS_FILE)
    tensors = safetensors.numpy.load_file(path)
    name = "base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"
    tensors[name] = tensors[name][:, :32]  # [r, H*K] cut to [r, D]
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(lora.LoraError, match=r"layers.1.self_attn.o_proj.lora_A.weight has shape "
                                             r"\[4, 32\], the base model needs \[4, 48\]"):
        jaxlm.load(base, adapter=adapter)
    assert cli.main(["jaxlm", "export", f"--workdir={base}", "--format=peft",
                     f"--out={tmp_path / 'x'}"]) == 2
    assert "is not a LoRA run (its lora.rank is 0)" in capsys.readouterr().err


def test_aot_counts_a_frozen_base_and_factor_moments_only():
    """`jaxlm aot` compiles the LoRA step with its real state: a bfloat16 frozen base plus
    float32 factors and their two Adam moments, against the full model's weights and moments."""
    from jaxlm import aot

    full = config.from_dict({"model": MODEL, "data": {"seq_len": 32},
                             "train": {"global_batch_size": 8}, "mesh": {"data": 1}})
    adapted = full.replace(lora={"rank": 4, "base_dtype": "bfloat16"})
    sizes = {}
    for name, cfg in (("full", full), ("lora", adapted)):
        report = aot.check(cfg, jax.devices()[:1], memory_bytes=1e12)
        sizes[name] = report["bytes_per_device"]["arguments"]
    _, abstract, _ = train.abstract_state(adapted, optim.make(adapted))
    n_base = lora.count(abstract.frozen)
    n_factors = lora.count(abstract.params)
    batch = 5 * 8 * 32 * 4  # inputs, targets, segment ids, positions, weights
    assert sizes["full"] == pytest.approx(3 * 4 * n_base + batch, rel=0.01)  # f32 weights + 2 moments
    assert sizes["lora"] == pytest.approx(2 * n_base + 3 * 4 * n_factors + batch, rel=0.01)

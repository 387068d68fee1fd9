"""HF parity: jaxlm's decoder, loaded through its own converter, reproduces transformers' Llama
(an implementation nobody here wrote), and what jaxlm writes, transformers reads."""

import json
import os

import numpy as np
import pytest
import torch  # the dev extra (what `make test` installs) pins torch==2.13.0, a CPU wheel
import transformers

import jaxlm
from jaxlm import convert

VOCAB = 101


def hf_model(tied: bool, seed: int = 0, **overrides):
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=144, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory):
    model = hf_model(tied=request.param)
    directory = str(tmp_path_factory.mktemp("hf"))
    model.save_pretrained(directory)
    return model, directory


TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 23))


def test_logits_match_transformers(saved):
    model, directory = saved
    lm = jaxlm.load(directory)
    assert lm.config.model.num_kv_heads == 2 and lm.config.model.rope_theta == 50000.0
    assert lm.config.model.tie_embeddings == model.config.tie_word_embeddings
    assert lm.num_params == sum(p.numel() for p in model.parameters())
    ours = np.asarray(lm.logits(TOKENS))
    assert ours.dtype == np.float32 and ours.shape == (2, 23, VOCAB)
    np.testing.assert_allclose(ours, hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_save_hf_reloads_in_transformers(saved, tmp_path):
    model, directory = saved
    lm = jaxlm.load(directory)
    lm.save_hf(str(tmp_path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager"
    )
    np.testing.assert_allclose(hf_logits(reloaded, TOKENS), hf_logits(model, TOKENS), atol=1e-5)
    # And back into jaxlm, bit for bit.
    again = jaxlm.load(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(again.logits(TOKENS)), np.asarray(lm.logits(TOKENS)))


def test_rope_theta_matters(tmp_path):
    """The parity above would hide a theta that is ignored; here theta alone differs."""
    a, b = hf_model(tied=False), hf_model(
        tied=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    la, lb = jaxlm.load(str(tmp_path / "a")), jaxlm.load(str(tmp_path / "b"))
    assert np.abs(np.asarray(la.logits(TOKENS) - lb.logits(TOKENS))).max() > 1e-4
    np.testing.assert_allclose(np.asarray(lb.logits(TOKENS)), hf_logits(b, TOKENS), atol=1e-4)


def test_legacy_rope_theta_field(tmp_path):
    """Older config.json files keep rope_theta at the top level."""
    model = hf_model(tied=False)
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    hf = json.loads(cfg_path.read_text())
    hf.pop("rope_parameters")
    hf["rope_theta"] = 50000.0
    cfg_path.write_text(json.dumps(hf))
    lm = jaxlm.load(str(tmp_path))
    assert lm.config.model.rope_theta == 50000.0
    np.testing.assert_allclose(np.asarray(lm.logits(TOKENS)), hf_logits(model, TOKENS), atol=1e-4)


def test_sharded_and_bf16_export(saved, tmp_path, monkeypatch):
    model, directory = saved
    lm = jaxlm.load(directory)
    monkeypatch.setattr(convert, "SHARD_BYTES", 40_000)
    lm.save_hf(str(tmp_path), dtype="bfloat16")
    files = os.listdir(tmp_path)
    assert convert.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    back = jaxlm.load(str(tmp_path))  # bf16 on disk, float32 in memory
    np.testing.assert_allclose(np.asarray(back.logits(TOKENS)), hf_logits(model, TOKENS),
                               atol=0.05)


def test_bad_tokens_are_rejected(saved):
    lm = jaxlm.load(saved[1])
    with pytest.raises(ValueError, match=r"\[0, 101\)"):
        lm.logits(np.array([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match="int array"):
        lm.logits(np.zeros((2, 3), np.float32))


# --- conversion errors: one line, naming the tensor or field ---------------------------------


def _copy(directory, dst):
    import shutil

    shutil.copytree(directory, dst)
    return dst


def _one_line_error(path, *words):
    with pytest.raises(convert.ConversionError) as info:
        jaxlm.load(str(path))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_missing_tensor(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(saved[1], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(d, "model.layers.1.mlp.up_proj.weight", "missing")


def test_shape_mismatch(saved, tmp_path):
    d = _copy(saved[1], tmp_path / "m")
    hf = json.loads((d / "config.json").read_text())
    hf["num_key_value_heads"] = 4
    (d / "config.json").write_text(json.dumps(hf))
    _one_line_error(d, "model.layers.0.self_attn.k_proj.weight", "(16, 64)", "(32, 64)")


def test_unexpected_tensor(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(saved[1], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(d, "model.layers.0.self_attn.q_proj.bias")


@pytest.mark.parametrize(
    "field,value,named",
    [
        ("model_type", "gpt2", "model_type"),
        ("architectures", ["MistralForCausalLM"], "MistralForCausalLM"),
        ("hidden_act", "gelu", "hidden_act"),
        ("attention_bias", True, "attention_bias"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}, "llama3"),
        ("num_attention_heads", 7, "model.num_heads"),
    ],
)
def test_unsupported_config(saved, tmp_path, field, value, named):
    d = _copy(saved[1], tmp_path / "m")
    hf = json.loads((d / "config.json").read_text())
    hf[field] = value
    (d / "config.json").write_text(json.dumps(hf))
    _one_line_error(d, named)


def test_not_a_model_directory(tmp_path):
    _one_line_error(tmp_path, "config.json")
    (tmp_path / "config.json").write_text(json.dumps(hf_model(False).config.to_dict()))
    _one_line_error(tmp_path, "model.safetensors")

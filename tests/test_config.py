"""Config loading, overrides and validation: every preset loads, every bad value is one line
that names its key."""

import glob
import json
import os

import pytest

from jaxlm import config
from jaxlm.configs import base

PRESETS = sorted(p for p in glob.glob("configs/*.py") if not p.endswith("__init__.py"))


def test_presets_exist_and_validate():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"base.py", "tiny.py", "llama_125m.py", "llama_1b.py", "llama2_7b.py"} <= names
    for path in PRESETS:
        cfg = config.load(path)
        assert isinstance(cfg, config.Config)


@pytest.mark.parametrize("path", PRESETS)
def test_preset_docstring_starts_with_its_command(path):
    import ast

    with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    assert doc and f"--config={path}" in doc.split("\n\n")[1], path


def test_every_base_key_has_a_comment():
    import re

    commented, group = set(), None
    with open("configs/base.py") as f:
        for line in f:
            if m := re.match(r"\s+c\.(\w+) = \w+ = config_dict\.ConfigDict\(\)", line):
                group = m.group(1)
            elif m := re.match(r"\s+\w\.(\w+) = .*  # \S", line):
                commented.add(f"{group}.{m.group(1)}")
    cfg = base.get_config()
    declared = {f"{group}.{key}" for group in cfg for key in cfg[group]}
    assert declared == commented


def test_llama2_7b_shapes():
    m = config.load("configs/llama2_7b.py").model
    assert (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.mlp_dim) == (
        32000, 4096, 32, 32, 11008)
    assert m.tie_embeddings is False


def test_overrides_are_typed():
    cfg = config.load("configs/tiny.py", [
        "model.d_model=128", "model.rope_theta=5e5", "model.tie_embeddings=false",
        "--config.optim.lr=0.01", "model.remat=full",
    ])
    assert cfg.model.d_model == 128 and isinstance(cfg.model.d_model, int)
    assert cfg.model.rope_theta == 500000.0
    assert cfg.model.tie_embeddings is False
    assert cfg.optim.lr == 0.01
    assert cfg.model.remat == "full"


def test_config_is_frozen_and_hashable():
    cfg = config.load("configs/tiny.py")
    with pytest.raises(AttributeError):
        cfg.model.d_model = 3  # type: ignore[misc]
    assert hash(cfg.model) == hash(config.load("configs/tiny.py").model)


def test_json_round_trip():
    cfg = config.load("configs/llama_1b.py")
    assert config.from_dict(json.loads(cfg.to_json())) == cfg


def test_missing_keys_take_defaults():
    cfg = config.from_dict({"model": {"d_model": 64, "num_heads": 4, "num_kv_heads": 4}})
    assert cfg.model.num_layers == base.get_config().model.num_layers


BAD = [
    # (overrides or dict, words the one-line message must contain)
    (["model.bogus=1"], "model.bogus"),
    (["nogroup.key=1"], "nogroup.key"),
    (["model.d_model=abc"], "model.d_model"),
    (["model.d_model=250"], "model.d_model"),
    (["model.num_kv_heads=3"], "model.num_heads"),
    (["model.num_layers=0"], "model.num_layers"),
    (["model.vocab_size=-5"], "model.vocab_size"),
    (["model.dtype=float64"], "model.dtype"),
    (["model.remat=sometimes"], "model.remat"),
    (["model.attention=flash3"], "model.attention"),
    (["optim.schedule=exp"], "optim.schedule"),
    (["optim.lr=-1.0"], "optim.lr"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps"),
    (["data.seq_len=4096"], "data.seq_len"),
    (["mesh.fsdp=0"], "mesh.fsdp"),
    (["mesh.fsdp=-1"], "mesh.data"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["model.head_dim=7"], "model.head_dim"),
    (["model.norm_eps=inf"], "model.norm_eps"),
    ({"model": {"d_model": "256"}}, "model.d_model"),
    ({"model": {"scan_layers": 1}}, "model.scan_layers"),
    ({"model": {"num_layers": 2.0}}, "model.num_layers"),
    ({"model": {"unknown": 1}}, "model.unknown"),
    ({"modle": {"d_model": 1}}, "modle"),
]


@pytest.mark.parametrize("bad,named", BAD, ids=[str(b) for b, _ in BAD])
def test_bad_config_is_one_clear_line(bad, named):
    with pytest.raises(config.ConfigError) as info:
        if isinstance(bad, dict):
            config.from_dict(bad)
        else:
            config.load("configs/tiny.py", bad)
    message = str(info.value)
    assert named in message, message
    assert "\n" not in message


def test_choices_are_listed():
    with pytest.raises(config.ConfigError, match="none, full, save_dots, save_attn"):
        config.load("configs/tiny.py", ["model.remat=sometimes"])


def test_missing_config_file():
    with pytest.raises(config.ConfigError, match="nothere.py"):
        config.load("configs/nothere.py")


def test_config_file_without_get_config(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("x = 1\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert "\n" not in str(info.value) and "get_config" in str(info.value)

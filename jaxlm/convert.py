"""Hugging Face Llama <-> jaxlm: config.json and safetensors, in numpy (no torch, no pickle).

A HF Llama directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). HF stores each projection as a [out, in] matrix per layer; jaxlm
stores [in, out] with heads split out and all layers stacked, so conversion is transposes,
reshapes and stacking, nothing numerical. RoPE needs no permutation: jaxlm uses the same
half-split rotation as HF's Llama code.

A classifier (model.num_labels > 0) is HF's LlamaForSequenceClassification: `score.weight`
[num_labels, hidden] in place of `lm_head.weight`, and its label names as config.json's
id2label / label2id (jaxlm's classify.labels), both ways.

Every failure is a `ConversionError` whose one-line message names the file, field or tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm import config as config_lib
from jaxlm import paths
from jaxlm.config import ModelConfig
from jaxlm.configs import base
from jaxlm.model import head_dim

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 4 << 30  # safetensors files written by save are at most this big (except one huge tensor)


class ConversionError(ValueError):
    """A HF checkpoint cannot be read or written. The message is one line."""


# ---------------------------------------------------------------------------------------------
# config.json


def config_from_hf(hf: Mapping[str, Any], *, dtype: str = "float32",
                   param_dtype: str = "float32") -> config_lib.Config:
    """jaxlm Config from a HF LlamaConfig dict; rejects what jaxlm's decoder cannot express.

    Groups other than `model` keep their defaults (data.seq_len is capped at max_seq_len).
    """
    arch = hf.get("architectures") or []
    classifier = "LlamaForSequenceClassification" in arch
    if hf.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch
                                           and not classifier):
        raise ConversionError(
            f"unsupported architecture: config.json has model_type={hf.get('model_type')!r}, "
            f"architectures={arch!r}; jaxlm reads Llama (model_type 'llama', LlamaForCausalLM "
            "or LlamaForSequenceClassification)"
        )
    labels = []
    if classifier:
        id2label = hf.get("id2label") or {}
        labels = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
        if len(labels) < 2 or None in labels or hf.get("problem_type") not in (
                None, "single_label_classification"):
            raise ConversionError(
                f"unsupported classifier: config.json has id2label={id2label!r}, problem_type="
                f"{hf.get('problem_type')!r}; jaxlm reads single-label classifiers of 2+ labels")
    for field, wanted in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(field, wanted) != wanted:
            raise ConversionError(
                f"unsupported config.json field {field}={hf[field]!r}; jaxlm supports {wanted!r}"
            )
    # transformers 5 keeps RoPE settings in rope_parameters; older files use rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(
            f"unsupported config.json field rope_type={rope_type!r}; jaxlm supports 'default' RoPE"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size"):
        if field not in hf:
            raise ConversionError(f"config.json lacks the field {field!r}")
    heads = hf["num_attention_heads"]
    model = {
        "vocab_size": hf["vocab_size"],
        "d_model": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or None,
        "mlp_dim": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(theta),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "dtype": dtype,
        "param_dtype": param_dtype,
        "num_labels": len(labels),
    }
    try:
        return config_lib.from_dict({
            "model": model,
            "data": {"seq_len": min(model["max_seq_len"], base.get_config().data.seq_len)},
            "classify": {"labels": ",".join(map(str, labels))},
        })
    except config_lib.ConfigError as e:
        raise ConversionError(f"config.json does not make a valid jaxlm model: {e}") from None


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str,
                         labels: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config.json that transformers' LlamaForCausalLM loads (5.x and older 4.x alike), or
    for a classifier LlamaForSequenceClassification, with `labels` as id2label."""
    extra = {}
    if cfg.num_labels:
        if len(labels) != cfg.num_labels:
            raise ConversionError(f"a classifier of {cfg.num_labels} labels needs their "
                                  f"{cfg.num_labels} names (classify.labels), got {len(labels)}")
        extra = {"num_labels": cfg.num_labels, "problem_type": "single_label_classification",
                 "id2label": {str(i): n for i, n in enumerate(labels)},
                 "label2id": {n: i for i, n in enumerate(labels)}}
    return {
        "architectures": ["LlamaForSequenceClassification" if cfg.num_labels
                          else "LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": head_dim(cfg),
        "intermediate_size": cfg.mlp_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "dtype": torch_dtype,
        "torch_dtype": torch_dtype,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# tensors
#
# Per-layer tensors: jaxlm path inside `blocks` -> (HF name suffix, HF shape -> jaxlm shape).


def _layer_table(cfg: ModelConfig):
    D, F, H, G, K = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    return {
        ("attn", "w_q_HKD"): ("self_attn.q_proj.weight", (H * K, D), (H, K, D)),
        ("attn", "w_k_GKD"): ("self_attn.k_proj.weight", (G * K, D), (G, K, D)),
        ("attn", "w_v_GKD"): ("self_attn.v_proj.weight", (G * K, D), (G, K, D)),
        ("attn", "w_o_DHK"): ("self_attn.o_proj.weight", (D, H * K), (D, H, K)),
        ("mlp", "w_gate_FD"): ("mlp.gate_proj.weight", (F, D), (F, D)),
        ("mlp", "w_up_FD"): ("mlp.up_proj.weight", (F, D), (F, D)),
        ("mlp", "w_down_DF"): ("mlp.down_proj.weight", (D, F), (D, F)),
        ("attn_norm", "scale_D"): ("input_layernorm.weight", (D,), (D,)),
        ("mlp_norm", "scale_D"): ("post_attention_layernorm.weight", (D,), (D,)),
    }


def _top_table(cfg: ModelConfig):
    V, D = cfg.vocab_size, cfg.d_model
    table = {
        ("embed_VD",): ("model.embed_tokens.weight", (V, D), (V, D)),
        ("final_norm", "scale_D"): ("model.norm.weight", (D,), (D,)),
    }
    if cfg.num_labels:
        table[("w_score_CD",)] = ("score.weight", (cfg.num_labels, D), (cfg.num_labels, D))
    elif not cfg.tie_embeddings:
        table[("w_out_VD",)] = ("lm_head.weight", (V, D), (V, D))
    return table


def _to_jaxlm(hf_array: np.ndarray, jaxlm_shape) -> np.ndarray:
    # Both store weights [out, in] (jaxlm with the head axes split out), so only reshapes happen.
    return hf_array.reshape(jaxlm_shape)


def _to_hf(ours: np.ndarray, hf_shape) -> np.ndarray:
    return np.ascontiguousarray(ours.reshape(hf_shape))


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                   source: str = "checkpoint") -> dict:
    """Nested dict of numpy arrays in jaxlm's parameter layout (the model's pure-dict state)."""
    expected = set()

    def take(name: str, hf_shape) -> np.ndarray:
        expected.add(name)
        if name not in tensors:
            raise ConversionError(f"missing tensor '{name}' in {source}")
        array = tensors[name]
        if tuple(array.shape) != tuple(hf_shape):
            raise ConversionError(
                f"tensor '{name}' in {source} has shape {tuple(array.shape)}, "
                f"expected {tuple(hf_shape)} from config.json"
            )
        return array

    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else _bf16()
    params: dict = {}
    for path, (name, hf_shape, shape) in _top_table(cfg).items():
        _set(params, path, _to_jaxlm(take(name, hf_shape), shape).astype(dtype))
    for path, (suffix, hf_shape, shape) in _layer_table(cfg).items():
        layers = [
            _to_jaxlm(take(f"model.layers.{i}.{suffix}", hf_shape), shape).astype(dtype)
            for i in range(cfg.num_layers)
        ]
        _set(params, ("blocks", *path), np.stack(layers))
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    for name in tensors:
        if name not in expected and name not in ignorable and not name.endswith("rotary_emb.inv_freq"):
            raise ConversionError(
                f"unexpected tensor '{name}' in {source}: not part of a Llama model with this "
                "config.json (biases and extra modules are unsupported)"
            )
    return params


def params_to_hf(params: Mapping, cfg: ModelConfig, dtype: np.dtype | None = None) -> dict:
    """Flat {HF tensor name: numpy array} from jaxlm's pure-dict parameters."""
    out = {}

    def cast(a):
        a = np.asarray(a)
        return a if dtype is None else a.astype(dtype)

    for path, (name, hf_shape, _) in _top_table(cfg).items():
        out[name] = _to_hf(cast(_get(params, path)), hf_shape)
    for path, (suffix, hf_shape, _) in _layer_table(cfg).items():
        stacked = cast(_get(params, ("blocks", *path)))
        for i in range(cfg.num_layers):
            out[f"model.layers.{i}.{suffix}"] = _to_hf(stacked[i], hf_shape)
    return out


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path):
    for key in path:
        tree = tree[key]
    return tree


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------------------------------------
# files


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise ConversionError(
            "HF conversion needs safetensors: pip install 'jaxlm[hf]'"
        ) from None
    return safetensors.numpy


def read_hf_config(directory: str) -> dict:
    path = paths.join(directory, CONFIG_FILE)
    if not paths.isfile(path):
        raise ConversionError(f"no {CONFIG_FILE} in '{directory}': not a HF model directory")
    try:
        return json.loads(paths.read_text(path))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def read_hf_tensors(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a HF directory, from one safetensors file or the shards of an index."""
    st = _safetensors_numpy()
    index = paths.join(directory, INDEX_FILE)
    if paths.isfile(index):
        files = sorted(set(json.loads(paths.read_text(index))["weight_map"].values()))
    elif paths.isfile(paths.join(directory, WEIGHTS_FILE)):
        files = [WEIGHTS_FILE]
    else:
        raise ConversionError(
            f"no {WEIGHTS_FILE} or {INDEX_FILE} in '{directory}' (only safetensors weights are read)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        path = paths.join(directory, name)
        if not paths.isfile(path):
            raise ConversionError(f"missing weights file '{path}' listed in {INDEX_FILE}")
        try:  # a local file is memory-mapped; an object is read whole
            tensors.update(st.load(paths.read_bytes(path)) if paths.is_remote(path)
                           else st.load_file(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ConversionError(f"cannot read '{path}': {e}") from None
    return tensors


def write_hf(directory: str, params: Mapping, cfg: ModelConfig, dtype: str | None = None,
             labels: tuple[str, ...] = ()) -> None:
    """Write config.json and safetensors weights (sharded past SHARD_BYTES) into `directory`
    (a classifier's with its `labels`)."""
    st = _safetensors_numpy()
    dtype = dtype or cfg.param_dtype
    hf_config = hf_config_from_model(cfg, dtype, labels)  # (checked before anything is written)
    np_dtype = _bf16() if dtype == "bfloat16" else np.dtype(dtype)
    tensors = params_to_hf(params, cfg, np_dtype)
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    metadata = {"format": "pt"}  # transformers checks this field when loading safetensors
    if len(shards) == 1:
        st.save_file(shards[0], os.path.join(directory, WEIGHTS_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            st.save_file(shard, os.path.join(directory, fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)


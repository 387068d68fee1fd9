"""The public API that eval scripts use: `jaxlm.load(path)` -> `LM`.

    import jaxlm
    lm = jaxlm.load("path/to/hf_llama_dir")
    logits = lm.logits(tokens)          # int [B, L] -> float32 [B, L, vocab]
    lm.save_hf("out_dir")               # loadable by transformers' LlamaForCausalLM

`LM` holds a validated `Config` and the model's parameters; `logits` is jitted once per input
shape. This module owns no numerics: it wires config, model and conversion together.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import convert, model


class LM:
    """A language model ready for inference: config + parameters + a jitted forward."""

    def __init__(self, cfg: config_lib.Config, decoder: model.Decoder):
        self.config = cfg
        self.graphdef, self.params = nnx.split(decoder, nnx.Param)

        def forward(params, tokens_BL, segment_ids_BL, positions_BL):
            return nnx.merge(self.graphdef, params)(tokens_BL, segment_ids_BL, positions_BL)

        self._forward = jax.jit(forward)

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    def logits(self, tokens, segment_ids=None, positions=None) -> jax.Array:
        """float32 logits [B, L, vocab] for int tokens [B, L] (optionally packed: see model.py)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, length], got {tokens.dtype}"
                             f"{list(tokens.shape)}")
        vocab = self.config.model.vocab_size
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(tokens.min())} "
                             f"max {int(tokens.max())}")
        return self._forward(self.params, tokens, segment_ids, positions)

    def save_hf(self, directory: str, dtype: str | None = None) -> None:
        """Write a HF Llama directory (config.json + safetensors) in `dtype` (default: param dtype)."""
        pure = nnx.to_pure_dict(jax.device_get(self.params))
        convert.write_hf(directory, pure, self.config.model, dtype)


def from_params(cfg: config_lib.Config, params: dict) -> LM:
    """An LM from a config and a pure nested dict of parameter arrays (jaxlm layout)."""
    graphdef, abstract_state = nnx.split(model.abstract(cfg.model), nnx.Param)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("parameters do not match the model config (names, shapes or dtypes)")
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, params))
    return LM(cfg, nnx.merge(graphdef, abstract_state))


def load(path: str, *, dtype: str = "float32", param_dtype: str = "float32") -> LM:
    """Load a HF Llama directory (config.json + safetensors) as an `LM`.

    `dtype` is the compute dtype and `param_dtype` the storage dtype of the loaded parameters.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' is not a directory")
    if os.path.isfile(os.path.join(path, convert.CONFIG_FILE)):
        hf = convert.read_hf_config(path)
        cfg = convert.config_from_hf(hf, dtype=dtype, param_dtype=param_dtype)
        tensors = convert.read_hf_tensors(path)
        params = convert.params_from_hf(tensors, cfg.model, source=f"'{path}'")
        return from_params(cfg, params)
    raise convert.ConversionError(
        f"'{path}' is neither a HF Llama directory (no config.json) nor a jaxlm workdir"
    )



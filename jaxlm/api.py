"""The public API that eval scripts use: `jaxlm.load(path)` -> `LM`.

    import jaxlm
    lm = jaxlm.load("path/to/hf_llama_dir")   # or a jaxlm workdir: latest checkpoint's params
    lm = jaxlm.load("runs/tiny", step=250)     # a given checkpoint of a workdir
    logits = lm.logits(tokens)                 # int [B, L] -> float32 [B, L, vocab]
    lm.save_hf("out_dir")                      # loadable by transformers' LlamaForCausalLM

`LM` holds a validated `Config` and the model's parameters; `logits` is jitted once per input
shape. This module owns no numerics: it wires config, model and conversion together.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import checkpoint, convert, model
from jaxlm import config as config_lib


class LM:
    """A language model ready for inference: config + parameters + a jitted forward."""

    def __init__(self, cfg: config_lib.Config, decoder: model.Decoder, *, step: int | None = None,
                 tokenizer_path: str | None = None):
        self.config = cfg
        self.step = step  # the checkpoint's step, for a model loaded from a workdir
        self.tokenizer_path = tokenizer_path
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


def from_params(cfg: config_lib.Config, params: dict, **kwargs) -> LM:
    """An LM from a config and a pure nested dict of parameter arrays (jaxlm layout)."""
    graphdef, abstract_state = nnx.split(model.abstract(cfg.model), nnx.Param)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("parameters do not match the model config (names, shapes or dtypes)")
    nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, params))
    return LM(cfg, nnx.merge(graphdef, abstract_state), **kwargs)


def load(path: str, *, step: int | None = None, dtype: str | None = None,
         param_dtype: str = "float32") -> LM:
    """Load an `LM` from a HF Llama directory (config.json + safetensors) or a jaxlm workdir.

    For a workdir, only the parameters of the checkpoint at `step` (default: the latest finished
    one) are restored, onto the first local device, whatever mesh wrote them. `dtype` overrides
    the compute dtype (a workdir keeps its training dtype by default; HF loads compute in float32).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"'{path}' is not a directory")
    if os.path.isdir(checkpoint.checkpoint_dir(path)):
        return _load_workdir(path, step, dtype)
    if os.path.isfile(os.path.join(path, convert.CONFIG_FILE)):
        hf = convert.read_hf_config(path)
        cfg = convert.config_from_hf(hf, dtype=dtype or "float32", param_dtype=param_dtype)
        tensors = convert.read_hf_tensors(path)
        params = convert.params_from_hf(tensors, cfg.model, source=f"'{path}'")
        return from_params(cfg, params)
    raise convert.ConversionError(
        f"'{path}' is neither a jaxlm workdir (no checkpoints/) nor a HF Llama directory "
        "(no config.json)"
    )


def _load_workdir(workdir: str, step: int | None, dtype: str | None) -> LM:
    cfg = config_lib.from_dict(checkpoint.saved_config(workdir, step))
    if dtype:
        cfg = cfg.replace(model={"dtype": dtype})
    _, abstract_params = nnx.split(model.abstract(cfg.model), nnx.Param)
    target = checkpoint.single_device_target(nnx.to_pure_dict(abstract_params))
    step, params = checkpoint.restore_params(workdir, target, step)
    tok = os.path.join(workdir, "tokenizer.model")
    return from_params(cfg, params, step=step, tokenizer_path=tok if os.path.isfile(tok) else None)


def evaluate_workdir(workdir: str, step: int | None = None) -> dict:
    """Validation loss, perplexity and token count of a workdir's checkpoint, on one device."""
    from jaxlm import sharding, tokenizer, train

    lm = load(workdir, step=step)
    cfg = lm.config
    if lm.tokenizer_path:
        cfg = cfg.replace(data={"tokenizer": lm.tokenizer_path})
    tok = tokenizer.for_config(cfg)
    cfg = cfg.replace(mesh={"data": 1, "stage": 1, "fsdp": 1, "tensor": 1,
                            "sequence_parallel": False})
    mesh = sharding.make_mesh(cfg.mesh, jax.local_devices()[:1])
    result = train.evaluate(cfg, lm.graphdef, nnx.to_pure_dict(lm.params), tok, mesh)
    return {"step": lm.step, **result}

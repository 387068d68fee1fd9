"""LoRA runs as models: a LoRA workdir loaded as its merged model, a PEFT adapter merged into a
loaded model, and a LoRA run's factors exported as a PEFT adapter (`jaxlm export --format=peft`).
`jaxlm.load` (api.py) calls the first two; the adapter files themselves are jaxlm/peft.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm import api, checkpoint, finetune, lora, optim, peft, sharding, train
from jaxlm import config as config_lib


def merged_params(cfg: config_lib.Config, workdir: str, step: int | None, mesh):
    """(step, params) of a LoRA run: its base (train.init_from, pinned in its config, or the
    seed's) plus the checkpoint's factors, merged in float32 into model.param_dtype."""
    _, abstract, (specs, frozen_specs) = train.abstract_state(cfg, optim.make(cfg))
    shardings = train.TrainState(None, sharding.tree_shardings(mesh, specs), None,
                                 sharding.tree_shardings(mesh, frozen_specs))
    step, factors = checkpoint.restore_params(
        workdir, train.with_shardings(abstract.params, shardings.params), step)
    source = finetune.source(cfg.train.init_from) if cfg.train.init_from else None
    base = train.frozen_base(cfg, source, abstract, shardings)
    scale = lora.scale(cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora)
    merge = jax.jit(lora.merge, static_argnums=(2, 3))
    return step, merge(base, factors, scale, jnp.dtype(cfg.model.param_dtype))


def with_adapter(lm, adapter: str, kind: str | None):
    """`lm` with the PEFT adapter in `adapter` merged in (then quantized as `kind` says)."""
    pure = nnx.to_pure_dict(lm.params)
    factors, _, scale = peft.read(adapter, pure)
    merged = jax.jit(lora.merge, static_argnums=2)(pure, factors, scale)
    return api.from_params(lm.config, merged, step=lm.step, tokenizer_path=lm.tokenizer_path,
                           eos_ids=lm.eos_ids, quantize=kind, mesh=lm.mesh)


def save_peft(workdir: str, directory: str, step: int | None = None) -> None:
    """Write a LoRA run's factors (checkpoint `step`, default the latest) as a PEFT adapter."""
    cfg = config_lib.from_dict(checkpoint.saved_config(workdir, step))
    if not cfg.lora.rank:
        raise lora.LoraError(f"'{workdir}' is not a LoRA run (its lora.rank is 0): export it "
                             "with --format=hf")
    if cfg.model.num_labels:
        raise lora.LoraError(f"'{workdir}' is a classifier (its score head is trained in full): "
                             "jaxlm writes CAUSAL_LM adapters only; export the merged classifier "
                             "with --format=hf")
    _, abstract, _ = train.abstract_state(cfg, optim.make(cfg))
    one = sharding.replicated(api._resolve_mesh(None, cfg))
    _, factors = checkpoint.restore_params(
        workdir, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                              abstract.params), step)
    peft.write(directory, jax.device_get(factors), lora.parse_targets(cfg.lora.targets),
               cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora, base=cfg.train.init_from)

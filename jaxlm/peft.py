"""PEFT-format LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

What `peft.PeftModel.from_pretrained(LlamaForCausalLM, DIR)` reads (peft 0.21, verified in its
source; ../shared/DESIGN.md): peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, an explicit
`target_modules` list of HF module names (omitted, PEFT silently adapts q and v only), and tensors
named `base_model.model.model.layers.{i}.<module>.lora_{A,B}.weight` with A [r, in] and B
[out, r]. A wrong prefix or a missing tensor only warns in PEFT and leaves the base model's
output, so `read` refuses anything it does not fully use, naming the tensor or key.

jaxlm's factors are stacked (A [N, r, in], B [N, out, r], jaxlm/lora.py): layer i's slices are
PEFT's tensors as they are. Written in float32.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxlm import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
TENSOR = "base_model.model.model.layers.{layer}.{module}.lora_{factor}.weight"
# adapter_config.json keys that change what the adapter computes, with the only value read here.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
               "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def _safetensors():
    try:
        import safetensors.numpy
    except ImportError:
        raise lora.LoraError("PEFT adapters need safetensors: pip install 'jaxlm[hf]'") from None
    return safetensors.numpy


def write(directory: str, factors: dict, targets, rank: int, alpha: float, rslora: bool,
          base: str = "") -> None:
    """Write jaxlm factors (host arrays or jax arrays) as a PEFT LoRA adapter."""
    tensors = {}
    for t in targets:
        part, name = lora.TARGETS[t]
        f = factors["blocks"][part][name]
        a, b = np.asarray(f["w_a"], np.float32), np.asarray(f["w_b"], np.float32)
        for i in range(a.shape[0]):
            tensors[TENSOR.format(layer=i, module=MODULES[t], factor="A")] = np.ascontiguousarray(a[i])
            tensors[TENSOR.format(layer=i, module=MODULES[t], factor="B")] = np.ascontiguousarray(b[i])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "target_modules": [MODULES[t].split(".")[-1] for t in targets], "use_rslora": rslora,
        "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0, "inference_mode": True,
        "base_model_name_or_path": base, "modules_to_save": None, "init_lora_weights": True,
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    _safetensors().save_file(tensors, os.path.join(directory, WEIGHTS_FILE),
                             metadata={"format": "pt"})


def read(directory: str, base: dict) -> tuple[dict, tuple[str, ...], float]:
    """(factors, targets, scale) of a PEFT LoRA adapter for jaxlm params `base` (for shapes)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise lora.LoraError(f"no {CONFIG_FILE} in '{directory}': not a PEFT adapter")
    with open(path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise lora.LoraError(f"{path}: peft_type is {cfg.get('peft_type')!r}; jaxlm reads LORA")
    for key, wanted in UNSUPPORTED.items():
        if cfg.get(key, wanted) not in (wanted, [] if wanted is None else wanted):
            raise lora.LoraError(f"{path}: {key}={cfg[key]!r} is not supported (jaxlm reads "
                                 f"{wanted!r})")
    modules = cfg.get("target_modules")
    by_name = {m.split(".")[-1]: t for t, m in MODULES.items()}
    if not isinstance(modules, list) or not modules or any(m not in by_name for m in modules):
        raise lora.LoraError(f"{path}: target_modules must be a list of "
                             f"{', '.join(by_name)}; got {modules!r}")
    targets = tuple(t for t in lora.TARGETS if MODULES[t].split(".")[-1] in modules)
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise lora.LoraError(f"no {WEIGHTS_FILE} in '{directory}' (only safetensors is read)")
    tensors = dict(_safetensors().load_file(weights))
    factors: dict = {"blocks": {}}
    for t in targets:
        part, name = lora.TARGETS[t]
        w = base["blocks"][part][name]
        n_in, n_out = lora.in_out(name, w.shape)
        stacked = {}
        for factor, shape in (("A", (rank, n_in)), ("B", (n_out, rank))):
            layers = []
            for i in range(w.shape[0]):
                key = TENSOR.format(layer=i, module=MODULES[t], factor=factor)
                if key not in tensors:
                    raise lora.LoraError(f"{weights}: missing tensor {key}")
                x = tensors.pop(key)
                if tuple(x.shape) != shape:
                    raise lora.LoraError(f"{weights}: tensor {key} has shape {list(x.shape)}, "
                                         f"the base model needs {list(shape)}")
                layers.append(np.asarray(x, np.float32))
            stacked["w_" + factor.lower()] = np.stack(layers)
        factors["blocks"].setdefault(part, {})[name] = stacked
    if tensors:
        raise lora.LoraError(f"{weights}: tensor {sorted(tensors)[0]} matches no adapted module "
                             f"of this model ({len(tensors)} unused)")
    return factors, targets, lora.scale(rank, alpha, bool(cfg.get("use_rslora", False)))

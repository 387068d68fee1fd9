"""Starting a run from a trained model: `train.init_from`.

The source is a jaxlm workdir (its latest checkpoint, or `DIR:STEP`) or a HF Llama directory
(config.json + safetensors + a sentencepiece tokenizer.model). From it come:

- the model keys: the architecture is the source's. A config that sets an architecture key to a
  value other than both the base default and the source's is refused in one line naming the key;
  the runtime keys (`RUNTIME_KEYS`: compute and storage dtype, scan, remat, attention kernel) are
  the fine-tuning run's own choice;
- the tokenizer (copied into the new workdir, as every run's is);
- the parameters, restored (params only) straight into the new run's shardings, at step 0.

The optimizer state starts fresh. Once the new workdir has a checkpoint, `train.run` resumes from
it as usual and the source is not read again.

A classification run (jaxlm/classify.py) gets `model.num_labels` from its labels, here, with
or without a source; from an LM source it takes everything but the output layer, and its score
head starts from the seed (a classifier source with as many labels passes its head on).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxlm import checkpoint, classify, convert, paths
from jaxlm import config as config_lib
from jaxlm.config import Config, ConfigError
from jaxlm.configs import base

# Model keys a run may set differently from its source: how the same weights are computed and
# stored, not what they are.
RUNTIME_KEYS = ("dtype", "param_dtype", "scan_layers", "remat", "attention")
KEY = "train.init_from"


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "workdir" | "hf"
    step: int | None  # workdir only: the checkpoint restored
    model: dict  # the source's model keys
    tokenizer: str  # its sentencepiece model


def parse(spec: str) -> tuple[str, int | None]:
    """"DIR" or "DIR:STEP" -> (DIR, STEP or None)."""
    path, sep, step = spec.rpartition(":")
    if sep and step.isdigit() and path:
        return paths.resolve(path), int(step)
    return paths.resolve(spec), None


def source(spec: str, key: str = KEY) -> Source:
    """What `train.init_from` (or `key`) names, checked: one ConfigError line when it is unusable."""
    path, step = parse(spec)
    if paths.isdir(checkpoint.checkpoint_dir(path)):
        steps = checkpoint.steps(path)
        if not steps:
            raise ConfigError(f"config key '{key}': workdir '{path}' has no finished checkpoint")
        if step is not None and step not in steps:
            raise ConfigError(f"config key '{key}': workdir '{path}' has no checkpoint {step}; "
                              f"it has {', '.join(map(str, steps))}")
        step = max(steps) if step is None else step
        model = checkpoint.saved_config(path, step)["model"]
        kind = "workdir"
    elif step is None and paths.isfile(paths.join(path, convert.CONFIG_FILE)):
        try:
            model = convert.config_from_hf(convert.read_hf_config(path)).to_dict()["model"]
        except convert.ConversionError as e:
            raise ConfigError(f"config key '{key}': {e}") from None
        kind = "hf"
    else:
        raise ConfigError(f"config key '{key}': '{spec}' is neither a jaxlm workdir (no "
                          "checkpoints/) nor a HF Llama directory (no config.json)")
    tok = paths.join(path, "tokenizer.model")
    if not paths.isfile(tok):
        raise ConfigError(f"config key '{key}': '{path}' has no tokenizer.model (jaxlm reads "
                          "text with the source's sentencepiece model)")
    return Source(path, kind, step, model, tok)


def with_labels(cfg: Config) -> Config:
    """A classification run's `cfg` with model.num_labels (and classify.labels) from its labels."""
    if cfg.data.dataset not in classify.DATASETS:
        if cfg.model.num_labels:
            raise ConfigError(f"config key 'model.num_labels' ({cfg.model.num_labels}) makes a "
                              "classifier, which trains on data.dataset classify or stdlib_classify")
        return cfg
    names = classify.labels(cfg)
    if cfg.model.num_labels not in (0, len(names)):
        raise ConfigError(f"config key 'model.num_labels' ({cfg.model.num_labels}) disagrees with "
                          f"classify.labels ({len(names)} names)")
    return cfg.replace(model={"num_labels": len(names)}, classify={"labels": ",".join(names)})


def resolve(cfg: Config) -> tuple[Config, Source | None]:
    """`cfg` with the source's model keys and tokenizer (and a classifier's num_labels), and
    the source; (cfg, None) without `train.init_from`."""
    cfg = with_labels(cfg)
    if not cfg.train.init_from:
        return cfg, None
    src = source(cfg.train.init_from)
    if src.model.get("num_labels") and not cfg.model.num_labels:
        raise ConfigError(f"config key '{KEY}': '{src.path}' is a classifier (it has no output "
                          "layer); a language-model run cannot start from it")
    defaults = base.get_config().model
    ours = cfg.to_dict()["model"]
    for key, value in ours.items():
        if (key in RUNTIME_KEYS or key == "num_labels" or value == src.model.get(key, defaults[key])
                or value == defaults[key]):
            continue
        raise ConfigError(f"config key 'model.{key}' is {value!r}, but the model of {KEY} "
                          f"'{src.path}' has {src.model[key]!r}; model keys come from the source "
                          "(only " + ", ".join(f"model.{k}" for k in RUNTIME_KEYS) + " may differ)")
    if cfg.data.tokenizer and paths.resolve(cfg.data.tokenizer) != \
            paths.resolve(src.tokenizer):  # (a resolved config names the source's)
        raise ConfigError(f"config key 'data.tokenizer' ({cfg.data.tokenizer!r}) conflicts with "
                          f"{KEY}: the tokenizer comes from the source ('{src.tokenizer}')")
    model = {k: v for k, v in src.model.items() if k not in RUNTIME_KEYS}
    model["num_labels"] = cfg.model.num_labels
    # Pinned: an absolute path and, for a workdir, the step, so a resume or a `jaxlm.load` of
    # a LoRA run (which reads its base again) finds the same parameters from any directory.
    pinned = paths.resolve(src.path) + (f":{src.step}" if src.step is not None else "")
    return cfg.replace(model=model, data={"tokenizer": paths.resolve(src.tokenizer)},
                       train={"init_from": pinned}), src


def teacher(cfg: Config) -> tuple[Source, object] | None:
    """`distill.teacher` of a resolved `cfg`: (its source, its ModelConfig, computing in the
    student's dtype with the student's attention kernel, without remat), or None when off."""
    if not cfg.distill.teacher:
        return None
    key = "distill.teacher"
    src = source(cfg.distill.teacher, key)
    if src.model.get("num_labels"):
        raise ConfigError(f"config key '{key}': '{src.path}' is a classifier, not a language model")
    if src.model["vocab_size"] != cfg.model.vocab_size:
        raise ConfigError(f"config key '{key}': '{src.path}' has a vocabulary of "
                          f"{src.model['vocab_size']} tokens and the student "
                          f"{cfg.model.vocab_size}; distillation matches their distributions "
                          "token by token, so both must read the same tokenizer")
    model = {**src.model, "dtype": cfg.model.dtype, "remat": "none",
             "attention": cfg.model.attention}
    if model["max_seq_len"] < cfg.data.seq_len:
        raise ConfigError(f"config key '{key}': the teacher's max_seq_len ({model['max_seq_len']})"
                          f" is shorter than data.seq_len ({cfg.data.seq_len})")
    return src, config_lib.from_dict({"model": model, "data": {"seq_len": cfg.data.seq_len}}).model


def initial_params(src: Source, target):
    """The source's parameters placed as `target` (ShapeDtypeStructs with shardings) says,
    cast to its dtypes. A classifier's score head is left out (the caller seeds it) unless the
    source has one of the same shape; the source's output layer is left behind."""
    head = target.get("w_score_CD")
    if head is not None and src.model.get("num_labels") != head.shape[0]:
        target = {k: v for k, v in target.items() if k != "w_score_CD"}
    # Arrays of the source that `target` has no place for (an output layer, a score head).
    leaves_some = (head is not None and "w_score_CD" not in target) or (
        "w_out_VD" not in target and not src.model["tie_embeddings"]
        and not src.model.get("num_labels"))
    if src.kind == "workdir":
        # Restore in the dtype it was saved in, then cast on device (e.g. a bfloat16 frozen base).
        dtype = jax.numpy.dtype(src.model["param_dtype"])
        saved = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, dtype, sharding=t.sharding),
                             target)
        _, params = checkpoint.restore_params(src.path, saved, src.step,
                                              partial=leaves_some)
        return jax.tree.map(lambda p, t: p if p.dtype == t.dtype else p.astype(t.dtype), params, target)
    cfg = convert.config_from_hf(convert.read_hf_config(src.path))
    arrays = convert.params_from_hf(convert.read_hf_tensors(src.path), cfg.model,
                                    source=f"'{src.path}'")

    def place(a: np.ndarray, t):
        a = np.asarray(a).astype(t.dtype)
        # Every process holds the whole array and hands each device its slice.
        return jax.make_array_from_callback(t.shape, t.sharding, lambda index: a[index])

    return jax.tree.map(place, {k: arrays[k] for k in target}, target)


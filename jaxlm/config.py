"""Config loading and validation: ml_collections ConfigDict in, frozen dataclasses out.

Keys are declared once, in `configs/base.py` (installed as `jaxlm.configs.base`); this module owns
the rules about their values. `load` reads a config file plus `group.key=value` overrides through
absl's `config_flags` (the same parser the CLI uses), and `validate` turns the result into a
`Config` of frozen dataclasses, or raises `ConfigError` with one line naming the key at fault.

This module must not derive values into the config (derived values are computed where used) and
must not import the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags

from jaxlm.configs import base


class ConfigError(ValueError):
    """A config value is wrong. The message is one line and names the key."""


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_attn")
SCHEDULES = ("constant", "cosine", "linear", "wsd")
MESH_AXES = ("data", "stage", "fsdp", "tensor")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # jaxlm/lora.py's TARGETS

CHOICES = {
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMAT_POLICIES,
    "model.attention": ("xla", "cudnn", "splash", "auto"),  # see jaxlm/attention.py
    "optim.schedule": SCHEDULES,
    "data.too_long": ("truncate_prompt", "drop"),
    "data.bad_rows": ("error", "skip"),
    "checkpoint.best_mode": ("min", "max"),
    "loss.sequence_weighting": ("", "mean_loss"),
}

# Keys that must be > 0 (when not None) and keys that must be >= 0.
POSITIVE = {
    "model": ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "max_seq_len", "rope_theta", "norm_eps", "init_std"),
    "data": ("seq_len", "dedup_num_perm", "dedup_shingle"),
    "optim": ("lr", "grad_accum_steps"),
    "train": ("steps", "global_batch_size", "log_every", "eval_every"),
    "checkpoint": ("every", "keep"),
    "lora": ("alpha",),
    "loss": ("sequence_cap",),
    "distill": ("temperature",),
}
NON_NEGATIVE = {
    "model": ("num_labels",),
    "optim": ("warmup_steps", "weight_decay", "clip_norm", "min_lr_ratio", "eps", "z_loss"),
    "train": ("seed", "eval_batches", "peak_tflops", "profile_steps", "eval_task_limit",
              "early_stop_patience"),
    "data": ("streams", "min_chars", "max_chars", "max_line_chars"),
    "mesh": ("pipeline_microbatches",),
    "lora": ("rank",),
    "loss": ("focal_gamma", "sequence_beta"),
}


def _schema() -> dict[str, dict[str, tuple[type, bool]]]:
    """{group: {key: (type, may_be_none)}} read off the base config."""
    cfg = base.get_config()
    return {
        group: {key: (cfg[group].get_type(key), cfg[group][key] is None) for key in cfg[group]}
        for group in cfg
    }


SCHEMA = _schema()


def _make_group_class(group: str) -> type:
    fields = [(key, typ | None if optional else typ) for key, (typ, optional) in SCHEMA[group].items()]
    return dataclasses.make_dataclass(f"{group.title()}Config", fields, frozen=True)


ModelConfig = _make_group_class("model")
DataConfig = _make_group_class("data")
OptimConfig = _make_group_class("optim")
TrainConfig = _make_group_class("train")
LoraConfig = _make_group_class("lora")
ClassifyConfig = _make_group_class("classify")
LossConfig = _make_group_class("loss")
DistillConfig = _make_group_class("distill")
CheckpointConfig = _make_group_class("checkpoint")
MeshConfig = _make_group_class("mesh")
_GROUP_CLASSES = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "lora": LoraConfig,
    "classify": ClassifyConfig,
    "loss": LossConfig,
    "distill": DistillConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
}
assert set(_GROUP_CLASSES) == set(SCHEMA), "configs/base.py groups and config.py disagree"


@dataclasses.dataclass(frozen=True)
class Config:
    """A validated run config. Hashable, so parts of it can be static arguments of `jax.jit`."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    lora: LoraConfig
    classify: ClassifyConfig
    loss: LossConfig
    distill: DistillConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def replace(self, **groups: Mapping[str, Any]) -> Config:
        """A copy with some keys changed, validated again: `cfg.replace(model={"dtype": "bfloat16"})`."""
        d = self.to_dict()
        for group, values in groups.items():
            if group not in d:
                raise ConfigError(f"unknown config group '{group}'; valid groups: {', '.join(d)}")
            d[group].update(values)
        return from_dict(d)


def _check_type(name: str, value: Any, typ: type, optional: bool) -> Any:
    if value is None and optional:
        return None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and (typ is bool or not isinstance(value, bool)):
        return value
    expected = typ.__name__ + (" or None" if optional else "")
    raise ConfigError(
        f"config key '{name}' must be {expected}, got {type(value).__name__} {value!r}"
    )


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Validate a nested mapping (a ConfigDict, or a parsed config.json) into a `Config`.

    Keys missing from `raw` take their defaults from configs/base.py; unknown keys are errors.
    """
    if isinstance(raw, config_dict.ConfigDict):
        raw = raw.to_dict()
    defaults = base.get_config().to_dict()
    for group in raw:
        if group not in SCHEMA:
            raise ConfigError(
                f"unknown config group '{group}'; valid groups: {', '.join(SCHEMA)}"
            )
        if not isinstance(raw[group], Mapping):
            raise ConfigError(f"config group '{group}' must be a mapping of keys to values")
    groups = {}
    for group, keys in SCHEMA.items():
        given = raw.get(group, {})
        for key in given:
            if key not in keys:
                raise ConfigError(
                    f"unknown config key '{group}.{key}' (not declared in configs/base.py)"
                )
        values = {}
        for key, (typ, optional) in keys.items():
            value = given.get(key, defaults[group][key])
            values[key] = _check_type(f"{group}.{key}", value, typ, optional)
        groups[group] = _GROUP_CLASSES[group](**values)
    cfg = Config(**groups)
    _check_values(cfg)
    return cfg


def _check_values(cfg: Config) -> None:
    for name, choices in CHOICES.items():
        group, key = name.split(".")
        value = getattr(getattr(cfg, group), key)
        if value not in choices:
            raise ConfigError(
                f"config key '{name}' is {value!r}; valid choices: "
                + ", ".join(c if c else '""' for c in choices)
            )
    for group, keys in POSITIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, group), key)
            if value is not None and not value > 0:
                raise ConfigError(f"config key '{group}.{key}' must be > 0, got {value!r}")
    for group, keys in NON_NEGATIVE.items():
        for key in keys:
            value = getattr(getattr(cfg, group), key)
            if not value >= 0:
                raise ConfigError(f"config key '{group}.{key}' must be >= 0, got {value!r}")
    for key in ("rope_theta", "norm_eps", "init_std", "lr"):
        group = "optim" if key == "lr" else "model"
        value = getattr(getattr(cfg, group), key)
        if not math.isfinite(value):
            raise ConfigError(f"config key '{group}.{key}' must be finite, got {value!r}")

    m = cfg.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"config key 'model.num_heads' ({m.num_heads}) must be a multiple of "
            f"'model.num_kv_heads' ({m.num_kv_heads})"
        )
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(
            f"config key 'model.d_model' ({m.d_model}) must equal num_heads x head_dim: it is not "
            f"divisible by 'model.num_heads' ({m.num_heads}); set 'model.head_dim' explicitly"
        )
    head_dim = m.head_dim or m.d_model // m.num_heads
    if head_dim % 2:
        raise ConfigError(f"config key 'model.head_dim' must be even for RoPE, got {head_dim}")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(
            f"config key 'data.seq_len' ({cfg.data.seq_len}) exceeds "
            f"'model.max_seq_len' ({m.max_seq_len})"
        )

    for key in ("max_replacement_share", "dedup_near"):
        if not 0.0 <= getattr(cfg.data, key) <= 1.0:
            raise ConfigError(f"config key 'data.{key}' must be in [0, 1], got {getattr(cfg.data, key)!r}")

    o = cfg.optim
    for key in ("b1", "b2", "min_lr_ratio"):
        if not 0.0 <= getattr(o, key) <= 1.0:
            raise ConfigError(f"config key 'optim.{key}' must be in [0, 1], got {getattr(o, key)!r}")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"config key 'optim.decay_fraction' must be in (0, 1], got {o.decay_fraction!r}")
    if cfg.train.global_batch_size % o.grad_accum_steps:
        raise ConfigError(
            f"config key 'train.global_batch_size' ({cfg.train.global_batch_size}) must be divisible "
            f"by 'optim.grad_accum_steps' ({o.grad_accum_steps})"
        )

    d = cfg.data
    for key in ("dataset", "data_dir", "text_field", "local_name", "train_split", "eval_split"):
        if not getattr(d, key):
            raise ConfigError(f"config key 'data.{key}' must not be empty")
    if d.dataset == "local" and not d.files:
        raise ConfigError("config key 'data.files' must be a glob of .txt/.jsonl files when "
                          "data.dataset is 'local'")
    if d.dataset == "sft" and not d.files:
        raise ConfigError("config key 'data.files' must be a glob of .jsonl files when "
                          "data.dataset is 'sft'")

    if d.dataset == "classify" and not (d.files and cfg.classify.labels):
        raise ConfigError("data.dataset 'classify' needs 'data.files' (a glob of .jsonl rows "
                          "{\"text\", \"label\"}) and 'classify.labels' (the label names, comma-separated)")
    if d.dataset in ("sft", "stdlib_sft", "classify", "stdlib_classify") and not (
            d.tokenizer or cfg.train.init_from):
        raise ConfigError(f"data.dataset '{d.dataset}' needs a tokenizer: set 'train.init_from' "
                          "(the source's tokenizer is used) or 'data.tokenizer'")
    names = [n.strip() for n in cfg.classify.labels.split(",")] if cfg.classify.labels else []
    if any(not n for n in names) or len(set(names)) != len(names) or len(names) == 1:
        raise ConfigError(f"config key 'classify.labels' ({cfg.classify.labels!r}) must name at "
                          "least two distinct, non-empty labels, comma-separated")

    if (cfg.loss.focal_gamma or cfg.loss.sequence_weighting) and cfg.model.num_labels:
        raise ConfigError("config keys 'loss.focal_gamma' and 'loss.sequence_weighting' weight a "
                          "language model's tokens; a classifier (model.num_labels) has none")
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        raise ConfigError(f"config key 'distill.alpha' must be in [0, 1], got {cfg.distill.alpha!r}")
    if cfg.distill.teacher and (cfg.loss.focal_gamma or cfg.loss.sequence_weighting):
        raise ConfigError("config key 'distill.teacher' does not combine with 'loss.focal_gamma' "
                          "or 'loss.sequence_weighting' (the distillation objective has its own "
                          "cross-entropy term)")
    if cfg.distill.teacher and cfg.model.num_labels:
        raise ConfigError("config key 'distill.teacher': distillation trains a language model; "
                          "a classifier (model.num_labels) has no token distribution to match")
    if cfg.loss.attention_entropy and cfg.model.attention in ("cudnn", "splash"):
        raise ConfigError(f"config key 'loss.attention_entropy' needs the 'xla' attention kernel "
                          f"(it gives the entropy block by block); model.attention is "
                          f"{cfg.model.attention!r}: set model.attention=xla")
    if cfg.loss.attention_entropy and cfg.mesh.stage > 1:
        raise ConfigError("config key 'loss.attention_entropy' is not supported with pipeline "
                          f"stages (mesh.stage={cfg.mesh.stage}); use data, fsdp or tensor axes")
    if cfg.loss.sequence_cap < 1.0:
        raise ConfigError(f"config key 'loss.sequence_cap' must be >= 1, got {cfg.loss.sequence_cap}")

    if cfg.train.early_stop_patience and not cfg.checkpoint.best_metric:
        raise ConfigError("config key 'train.early_stop_patience' needs 'checkpoint.best_metric' "
                          "(the metric that must improve), e.g. eval_loss")

    r = cfg.lora
    if r.base_dtype and r.base_dtype not in DTYPES:
        raise ConfigError(f"config key 'lora.base_dtype' is {r.base_dtype!r}; valid choices: \"\", "
                          + ", ".join(DTYPES))
    if r.rank:
        names = [t.strip() for t in r.targets.split(",") if t.strip()]
        bad = [t for t in names if t not in LORA_TARGETS]
        if bad or not names:
            raise ConfigError(f"config key 'lora.targets' ({r.targets!r}): each must be one of "
                              + ", ".join(LORA_TARGETS))

    if cfg.mesh.sequence_parallel and cfg.mesh.tensor == 1:
        raise ConfigError("config key 'mesh.sequence_parallel' needs 'mesh.tensor' > 1 (it splits "
                          "activations over the tensor axis)")
    sizes = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size != -1 and size < 1:
            raise ConfigError(f"config key 'mesh.{axis}' must be >= 1 or -1 (fill), got {size}")
    fills = [axis for axis, size in sizes.items() if size == -1]
    if len(fills) > 1:
        raise ConfigError(
            f"config keys {', '.join('mesh.' + a for a in fills)} are all -1; at most one mesh "
            "axis may fill the remaining devices"
        )


def load(path: str, overrides: Sequence[str] = ()) -> Config:
    """Load a config file and `group.key=value` overrides, as the CLI's `--config` flag does.

    `load("configs/tiny.py", ["model.remat=full"])` equals
    `jaxlm ... --config=configs/tiny.py --config.model.remat=full`.
    """
    argv = ["jaxlm", f"--config={path}"]
    argv += ["--config." + o.removeprefix("--config.") for o in overrides]
    fv = flags.FlagValues()
    define_config_flag(fv, argv)
    return parse_flags(fv, argv)


def define_config_flag(fv: flags.FlagValues, argv: Sequence[str]) -> None:
    """`--config=PATH` with `--config.group.key=value` overrides, read from `argv`, locked so an
    override can only set a declared key."""
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=fv, lock_config=True, sys_argv=list(argv),
        help_string="path to a config file, e.g. configs/tiny.py",
    )


def parse_flags(fv: flags.FlagValues, argv: Sequence[str]) -> Config:
    """Parse `argv` into `fv` (which defines a `config` file flag) and validate the config.

    Every failure (missing file, file without get_config, unknown key, unparsable value) becomes
    one `ConfigError` line naming the file or key.
    """
    for arg in argv:
        if arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                raise ConfigError(f"config file '{path}' not found")
        if arg.startswith(("--config.", "-config.")):
            name = arg.split("=", 1)[0].split(".", 1)[1]
            group, _, key = name.partition(".")
            if key not in SCHEMA.get(group, {}):
                raise ConfigError(f"unknown config key '{name}' (not declared in configs/base.py)")
    # config_flags imports every config file as the module "config_config" and re-executes it
    # in the module it finds in sys.modules, so names left by an earlier file (its get_config!)
    # would leak into this one. Each load starts from a fresh module.
    sys.modules.pop("config_config", None)
    try:
        positional = fv(list(argv))[1:]
        raw = fv.config
    except flags.Error as e:
        raise ConfigError(one_line(str(e))) from None
    except (OSError, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
        raise ConfigError(one_line(str(e))) from None
    if positional:
        raise ConfigError(f"unexpected argument '{positional[0]}' (flags look like --name=value)")
    if raw is None:
        raise ConfigError("no config given: pass --config=PATH (e.g. configs/tiny.py)")
    if not isinstance(raw, config_dict.ConfigDict):
        raise ConfigError(f"get_config() in {fv['config'].config_filename} must return a ConfigDict")
    return from_dict(raw)


def one_line(message: str) -> str:
    """absl wraps errors over several lines with tracebacks' worth of context; keep the gist."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines)

"""`jaxlm <command>`: the console entry point.

Every command takes `--config=PATH` plus `--config.group.key=value` overrides. Output meant for
programs is one JSON object on the last line of stdout. A bad flag or config value ends with a
one-line `jaxlm: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from jaxlm import config as config_lib

COMMANDS = {
    "smoke": "forward/backward/AdamW steps of the model on one synthetic batch (no data needed)",
    "params": "parameter count of a config, from abstract shapes (nothing allocated)",
    "data prepare": "prepare the config's dataset (TFDS array_record) and print its summary",
    "data bench": "tokens/s of the host input pipeline (tokenize + pack + batch)",
    "tokenizer train": "train the config's sentencepiece tokenizer on its train split",
}

USAGE = "usage: jaxlm <command> --config=PATH [--config.group.key=value ...]\n\ncommands:\n" + "".join(
    f"  {name:16s} {text}\n" for name, text in COMMANDS.items()
)


class UsageError(Exception):
    pass


def _parse(argv: list[str], define_extra=None) -> tuple[config_lib.Config, flags.FlagValues]:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", default=None, flag_values=fv, lock_config=True, sys_argv=argv,
        help_string="path to a config file, e.g. configs/tiny.py",
    )
    if define_extra:
        define_extra(fv)
    return config_lib.parse_flags(fv, argv), fv


def _smoke(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_integer("steps", 20, "number of smoke steps", flag_values=fv, lower_bound=1)

    cfg, fv = _parse(argv, define)
    from jaxlm import train

    print("jaxlm smoke: AdamW steps on one synthetic batch; this proves the model trains, "
          "it is not pretraining (that is `jaxlm train`, arriving with the training loop).")
    return train.smoke(cfg, fv.steps)


def _params(argv: list[str]) -> dict:
    cfg, _ = _parse(argv)
    from jaxlm import model

    return {"num_params": model.num_params(cfg.model), "formula": model.num_params_formula(cfg.model)}


def _data_prepare(argv: list[str]) -> dict:
    cfg, _ = _parse(argv)
    from jaxlm import datasets

    return datasets.prepare(cfg.data)


def _data_bench(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_integer("batches", 50, "batches to time", flag_values=fv, lower_bound=1)

    cfg, fv = _parse(argv, define)
    from jaxlm import data

    return data.bench(cfg, fv.batches)


def _tokenizer_train(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_string("output", None, "where to write the model (default: the dataset's "
                            "tokenizer path under data.data_dir)", flag_values=fv)

    cfg, fv = _parse(argv, define)
    from jaxlm import tokenizer

    path = tokenizer.train_for_config(cfg, fv.output)
    return {"tokenizer": path, "vocab_size": tokenizer.Tokenizer(path).vocab_size}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if len(argv) >= 2 else 2
    words = 2 if argv[1] in ("data", "tokenizer") and len(argv) > 2 else 1
    command = " ".join(argv[1 : 1 + words])
    rest = ["jaxlm " + command, *argv[1 + words :]]
    from jaxlm import datasets, tokenizer

    try:
        match command:
            case "smoke":
                result = _smoke(rest)
            case "params":
                result = _params(rest)
            case "data prepare":
                result = _data_prepare(rest)
            case "data bench":
                result = _data_bench(rest)
            case "tokenizer train":
                result = _tokenizer_train(rest)
            case _:
                raise UsageError(
                    f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}"
                )
    except (config_lib.ConfigError, UsageError, datasets.DataError, tokenizer.TokenizerError) as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

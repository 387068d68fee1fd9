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
}

USAGE = "usage: jaxlm <command> --config=PATH [--config.group.key=value ...]\n\ncommands:\n" + "".join(
    f"  {name:8s} {text}\n" for name, text in COMMANDS.items()
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if len(argv) >= 2 else 2
    command, rest = argv[1], ["jaxlm " + argv[1], *argv[2:]]
    try:
        match command:
            case "smoke":
                result = _smoke(rest)
            case "params":
                result = _params(rest)
            case _:
                raise UsageError(
                    f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}"
                )
    except (config_lib.ConfigError, UsageError) as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every `jaxlm` command shares: its usage error, flag parsing, and the common flags.

Commands live in cli.py (training, data, tooling) and cli_models.py (using a trained model);
both parse their flags here, so an error reads the same everywhere.
"""

from __future__ import annotations

from absl import flags

from jaxlm import config as config_lib


class UsageError(Exception):
    pass


class DoesNotFit(Exception):
    """`jaxlm aot`: the report is printed as usual, then the message, and the exit code is 1."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def parse(argv: list[str], *, config: bool, define=None):
    """Parse argv into a private FlagValues: the config (when `config`) and the extra flags."""
    fv = flags.FlagValues()
    if config:
        config_lib.define_config_flag(fv, argv)
    if define:
        define(fv)
    if config:
        return config_lib.parse_flags(fv, argv), fv
    try:
        positional = fv(argv)[1:]
    except flags.Error as e:
        raise UsageError(config_lib.one_line(str(e))) from None
    if positional:
        raise UsageError(f"unexpected argument '{positional[0]}' (flags look like --name=value)")
    return None, fv


def workdir_flag(fv):
    flags.DEFINE_string("workdir", None, "run directory (config, checkpoints, metrics)", flag_values=fv)


def need_workdir(fv) -> str:
    if not fv.workdir:
        raise UsageError("missing --workdir=DIR")
    return fv.workdir


def existing_workdir(fv) -> str:
    from jaxlm import paths

    workdir = need_workdir(fv)
    if not paths.isdir(workdir):
        raise UsageError(f"workdir '{workdir}' does not exist")
    return workdir


def distributed_flags(fv):
    workdir_flag(fv)
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "processes in this run (1 alone: join anyway, "
                         "so sums go through gloo as in multi-process runs)", flag_values=fv,
                         lower_bound=1)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv, lower_bound=0)
    flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes to join",
                         flag_values=fv, lower_bound=1)


def quantize_flag(fv):
    flags.DEFINE_string("quantize", "none", "weights: none (as stored) or int8 (weight-only, "
                        "per-channel)", flag_values=fv)


def quantize_kind(fv) -> str:
    from jaxlm import quantize

    try:
        return quantize.check_kind(fv.quantize)
    except quantize.QuantizeError as e:
        raise UsageError(f"--quantize: {e}") from None


def model_flags(fv, *, processes: bool = False) -> None:
    """--workdir=DIR | --model=HF_DIR, --step and --mesh: which trained model a command uses
    (`processes`: also the multi-process flags)."""
    (distributed_flags if processes else workdir_flag)(fv)
    flags.DEFINE_string("model", None, "a HF Llama directory (instead of --workdir)", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default: the latest)",
                         flag_values=fv)
    flags.DEFINE_enum("mesh", "one", ["one", "config"], "one device, or the config's mesh over "
                      "all devices (pipeline stages folded into data)", flag_values=fv)


def load_model(fv, kind: str = "none"):
    """(path, LM) from the flags of `model_flags`."""
    if (fv.workdir is None) == (fv.model is None):
        raise UsageError("give exactly one of --workdir=DIR (a jaxlm run) or --model=HF_DIR")
    import jaxlm

    path = existing_workdir(fv) if fv.workdir else fv.model
    return path, jaxlm.load(path, step=fv.step if fv.workdir else None, quantize=kind,
                            mesh=None if fv.mesh == "one" else "config")


def join_processes(fv) -> None:
    """Join the run's other processes (the flags of `distributed_flags`), if any."""
    from jaxlm import distributed

    try:
        distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id,
                               fv.distributed_timeout, fv.workdir)
    except ValueError as e:
        raise UsageError(str(e)) from None

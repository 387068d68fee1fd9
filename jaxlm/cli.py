"""`jaxlm <command>`: the console entry point.

Every command takes `--config=PATH` plus `--config.group.key=value` overrides. Output meant for
programs is one JSON object on the last line of stdout. A bad flag or config value ends with a
one-line `jaxlm: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from jaxlm import config as config_lib

COMMANDS = {
    "train": "train a config in --workdir, resuming from its latest checkpoint",
    "eval": "validation loss and perplexity of a workdir's checkpoint (--step, default latest)",
    "generate": "generate text from a workdir (--workdir) or a HF Llama directory (--model)",
    "bench": "time the train step (tokens/s, MFU) or, --mode=generate, prefill and decode tokens/s",
    "aot": "compile the train step for --devices=N or a TPU --topology: bytes per device, fits",
    "plot": "write a PNG of loss and learning rate against step from a workdir's metrics",
    "params": "parameter count of a config, from abstract shapes (nothing allocated)",
    "data prepare": "prepare the config's dataset (TFDS array_record) and print its summary",
    "data bench": "tokens/s of the host input pipeline (tokenize + pack + batch)",
    "tokenizer train": "train the config's sentencepiece tokenizer on its train split",
}

USAGE = (
    "usage: jaxlm <command> [--config=PATH] [--config.group.key=value ...] [--workdir=DIR]\n\n"
    "commands:\n" + "".join(f"  {name:16s} {text}\n" for name, text in COMMANDS.items())
)


class UsageError(Exception):
    pass


class DoesNotFit(Exception):
    """`jaxlm aot`: the report is printed as usual, then the message, and the exit code is 1."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _flags(argv: list[str], *, config: bool, define=None):
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


def _workdir_flag(fv):
    flags.DEFINE_string("workdir", None, "run directory (config, checkpoints, metrics)", flag_values=fv)


def _need_workdir(fv) -> str:
    if not fv.workdir:
        raise UsageError("missing --workdir=DIR")
    return fv.workdir


def _existing_workdir(fv) -> str:
    import os

    workdir = _need_workdir(fv)
    if not os.path.isdir(workdir):
        raise UsageError(f"workdir '{workdir}' does not exist")
    return workdir


def _distributed_flags(fv):
    _workdir_flag(fv)
    flags.DEFINE_string("coordinator", None, "host:port of process 0, for multi-process runs",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "processes in this run", flag_values=fv,
                         lower_bound=1)
    flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv, lower_bound=0)
    flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes to join",
                         flag_values=fv, lower_bound=1)


def _train(argv: list[str]) -> dict:
    cfg, fv = _flags(argv, config=True, define=_distributed_flags)
    workdir = _need_workdir(fv)
    from jaxlm import distributed, train

    try:
        distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id,
                               fv.distributed_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None

    result = train.train(cfg, workdir)
    if "eval_loss" in result:
        print(f"validation loss {result['eval_loss']:.4f} nats/token, perplexity "
              f"{result['eval_perplexity']:.2f} ({result['eval_tokens']} tokens) at step {result['step']}")
    return result


def _eval(argv: list[str]) -> dict:
    def define(fv):
        _workdir_flag(fv)
        flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
        _quantize_flag(fv)

    _, fv = _flags(argv, config=False, define=define)
    workdir = _existing_workdir(fv)
    from jaxlm import api

    return api.evaluate_workdir(workdir, fv.step, _quantize(fv))


def _quantize_flag(fv):
    flags.DEFINE_string("quantize", "none", "weights: none (as stored) or int8 (weight-only, "
                        "per-channel)", flag_values=fv)


def _quantize(fv) -> str:
    from jaxlm import quantize

    try:
        return quantize.check_kind(fv.quantize)
    except quantize.QuantizeError as e:
        raise UsageError(f"--quantize: {e}") from None


def _generate(argv: list[str]) -> dict:
    def define(fv):
        _workdir_flag(fv)
        flags.DEFINE_string("model", None, "a HF Llama directory (instead of --workdir)", flag_values=fv)
        flags.DEFINE_integer("step", None, "checkpoint step of --workdir (default: the latest)",
                             flag_values=fv)
        flags.DEFINE_string("prompt", None, "one prompt; its text streams as it is generated",
                            flag_values=fv)
        flags.DEFINE_string("prompts", None, "a JSONL file of {\"prompt\": ...} lines, generated "
                            "as one batch", flag_values=fv)
        flags.DEFINE_integer("max_new_tokens", 128, "new tokens per prompt, at most", flag_values=fv)
        flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
        flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens; 0 = off", flag_values=fv)
        flags.DEFINE_float("top_p", 1.0, "keep the most likely tokens up to this probability",
                           flag_values=fv)
        flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
        flags.DEFINE_multi_string("stop", [], "stop at this string (repeatable)", flag_values=fv)
        flags.DEFINE_enum("mesh", "one", ["one", "config"], "one device, or the config's mesh over "
                          "all devices (pipeline stages folded into data)", flag_values=fv)
        _quantize_flag(fv)

    _, fv = _flags(argv, config=False, define=define)
    if (fv.workdir is None) == (fv.model is None):
        raise UsageError("give exactly one of --workdir=DIR (a jaxlm run) or --model=HF_DIR")
    if (fv.prompt is None) == (fv.prompts is None):
        raise UsageError("give exactly one of --prompt=TEXT or --prompts=FILE.jsonl")
    prompts = [fv.prompt] if fv.prompt is not None else _read_prompts(fv.prompts)
    kind = _quantize(fv)
    import jaxlm

    path = _existing_workdir(fv) if fv.workdir else fv.model
    lm = jaxlm.load(path, step=fv.step if fv.workdir else None, quantize=kind,
                    mesh=None if fv.mesh == "one" else "config")
    stream = None
    if fv.prompt is not None and lm.tokenizer is not None:
        print(fv.prompt, end="", flush=True)
        stream = lambda piece: print(piece, end="", flush=True)  # noqa: E731
    out = lm.generate(prompts, max_new_tokens=fv.max_new_tokens, temperature=fv.temperature,
                      top_k=fv.top_k, top_p=fv.top_p, seed=fv.seed, stop=fv.stop or None,
                      stream=stream)
    if stream is not None:
        print(flush=True)
    stats = out.stats
    return {
        "outputs": [{"prompt": p, "text": out.texts[i] if out.texts else None, "ids": out.ids[i],
                     "finish_reason": out.finish_reasons[i]} for i, p in enumerate(prompts)],
        "prefill_tokens_per_sec": round(stats["prefill_tokens_per_sec"], 1),
        "decode_tokens_per_sec": round(stats["decode_tokens_per_sec"], 1),
        "quantize": kind,
    }


def _read_prompts(path: str) -> list:
    import os

    if not os.path.isfile(path):
        raise UsageError(f"--prompts file '{path}' not found")
    prompts = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
            if not (isinstance(prompt, str) or (isinstance(prompt, list)
                                                and all(isinstance(t, int) for t in prompt))):
                raise UsageError(f"{path}:{n}: \"prompt\" must be a string or a list of token ids")
            prompts.append(prompt)
    if not prompts:
        raise UsageError(f"--prompts file '{path}' has no prompts")
    return prompts


def _bench(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_enum("mode", "train", ["train", "generate"], "what to time", flag_values=fv)
        flags.DEFINE_integer("steps", 10, "train: timed steps", flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("warmup", 2, "train: untimed steps after compiling", flag_values=fv,
                             lower_bound=0)
        flags.DEFINE_integer("batch", 1, "generate: prompts per batch", flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("prompt_len", 128, "generate: tokens per prompt", flag_values=fv,
                             lower_bound=1)
        flags.DEFINE_integer("new_tokens", 128, "generate: tokens generated per prompt",
                             flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("repeats", 3, "generate: timed runs (medians reported)",
                             flag_values=fv, lower_bound=1)
        _quantize_flag(fv)

    cfg, fv = _flags(argv, config=True, define=define)
    if fv.mode == "generate":
        from jaxlm import api

        return api.bench_generate(cfg, fv.batch, fv.prompt_len, fv.new_tokens, _quantize(fv),
                                  fv.repeats)
    from jaxlm import train

    return train.bench(cfg, fv.steps, fv.warmup)


def _aot(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_integer("devices", None, "compile for N fake CPU devices", flag_values=fv,
                             lower_bound=1)
        flags.DEFINE_string("topology", None, "compile for a TPU topology, e.g. v5p:2x2x1 (needs "
                            "the tpu extra)", flag_values=fv)
        flags.DEFINE_string("device", None, "device whose memory to check against (h100, v5p, ...; "
                            "default: the topology's chip)", flag_values=fv)
        flags.DEFINE_float("memory_gib", None, "device memory in GiB (instead of --device)",
                           flag_values=fv)
        flags.DEFINE_float("headroom", 0.1, "share of device memory kept free for the runtime",
                           flag_values=fv, lower_bound=0.0, upper_bound=0.9)
        flags.DEFINE_enum("mode", "train", ["train", "generate"], "compile the train step, or "
                          "generation (params + KV cache, prefill and decode)", flag_values=fv)
        flags.DEFINE_integer("batch", 8, "generate: rows", flag_values=fv, lower_bound=1)
        flags.DEFINE_integer("seq_len", None, "generate: prompt + new tokens (default: "
                             "data.seq_len)", flag_values=fv, lower_bound=2)
        flags.DEFINE_integer("new_tokens", 128, "generate: new tokens", flag_values=fv, lower_bound=1)
        _quantize_flag(fv)

    cfg, fv = _flags(argv, config=True, define=define)
    if (fv.devices is None) == (fv.topology is None):
        raise UsageError("give exactly one of --devices=N (fake CPU devices) or --topology=NAME (TPU)")
    import os

    import jax

    from jaxlm import aot

    # Everything compiles on the host: fake CPU devices, or libtpu's compiler with no TPU attached.
    jax.config.update("jax_platforms", "cpu")
    if fv.devices is not None:
        xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(xla_flags + [
            f"--xla_force_host_platform_device_count={fv.devices}"])
    try:
        if fv.devices is not None:
            devices = aot.fake_cpu_devices(fv.devices)
            if fv.device is None and fv.memory_gib is None:
                raise UsageError("--devices=N needs --device (h100, a100, ...) or --memory_gib to "
                                 "check against")
            target = f"{fv.devices} fake CPU devices"
        else:
            devices = aot.tpu_devices(fv.topology)
            target = f"TPU {fv.topology} ({len(devices)} x {devices[0].device_kind})"
        name, memory = aot.memory_arg(fv.device, fv.memory_gib, devices)
    except aot.AotError as e:
        raise UsageError(str(e)) from None
    if fv.mode == "generate":
        report = aot.check_generate(cfg, devices, memory, fv.headroom, f"{target} as {name}",
                                    fv.batch, fv.seq_len or cfg.data.seq_len, fv.new_tokens,
                                    _quantize(fv))
        print(aot.describe_generate(report), flush=True)
        if not report["fits"]:
            raise DoesNotFit(f"does not fit: {report['gib_per_device']} GiB per device, "
                             f"{report['usable_bytes'] / 2**30:.2f} GiB usable; try int8 weights "
                             "(--quantize=int8), fewer rows (--batch), a shorter --seq_len or more "
                             "devices (mesh.fsdp / mesh.tensor)", report)
        return report
    report = aot.check(cfg, devices, memory, fv.headroom, f"{target} as {name}")
    print(aot.describe(report), flush=True)
    if not report["fits"]:
        raise DoesNotFit(aot.not_fitting_message(cfg, report), report)
    return report


def _plot(argv: list[str]) -> dict:
    def define(fv):
        _workdir_flag(fv)
        flags.DEFINE_string("output", None, "PNG path (default: WORKDIR/training.png)", flag_values=fv)

    _, fv = _flags(argv, config=False, define=define)
    workdir = _existing_workdir(fv)
    from jaxlm import plot

    return {"plot": plot.plot(workdir, fv.output)}


def _params(argv: list[str]) -> dict:
    cfg, _ = _flags(argv, config=True)
    from jaxlm import model

    return {"num_params": model.num_params(cfg.model), "formula": model.num_params_formula(cfg.model)}


def _data_prepare(argv: list[str]) -> dict:
    cfg, _ = _flags(argv, config=True)
    from jaxlm import datasets

    return datasets.prepare(cfg.data)


def _data_bench(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_integer("batches", 50, "batches to time", flag_values=fv, lower_bound=1)

    cfg, fv = _flags(argv, config=True, define=define)
    from jaxlm import data

    return data.bench(cfg, fv.batches)


def _tokenizer_train(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_string("output", None, "where to write the model (default: the dataset's "
                            "tokenizer path under data.data_dir)", flag_values=fv)

    cfg, fv = _flags(argv, config=True, define=define)
    from jaxlm import tokenizer

    path = tokenizer.train_for_config(cfg, fv.output)
    return {"tokenizer": path, "vocab_size": tokenizer.Tokenizer(path).vocab_size}


HANDLERS = {
    "train": _train,
    "eval": _eval,
    "generate": _generate,
    "bench": _bench,
    "aot": _aot,
    "plot": _plot,
    "params": _params,
    "data prepare": _data_prepare,
    "data bench": _data_bench,
    "tokenizer train": _tokenizer_train,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if len(argv) >= 2 else 2
    words = 2 if argv[1] in ("data", "tokenizer") and len(argv) > 2 else 1
    command = " ".join(argv[1 : 1 + words])
    rest = ["jaxlm " + command, *argv[1 + words :]]
    if command in COMMANDS and any(a in ("-h", "--help", "--helpfull") for a in rest[1:]):
        print(f"jaxlm {command}: {COMMANDS[command]}\n\n{USAGE}", end="")
        return 0
    from jaxlm import convert, datasets, generate, tokenizer, train

    try:
        if command not in HANDLERS:
            raise UsageError(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
        result = HANDLERS[command](rest)
    except (config_lib.ConfigError, UsageError, datasets.DataError, tokenizer.TokenizerError,
            convert.ConversionError, generate.GenerateError, FileNotFoundError) as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except train.TrainingError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 1
    except DoesNotFit as e:
        print(json.dumps(e.report), flush=True)
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`jaxlm <command>`: the console entry point.

Every command takes `--config=PATH` plus `--config.group.key=value` overrides. Output meant for
programs is one JSON object on the last line of stdout. A bad flag or config value ends with a
one-line `jaxlm: error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from jaxlm import cli_models
from jaxlm import config as config_lib
from jaxlm.cli_common import (
    DoesNotFit,
    UsageError,
    distributed_flags,
    existing_workdir,
    join_processes,
    need_workdir,
    parse,
    quantize_flag,
    quantize_kind,
    workdir_flag,
)

COMMANDS = {
    "train": "train a config in --workdir, resuming from its latest checkpoint",
    "eval": "validation loss, perplexity, bits per byte of a workdir's checkpoint (--step, "
            "--files=GLOB)",
    "generate": "generate text from a workdir (--workdir) or a HF Llama directory (--model)",
    "evaluate": "run lm-eval tasks (--tasks=a,b) in process, offline, on a workdir or --model",
    "bench": "time the train step (tokens/s, MFU) or, --mode=generate, prefill and decode tokens/s",
    "aot": "compile the train step for --devices=N or a TPU --topology: bytes per device, fits",
    "plot": "write a PNG of loss and learning rate against step from a workdir's metrics",
    "params": "parameter count of a config, from abstract shapes (nothing allocated)",
    "data prepare": "prepare the config's dataset (TFDS array_record, SFT or classify rows), print a summary",
    "data bench": "tokens/s of the host input pipeline (tokenize + pack + batch)",
    "tokenizer train": "train the config's sentencepiece tokenizer on its train split",
    "export": "write a workdir (--workdir) or HF directory (--model) as --format=hf into --out",
    "attention": "draw a model's attention maps for --text as a PNG; print each head's entropy",
}

USAGE = (
    "usage: jaxlm <command> [--config=PATH] [--config.group.key=value ...] [--workdir=DIR]\n\n"
    "commands:\n" + "".join(f"  {name:16s} {text}\n" for name, text in COMMANDS.items())
)


def _train(argv: list[str]) -> dict:
    cfg, fv = parse(argv, config=True, define=distributed_flags)
    workdir = need_workdir(fv)
    join_processes(fv)
    from jaxlm import train

    result = train.train(cfg, workdir)
    if "eval_accuracy" in result:
        print(f"validation accuracy {result['eval_accuracy']:.4f}, macro F1 "
              f"{result['eval_macro_f1']:.4f}, loss {result['eval_loss']:.4f} nats/example "
              f"({result['eval_examples']} examples) at step {result['step']}")
    elif "eval_loss" in result:
        print(f"validation loss {result['eval_loss']:.4f} nats/token, perplexity "
              f"{result['eval_perplexity']:.2f} ({result['eval_tokens']} tokens) at step {result['step']}")
    import jax

    from jaxlm import evaluation, sft

    # The gzip/xz reference, once, and not when a pre-emption notice asks for a quick exit; not
    # for SFT, whose validation loss covers completions only.
    if ("eval_bits_per_byte" in result and not result["stopped_by_sigterm"]
            and jax.process_index() == 0 and cfg.data.dataset not in sft.DATASETS
            and not cfg.model.num_labels):
        line, reference = evaluation.reference_line(cfg, result)
        print(line, flush=True)
        result["compression"] = reference
    return result


def _eval(argv: list[str]) -> dict:
    def define(fv):
        workdir_flag(fv)
        flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", flag_values=fv)
        flags.DEFINE_string("files", None, "evaluate on the text files this glob matches (each a "
                            "document) instead of the validation split", flag_values=fv)
        quantize_flag(fv)

    _, fv = parse(argv, config=False, define=define)
    workdir = existing_workdir(fv)
    files = None if fv.files is None else _glob_files(fv.files)
    from jaxlm import api

    return api.evaluate_workdir(workdir, fv.step, quantize_kind(fv), files)


def _glob_files(pattern: str) -> list[str]:
    import glob
    import os

    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not files:
        raise UsageError(f"--files={pattern} matches no files")
    return files


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
        quantize_flag(fv)

    cfg, fv = parse(argv, config=True, define=define)
    from jaxlm import finetune

    cfg, _ = finetune.resolve(cfg)  # train.init_from: the source's model
    if fv.mode == "generate":
        from jaxlm import api

        return api.bench_generate(cfg, fv.batch, fv.prompt_len, fv.new_tokens, quantize_kind(fv),
                                  fv.repeats)
    from jaxlm import bench

    return bench.bench(cfg, fv.steps, fv.warmup)


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
        quantize_flag(fv)

    cfg, fv = parse(argv, config=True, define=define)
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
    from jaxlm import finetune

    cfg, _ = finetune.resolve(cfg)  # train.init_from: the source's model (after the devices exist)
    if fv.mode == "generate":
        report = aot.check_generate(cfg, devices, memory, fv.headroom, f"{target} as {name}",
                                    fv.batch, fv.seq_len or cfg.data.seq_len, fv.new_tokens,
                                    quantize_kind(fv))
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
        workdir_flag(fv)
        flags.DEFINE_string("output", None, "PNG path (default: WORKDIR/training.png)", flag_values=fv)

    _, fv = parse(argv, config=False, define=define)
    workdir = existing_workdir(fv)
    from jaxlm import plot

    return {"plot": plot.plot(workdir, fv.output)}


def _params(argv: list[str]) -> dict:
    cfg, _ = parse(argv, config=True)
    from jaxlm import finetune, model

    cfg, _ = finetune.resolve(cfg)
    return {"num_params": model.num_params(cfg.model), "formula": model.num_params_formula(cfg.model)}


def _data_prepare(argv: list[str]) -> dict:
    cfg, _ = parse(argv, config=True)
    from jaxlm import classify, datasets, finetune, sft, tasks, tokenizer

    if cfg.data.dataset in sft.DATASETS + classify.DATASETS:  # with the run's tokenizer
        cfg, _ = finetune.resolve(cfg)
        tok = tokenizer.for_config(cfg)
        if cfg.data.dataset in classify.DATASETS:
            summary = classify.prepare(cfg, tok)
            print(classify.summary_line(summary), flush=True)
        else:
            summary = sft.prepare(cfg.data, tok)
            print(sft.summary_line(summary), flush=True)
        return summary
    summary = datasets.prepare(cfg.data)
    if cfg.data.dataset == datasets.STDLIB:  # the offline lm-eval tasks come from its validation split
        summary["tasks"] = tasks.write(cfg.data)
    return summary


def _data_bench(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_integer("batches", 50, "batches to time", flag_values=fv, lower_bound=1)

    cfg, fv = parse(argv, config=True, define=define)
    from jaxlm import data

    return data.bench(cfg, fv.batches)


def _tokenizer_train(argv: list[str]) -> dict:
    def define(fv):
        flags.DEFINE_string("output", None, "where to write the model (default: the dataset's "
                            "tokenizer path under data.data_dir)", flag_values=fv)

    cfg, fv = parse(argv, config=True, define=define)
    from jaxlm import tokenizer

    path = tokenizer.train_for_config(cfg, fv.output)
    return {"tokenizer": path, "vocab_size": tokenizer.Tokenizer(path).vocab_size}


HANDLERS = {
    "train": _train,
    "eval": _eval,
    "generate": cli_models.generate,
    "evaluate": cli_models.evaluate,
    "bench": _bench,
    "aot": _aot,
    "plot": _plot,
    "params": _params,
    "data prepare": _data_prepare,
    "data bench": _data_bench,
    "tokenizer train": _tokenizer_train,
    "export": cli_models.export,
    "attention": cli_models.attention,
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
    from jaxlm import checkpoint, compile_cache, convert, datasets, generate, lora, tokenizer, train

    if command not in ("aot", "bench"):  # these two report compile seconds
        compile_cache.enable()
    try:
        if command not in HANDLERS:
            raise UsageError(f"unknown command {command!r}; valid commands: {', '.join(COMMANDS)}")
        result = HANDLERS[command](rest)
    except (config_lib.ConfigError, UsageError, datasets.DataError, tokenizer.TokenizerError,
            convert.ConversionError, generate.GenerateError, lora.LoraError,
            FileNotFoundError) as e:
        print(f"jaxlm: error: {e}", file=sys.stderr)
        return 2
    except (train.TrainingError, checkpoint.Damaged, checkpoint.Mismatch,
            checkpoint.SaveFailed) as e:
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

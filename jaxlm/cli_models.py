"""The commands that use a trained model: `generate`, `evaluate` (lm-eval tasks) and `export`.

Each takes --workdir=DIR (a jaxlm run; its latest or --step checkpoint) or --model=HF_DIR, and
prints one JSON object as the last line of stdout (cli.py prints it).
"""

from __future__ import annotations

import json

from absl import flags

from jaxlm.cli_common import (
    UsageError,
    join_processes,
    load_model,
    model_flags,
    parse,
    quantize_flag,
    quantize_kind,
)


def generate(argv: list[str]) -> dict:
    def define(fv):
        model_flags(fv)
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
        quantize_flag(fv)

    _, fv = parse(argv, config=False, define=define)
    if (fv.prompt is None) == (fv.prompts is None):
        raise UsageError("give exactly one of --prompt=TEXT or --prompts=FILE.jsonl")
    prompts = [fv.prompt] if fv.prompt is not None else read_prompts(fv.prompts)
    kind = quantize_kind(fv)
    _, lm = load_model(fv, kind)
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


def evaluate(argv: list[str]) -> dict:
    def define(fv):
        model_flags(fv, processes=True)
        flags.DEFINE_list("tasks", [], "lm-eval task names, e.g. stdlib_mc,stdlib_ppl", flag_values=fv)
        flags.DEFINE_multi_string("include_path", [], "a folder of your own task YAML files "
                                  "(repeatable)", flag_values=fv)
        flags.DEFINE_integer("num_fewshot", None, "few-shot examples (default: each task's own)",
                             flag_values=fv, lower_bound=0)
        flags.DEFINE_float("limit", None, "examples per task (a count, or a share when < 1)",
                           flag_values=fv, lower_bound=0)
        flags.DEFINE_string("output", None, "write lm-eval's full results JSON here", flag_values=fv)
        quantize_flag(fv)

    _, fv = parse(argv, config=False, define=define)
    if not fv.tasks:
        raise UsageError("missing --tasks=a,b (e.g. stdlib_mc,stdlib_ppl,stdlib_complete)")
    kind = quantize_kind(fv)
    limit = None if fv.limit is None else (int(fv.limit) if fv.limit >= 1 else fv.limit)
    join_processes(fv)
    from jaxlm import harness

    path, lm = load_model(fv, kind)
    try:
        results = harness.evaluate(lm, fv.tasks, include_path=fv.include_path,
                                   num_fewshot=fv.num_fewshot, limit=limit)
    except harness.HarnessError as e:
        raise UsageError(str(e)) from None
    return harness.report(results, path, lm.step, fv.output)


def read_prompts(path: str) -> list:
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


EXPORT_FORMATS = ("hf", "peft")


def export(argv: list[str]) -> dict:
    def define(fv):
        model_flags(fv)
        flags.DEFINE_string("format", "hf", "hf: a transformers Llama directory with its "
                            "tokenizer (a LoRA run: merged); peft: a LoRA run's adapter",
                            flag_values=fv)
        flags.DEFINE_string("out", None, "directory to write", flag_values=fv)
        flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "weights dtype "
                          "(default: the parameters' dtype)", flag_values=fv)

    _, fv = parse(argv, config=False, define=define)
    if fv.format not in EXPORT_FORMATS:
        raise UsageError(f"--format: unknown format {fv.format!r}; valid: {', '.join(EXPORT_FORMATS)}")
    if not fv.out:
        raise UsageError("missing --out=DIR")
    import os

    from jaxlm import paths

    if fv.format == "peft" and not fv.workdir:
        raise UsageError("--format=peft exports a LoRA run: pass --workdir=DIR")
    with paths.writing_folder(fv.out) as out:  # gs://: written here, then uploaded
        if fv.format == "peft":
            from jaxlm import lora, lora_runs

            try:
                lora_runs.save_peft(fv.workdir, out, fv.step)
            except lora.LoraError as e:
                raise UsageError(str(e)) from None
        else:
            _, lm = load_model(fv)
            lm.save_hf(out, fv.dtype)
        files = sorted(os.listdir(out))
    return {"format": fv.format, "out": fv.out, "files": files}


def attention(argv: list[str]) -> dict:
    def define(fv):
        model_flags(fv)
        flags.DEFINE_string("text", None, "the text whose attention is drawn", flag_values=fv)
        flags.DEFINE_integer("layer", None, "one layer (with --head: one map); default every "
                             "layer, every head", flag_values=fv)
        flags.DEFINE_integer("head", None, "one head of --layer", flag_values=fv)
        flags.DEFINE_string("out", None, "the PNG to write", flag_values=fv)
        flags.DEFINE_string("json", None, "also write the maps, pieces and entropies as JSON here",
                            flag_values=fv)

    _, fv = parse(argv, config=False, define=define)
    if fv.text is None:
        raise UsageError("missing --text=TEXT")
    from jaxlm import attention_maps

    _, lm = load_model(fv)
    try:
        result = attention_maps.command(lm, fv.text, fv.layer, fv.head, fv.out)
    except attention_maps.MapsError as e:
        raise UsageError(str(e)) from None
    print(attention_maps.entropy_table(result), flush=True)
    maps = result.pop("maps")
    if fv.json:
        from jaxlm import paths

        paths.write_text(fv.json, json.dumps({**result, "maps": maps.round(6).tolist()}))
        result["json"] = fv.json
    return result

"""Time transformers' greedy `generate` on CPU, as a peer for `jaxlm bench --mode=generate`.

The model and prompts are the ones jaxlm's benchmark uses (`api.bench_generate`): a jaxlm model
initialized from `cfg.train.seed`, written out with `LM.save_hf` and loaded back as a float32
`LlamaForCausalLM` (sdpa attention), and `batch` random prompts of `prompt_len` tokens drawn with
`np.random.default_rng(cfg.train.seed)`. EOS is off and `min_new_tokens == max_new_tokens`, so every
row makes exactly `new_tokens` tokens, as in jaxlm's no-EOS benchmark.

Reported (medians over `--repeats` timed runs, after one untimed warm-up):
  prefill_tokens_per_sec  batch * prompt_len / time of one forward of the prompt batch (logits for
                          the last position only, as both generate's and jaxlm's prefill compute)
  decode_tokens_per_sec   batch * (new_tokens - 1) / (generate time - prefill time); the first new
                          token comes out of the prefill, as jaxlm counts it
  total_tokens_per_sec    batch * new_tokens / generate time

Pairs with (same B, prompt_len, new_tokens):
    jaxlm bench --mode=generate --config=configs/llama_125m.py --config.model.dtype=float32 --batch=B

Run:
    .venv/bin/python tools/bench_hf_generate.py --config=configs/llama_125m.py \\
        --override model.dtype=float32 --batch=1 --prompt_len=128 --new_tokens=128 --threads=2

The last line of stdout is one JSON object. Time on an otherwise idle machine: with --threads equal
to the core count, torch's OpenMP workers slow down many-fold when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
import transformers

from jaxlm import api, config, model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--config", default="configs/llama_125m.py", help="jaxlm config file")
    p.add_argument("--override", action="append", default=[],
                   help="group.key=value, e.g. model.dtype=float32 (repeatable)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt_len", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--workdir", default=None, help="where the HF model directory goes (default: temp)")
    return p.parse_args()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.load(args.config, args.override)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_hf_")

    # The same weights and prompts as api.bench_generate.
    lm = api.LM(cfg, model.init(cfg.model, cfg.train.seed), eos_ids=[])
    lm.save_hf(workdir)
    prompts = np.random.default_rng(cfg.train.seed).integers(
        4, cfg.model.vocab_size, (args.batch, args.prompt_len)).tolist()
    del lm

    attn = "sdpa"
    hf = transformers.LlamaForCausalLM.from_pretrained(
        workdir, dtype=torch.float32, attn_implementation=attn).eval()
    print(f"loaded {workdir} with attn_implementation={attn}, dtype={hf.dtype}", flush=True)

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def prefill():
        hf(input_ids=ids, attention_mask=mask, logits_to_keep=1)

    def generate():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        assert out.shape == (args.batch, args.prompt_len + n), out.shape

    with torch.inference_mode():
        prefill()
        generate()  # warm-up, untimed
        prefill_runs = [timed(prefill) for _ in range(args.repeats)]
        generate_runs = [timed(generate) for _ in range(args.repeats)]

    prefill_s = statistics.median(prefill_runs)
    generate_s = statistics.median(generate_runs)
    decode_s = max(generate_s - prefill_s, 1e-9)
    print(json.dumps({
        "peer": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": n, "attn_implementation": hf.config._attn_implementation,
        "prefill_tokens_per_sec": round(args.batch * args.prompt_len / prefill_s, 1),
        "decode_tokens_per_sec": round(args.batch * (n - 1) / decode_s, 1),
        "total_tokens_per_sec": round(args.batch * n / generate_s, 1),
        "generate_seconds_runs": [round(t, 4) for t in generate_runs],
    }))


if __name__ == "__main__":
    main()

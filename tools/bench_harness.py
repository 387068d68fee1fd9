"""Requests per second of lm-eval tasks: jaxlm's harness against lm-eval's own `hf` backend.

    python tools/bench_harness.py --workdir=runs/tiny --tasks=stdlib_mc,stdlib_ppl --limit=200

The workdir's model is exported with `save_hf` (weights + tokenizer) to a temporary directory,
which lm-eval's `hf` model (torch, CPU, float32) loads; jaxlm's harness runs the loaded LM in
process. Each task runs once untimed on each side (jaxlm compiles, torch warms up), then timed
`--repeats` times; the median is reported. Requests are what lm-eval hands the model: 4 per
multiple-choice document, one per rolling document (its windows are not counted).
Two times per run: `seconds`, the whole `simple_evaluate` call (what a user waits for, task
building and metrics included, the same work on both sides), and `model_seconds`, the time
inside the backend's own request methods (`loglikelihood`, `loglikelihood_rolling`,
`generate_until`, each with its tokenization), which is where the two backends differ.
Prints one JSON line per task and backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import jaxlm
from jaxlm import harness  # sets the offline switches before lm_eval is imported

REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def timed_methods(model, spent: list[float]):
    """Wrap the model's request methods so that their time adds up in spent[0]."""
    for name in REQUEST_METHODS:
        method = getattr(model, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(model, name, timed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tasks", default="stdlib_mc,stdlib_ppl")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32, help="lm-eval hf batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    lm = jaxlm.load(args.workdir)
    export = tempfile.mkdtemp(prefix="jaxlm-bench-")
    lm.save_hf(export)
    manager = harness.task_manager(None, lm.config.data, args.tasks.split(","))
    for task in args.tasks.split(","):
        # Rolling requests: the hf backend would also score a BOS it adds (see harness.py).
        hf = HFLM(pretrained=export, backend="causal", device="cpu", batch_size=args.batch_size,
                  dtype="float32", max_length=lm.config.model.max_seq_len,
                  add_bos_token=task != "stdlib_ppl")
        ours = harness.HarnessLM(lm)
        for name, model in (("jaxlm", ours), ("lm-eval hf", hf)):
            times, model_times, spent = [], [], [0.0]
            timed_methods(model, spent)
            for n in range(args.repeats + 1):
                spent[0] = 0.0
                start = time.perf_counter()
                results = harness.lm_eval.simple_evaluate(
                    model=model, tasks=[task], task_manager=manager, limit=args.limit,
                    bootstrap_iters=0, log_samples=False, torch_random_seed=None)
                if n:
                    times.append(time.perf_counter() - start)
                    model_times.append(spent[0])
            if name == "jaxlm":
                requests = ours.requests_scored // (args.repeats + 1)
            seconds, model_seconds = statistics.median(times), statistics.median(model_times)
            print(json.dumps({"task": task, "backend": name, "requests": requests,
                              "seconds": round(seconds, 3),
                              "requests_per_sec": round(requests / seconds, 1),
                              "model_seconds": round(model_seconds, 3),
                              "model_requests_per_sec": round(requests / model_seconds, 1),
                              "metrics": harness.main_metrics(results)}), flush=True)


if __name__ == "__main__":
    main()

"""The table of docs/ablations.md from the runs of tools/ablation.sh.

    .venv/bin/python tools/ablation_table.py runs/ablation [--entropy_batches=16]

For each run (a workdir `<name>_s<seed>`): the final validation loss (nats/token) and bits per
byte from its metrics.jsonl (the whole held-out split, evaluated at the end of training), its
training tokens/s (the mean over the logged intervals; the runs shared one machine one after
another, so compare the bench figures in docs/ablations.md for overhead), and the mean attention
entropy of the final model on the first validation batches, computed the way the regulariser
computes it (mean over layers, heads and real query positions). Prints one Markdown row per
switch: seed values, then the two-seed mean.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

import jax
import numpy as np
from flax import nnx

import jaxlm
from jaxlm import data, sharding


def final_metrics(workdir: str) -> dict:
    evals, speeds = {}, []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval_bits_per_byte" in record:
                evals = record
            if "tokens_per_sec" in record:
                speeds.append(record["tokens_per_sec"])
    return {"loss": evals["eval_loss"], "bpb": evals["eval_bits_per_byte"],
            "tokens_per_sec": float(np.mean(speeds)) if speeds else float("nan")}


def mean_entropy(workdir: str, batches: int) -> float:
    lm = jaxlm.load(workdir)
    cfg = lm.config

    @jax.jit
    def entropy(params, batch):
        model = nnx.merge(lm.graphdef, params)
        _, (total, count) = model(batch["inputs"], batch["segment_ids"], batch["positions"],
                                  attention_entropy=True)
        return total, count

    total = count = 0.0
    with jax.set_mesh(lm.mesh), sharding.logical_rules(lm.rules):
        for i, batch in enumerate(data.eval_dataset(cfg, tok=lm.tokenizer)):
            if i == batches:
                break
            t, c = entropy(lm.params, {k: np.asarray(v) for k, v in batch.items()})
            total, count = total + float(t), count + float(c)
    return total / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--entropy_batches", type=int, default=16)
    args = parser.parse_args()
    rows = collections.defaultdict(dict)
    for name in sorted(os.listdir(args.root)):
        match = re.fullmatch(r"(.+)_s(\d+)", name)
        path = os.path.join(args.root, name)
        if not match or not os.path.isfile(os.path.join(path, "done")):
            continue
        result = final_metrics(path)
        result["entropy"] = mean_entropy(path, args.entropy_batches)
        rows[match.group(1)][int(match.group(2))] = result
        print(json.dumps({"run": name, **result}), flush=True)
    print("| run | val loss (nats/token) | bits per byte | tokens/s | mean attention entropy (nats) |")
    print("|---|---|---|---|---|")
    for name, seeds in rows.items():
        cells = []
        for key, fmt in (("loss", "{:.4f}"), ("bpb", "{:.4f}"), ("tokens_per_sec", "{:.0f}"),
                         ("entropy", "{:.3f}")):
            values = [seeds[s][key] for s in sorted(seeds)]
            cells.append(" / ".join(fmt.format(v) for v in values)
                         + (f" (mean {fmt.format(np.mean(values))})" if len(values) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

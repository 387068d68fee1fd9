"""`jaxlm plot`: loss (train and validation) and learning rate against step, as a PNG."""

from __future__ import annotations

import io
import json
import os

from jaxlm import paths


def plot(workdir: str, output: str | None = None) -> str:
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl in '{workdir}'")
    records = [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
    train = [(r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        raise FileNotFoundError(f"metrics.jsonl in '{workdir}' has no training steps yet")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1]})
    steps, losses, lrs = zip(*train, strict=True)
    ax_loss.plot(steps, losses, label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="validation loss")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, lrs, color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(os.path.basename(paths.resolve(workdir)))
    fig.tight_layout()
    output = output or paths.join(workdir, "training.png")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    paths.write_bytes(output, png.getvalue())
    return output

"""Evaluation: the jitted eval step, validation loss / perplexity / bits per byte, and the
compression reference that `jaxlm train` prints at the end.

Bits per byte is the model's code length per byte of text:

    eval_bits_per_byte = (nats summed over the weighted targets)
                         / (UTF-8 bytes of the text those targets stand for) / ln 2

Each target's bytes come from its piece (jaxlm/tokenizer.py `piece_bytes`: BOS/EOS/pad 0, a
byte-fallback piece 1, a normal piece the length of its text), carried by the validation
pipeline as `target_bytes`. Unlike loss per token it does not depend on the tokenizer, so runs
with different vocabularies compare, and it is on the same scale as gzip's or xz's output bits
per input byte.

This module runs no training and changes no data pipeline: train.py's loop calls `evaluate`
on its schedule, `jaxlm eval` (api.evaluate_workdir) calls it on a checkpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import attention, classify, data, datasets, objectives, paths, sharding
from jaxlm.config import Config, ConfigError

# Beyond this many bytes of validation text the gzip/xz reference is skipped: xz -9e runs at
# about 1 MB/s, and a big dataset's final line should not stall the end of training.
COMPRESS_MAX_BYTES = 32 * 2**20
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def make_eval_step(graphdef, num_labels: int = 0):
    """(params, batch) -> (nll sum, weight sum, byte sum) over the batch's weighted targets.
    The nll is the training loss's (objectives.lm_sums without z-loss), so eval_loss and the
    training loss measure the same thing. For a classifier (`num_labels`): (nll sum, weight
    sum, confusion matrix [true, predicted] of the weighted rows)."""
    if num_labels:
        @attention.forward_only
        def classify_step(params, batch):
            logits_BC = objectives.class_logits(graphdef, params, batch)
            nll_B, _ = objectives.nll_and_lse(logits_BC, batch["labels"])
            w_B = batch["weights"]
            confusion_CC = jnp.zeros((num_labels, num_labels)).at[
                batch["labels"], jnp.argmax(logits_BC, axis=-1)].add(w_B)
            return (nll_B * w_B).sum(), w_B.sum(), confusion_CC

        return classify_step

    @attention.forward_only
    def step(params, batch):
        _, (nll_sum, weight) = objectives.lm_sums(graphdef, params, batch)
        # int32: exact (float32 would round past 2**24 bytes), enough for 2 GB of text.
        return nll_sum, weight, batch["target_bytes"].sum(dtype=jnp.int32)

    return step


def evaluate(cfg: Config, graphdef, params, tok, mesh, eval_step=None, texts=None) -> dict:
    """Validation loss (nats/token), perplexity, bits per byte, token and byte counts over
    `train.eval_batches` batches of the eval split (all when 0), or over every one of `texts`
    (strings, each a document) when given. Sums stay on device until the end: one host sync
    per pass. A classifier's: loss (nats per example), accuracy, macro precision / recall / F1,
    example count and the confusion matrix [true, predicted] (jaxlm/classify.py)."""
    num_labels = cfg.model.num_labels
    if num_labels and texts is not None:
        raise ConfigError(f"a classifier (model.num_labels={num_labels}) is evaluated on its "
                          "labelled validation split, not on text files (--files)")
    if eval_step is None:
        eval_step = jax.jit(make_eval_step(graphdef, num_labels))
    if texts is None:
        batches, limit = data.eval_dataset(cfg, tok=tok), cfg.train.eval_batches
    else:
        batches, limit = data.texts_dataset(cfg, texts, tok=tok), 0
    batch_sharding = data.batch_shardings(cfg, sharding.batch_sharding(mesh, sharding.rules_for(cfg.mesh)))
    sums = (jnp.zeros(()), jnp.zeros(()),
            jnp.zeros((num_labels, num_labels)) if num_labels else jnp.zeros((), jnp.int32))
    batches = iter(batches)
    i = 0
    while not limit or i < limit:
        batch = next(batches, None)
        if jax.process_count() > 1:
            # Processes hold different numbers of validation batches; all go on while any has one,
            # the others feeding weight-0 rows, so every process runs the same steps.
            if not multihost_utils.process_allgather(np.int32(batch is not None)).max():
                break
            batch = batch or data.empty_batch(cfg)
        elif batch is None:
            break
        sums = jax.tree.map(jnp.add, sums, eval_step(params, data.to_global(batch, batch_sharding)))
        i += 1
    if num_labels:
        nll, weight, confusion = jax.device_get(sums)
        confusion = np.rint(confusion).astype(np.int64)
        scores = classify.metrics(confusion)
        return {"eval_loss": float(nll) / max(float(weight), 1.0),
                **{f"eval_{k}": v for k, v in scores.items()},
                "eval_examples": int(round(float(weight))), "eval_confusion": confusion.tolist()}
    nll, weight, num_bytes = (float(x) for x in jax.device_get(sums))
    loss = nll / max(weight, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)),
            "eval_bits_per_byte": bits_per_byte(nll, num_bytes),
            "eval_tokens": int(weight), "eval_bytes": int(num_bytes)}


def bits_per_byte(nats: float, num_bytes: float) -> float:
    return nats / max(num_bytes, 1.0) / math.log(2)


def read_texts(paths: list[str]) -> list[str]:
    """Each file as one document: UTF-8, invalid bytes replaced (as dataset preparation does)."""
    texts = []
    for path in paths:
        with open(path, "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    return texts


# --- compression reference ---------------------------------------------------------------------


def split_documents(cfg: Config, max_bytes: int = COMPRESS_MAX_BYTES) -> list[bytes] | None:
    """The UTF-8 bytes of every document of `data.eval_split` (all processes' shares, in order),
    decoded as the pipeline decodes them; None as soon as they pass `max_bytes`."""
    feature = datasets.text_feature(cfg.data)
    docs, total = [], 0
    for example in data.documents(cfg, cfg.data.eval_split, data.Shard(0, 1), train=False):
        text = example[feature]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        docs.append(text.encode("utf-8"))
        total += len(docs[-1])
        if total > max_bytes:
            return None
    return docs


def compression_reference(docs: list[bytes]) -> dict:
    """Bits per byte of gzip -9 and xz -9e over `docs`: concatenated ("whole split") and each
    compressed on its own, sizes summed ("file by file", headers included)."""
    whole = b"".join(docs)
    n = len(whole)

    def gz(b):
        return len(gzip.compress(b, compresslevel=9, mtime=0))

    def xz(b):
        return len(lzma.compress(b, preset=XZ_PRESET))

    return {
        "bytes": n,
        "gzip_bits_per_byte": 8 * gz(whole) / n,
        "gzip_file_bits_per_byte": 8 * sum(map(gz, docs)) / n,
        "xz_bits_per_byte": 8 * xz(whole) / n,
        "xz_file_bits_per_byte": 8 * sum(map(xz, docs)) / n,
    }


def cached_compression_reference(docs: list[bytes], data_dir: str) -> dict:
    """`compression_reference(docs)`, kept in `data_dir/compression/` under a hash of the
    documents: the figures depend on the bytes only, and xz -9e takes ~1.5 s of every `jaxlm
    train` on the embedded split. A cache that cannot be written is skipped."""
    key = hashlib.sha256()
    for doc in docs:
        key.update(len(doc).to_bytes(8, "little") + doc)
    path = os.path.join(data_dir, "compression", f"{key.hexdigest()[:32]}-xz{XZ_PRESET}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    ref = compression_reference(docs)
    try:
        paths.write_text(path, json.dumps(ref))
    except OSError:
        pass
    return ref


def reference_line(cfg: Config, result: dict) -> tuple[str, dict]:
    """The end-of-training line comparing the model (`evaluate`'s result) with gzip and xz on the
    validation text, and the figures as a dict (empty when the split is too big to compress).
    The model's byte count can be a little under the split's: the first token of a row that
    continues a document is an input only, so its bytes are not scored."""
    head = (f"validation: {result['eval_bits_per_byte']:.3f} bits per byte "
            f"({result['eval_bytes']:,} bytes scored)")
    docs = split_documents(cfg)
    if docs is None:
        return f"{head}; no gzip/xz reference: the split is over {COMPRESS_MAX_BYTES >> 20} MiB", {}
    ref = cached_compression_reference(docs, datasets.local_data_dir(cfg.data))
    return (f"{head}; on the split's {ref['bytes']:,} bytes gzip -9 gives "
            f"{ref['gzip_bits_per_byte']:.3f} / {ref['gzip_file_bits_per_byte']:.3f} and xz -9e "
            f"{ref['xz_bits_per_byte']:.3f} / {ref['xz_file_bits_per_byte']:.3f} "
            "(whole split / file by file)"), ref

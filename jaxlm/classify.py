"""Classification data and metrics: JSONL rows {"text", "label"} -> one padded row per example.

`data.dataset=classify` reads `data.files` (validation: `data.eval_files`, or rows held out by a
hash of their text, as SFT does); `classify.labels` names the classes in index order, and
model.num_labels follows from it (finetune.resolve). The demo `stdlib_classify`
(jaxlm/finetune_data.py) brings its own files and labels.

- A row's `label` must be one of the names (a JSON integer is read as its decimal text, so
  labels "0,1" take 0 and 1). A row that is not a JSON object with a string `text` and a known
  `label` is an error naming its file and line, unless `data.bad_rows=skip`, which counts it
  by reason (unknown labels by name).
- A text is tokenized as BOS + text + EOS; the model pools its last real token (here the EOS,
  the same token for every example; model.Decoder.classify). A text longer than data.seq_len
  keeps its first seq_len - 1 tokens and the EOS (`data.too_long=truncate_prompt`) or is dropped
  (`drop`); both are counted.
- Preparing (on first use, or `jaxlm data prepare`) writes each split as flat .npy arrays
  (tokens, row offsets, labels; no pickles) and a `jaxlm_prepare.json` summary with every count
  and each split's examples per label, so the majority-class baseline is on record.
- Rows are not packed: each example is one row of seq_len tokens, right-padded with segment id
  0, carrying its `labels` and `weights` (1 per example, 0 for the rows that pad the last
  validation batch) as [batch] arrays (objectives.classify_sums).

Metrics (`metrics`) are computed from the confusion matrix [true, predicted], which evaluation
accumulates on device: accuracy, and macro precision, recall and F1 (each class's, averaged
with equal weight; a class never predicted, or never present, scores 0 there, as scikit-learn's
zero_division=0 does).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import grain
import jax
import numpy as np
from flax import nnx

from jaxlm import datasets, finetune_data, paths, sft, sharding, tokenizer
from jaxlm.config import Config, DataConfig

CLASSIFY = "classify"
DATASETS = (CLASSIFY, finetune_data.STDLIB_CLASSIFY)  # data.dataset values read by this module
FORMAT_VERSION = 1  # bump when the prepared layout or the encoding rules change


class ClassifyError(datasets.DataError):
    """A classification file, row or label is unusable. One line naming it."""


def labels(cfg: Config) -> tuple[str, ...]:
    """The class names of `cfg`, in index order: classify.labels, or the demo's."""
    if cfg.classify.labels:
        return tuple(n.strip() for n in cfg.classify.labels.split(","))
    if cfg.data.dataset == finetune_data.STDLIB_CLASSIFY:
        return finetune_data.PACKAGES
    return ()


# --- preparing -----------------------------------------------------------------------------------


def parse_row(line: str, names: dict[str, int]) -> tuple[str, int]:
    """(text, class index) of a JSONL line; ValueError with the reason when it is unusable."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(row, dict) or "text" not in row or "label" not in row:
        raise ValueError("not an object with 'text' and 'label'")
    if not isinstance(row["text"], str):
        raise ValueError("'text' is not a string")
    label = row["label"]
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or label not in names:
        raise ValueError(f"label {label!r} is not one of classify.labels")
    return row["text"], names[label]


def encode(text: str, tok: tokenizer.Tokenizer, seq_len: int, too_long: str):
    """(tokens int32, truncated) of BOS + text + EOS in at most seq_len tokens; None to drop."""
    ids = tok.encode(text)
    tokens = np.concatenate([[tokenizer.BOS_ID], ids, [tokenizer.EOS_ID]]).astype(np.int32)
    if len(tokens) <= seq_len:
        return tokens, False
    if too_long == "drop":
        return None
    return np.concatenate([tokens[:seq_len - 1], [tokenizer.EOS_ID]]).astype(np.int32), True


def prepared_dir(cfg: Config, tok: tokenizer.Tokenizer) -> str:
    """Where the classification data of `cfg` is prepared: named by a hash of all that shapes
    the arrays (file contents, labels, tokenizer, length and row rules)."""
    d = finetune_data.effective(cfg.data)
    rules = f"v{FORMAT_VERSION}|{','.join(labels(cfg))}|{d.seq_len}|{d.too_long}|{d.bad_rows}"
    return paths.join(datasets.data_dir(d), CLASSIFY,
                        f"{d.local_name}-{sft.inputs_hash(rules, d, tok)}")


def _read_rows(paths: list[str], d: DataConfig, names: dict[str, int], counts: dict):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                counts["rows"] += 1
                try:
                    yield parse_row(line, names)
                except ValueError as e:
                    sft.bad_row(d, counts, str(e), f"{path}:{lineno}", ClassifyError)


_PREPARED: dict = {}  # (config, tokenizer path) -> prepared dir, for this process


def prepare(cfg: Config, tok: tokenizer.Tokenizer) -> dict:
    """Tokenize and split the classification files of `cfg` (once; later calls read the summary)."""
    key = (cfg.data, cfg.classify, tok.path)
    out = _PREPARED.get(key) or _PREPARED.setdefault(key, prepared_dir(cfg, tok))
    summary_path = paths.join(out, datasets.SUMMARY_FILE)
    if paths.isfile(summary_path):
        return json.loads(paths.read_text(summary_path))
    d = finetune_data.effective(cfg.data)
    names = {n: i for i, n in enumerate(labels(cfg))}
    counts = {"rows": 0, "malformed": {}}
    train_rows = list(_read_rows(sft.jsonl_files(d.files, "data.files"), d, names, counts))
    if d.eval_files:
        eval_rows = list(_read_rows(sft.jsonl_files(d.eval_files, "data.eval_files"), d, names,
                                    counts))
    else:  # hold out rows by a hash of their text
        held = datasets.validation_keys([t for t, _ in train_rows])
        eval_rows = [r for r in train_rows if r[0] in held]
        train_rows = [r for r in train_rows if r[0] not in held]
    summary = {"format": FORMAT_VERSION, "files": d.files, "eval_files": d.eval_files,
               "labels": list(names), "tokenizer": tok.path, "seq_len": d.seq_len,
               "too_long": d.too_long, "rows": counts["rows"], "malformed": counts["malformed"],
               "splits": {}}

    def build(staging):
        for split, rows in ((d.train_split, train_rows), (d.eval_split, eval_rows)):
            kept, classes, truncated, dropped = [], [], 0, 0
            for text, label in rows:
                encoded = encode(text, tok, d.seq_len, d.too_long)
                if encoded is None:
                    dropped += 1
                    continue
                truncated += encoded[1]
                kept.append(encoded[0])
                classes.append(label)
            if not kept:
                raise ClassifyError(f"classification split '{split}' of "
                                    f"{d.eval_files or d.files!r} has no usable rows "
                                    f"({len(rows)} read, {dropped} too long)")
            offsets = np.concatenate([[0], np.cumsum([len(t) for t in kept])]).astype(np.int64)
            arrays = {"tokens": np.concatenate(kept).astype(np.int32), "offsets": offsets,
                      "labels": np.array(classes, np.int32)}
            for name, array in arrays.items():
                np.save(os.path.join(staging, f"{split}.{name}.npy"), array, allow_pickle=False)
            per_label = np.bincount(arrays["labels"], minlength=len(names))
            summary["splits"][split] = {
                "examples": len(kept), "truncated": truncated, "dropped_too_long": dropped,
                "tokens": int(offsets[-1]),
                "per_label": {n: int(c) for n, c in zip(names, per_label, strict=True)}}
        return summary

    return sft.publish(out, build)


def summary_line(summary: dict) -> str:
    malformed = sum(v["rows"] for v in summary["malformed"].values())
    splits = "; ".join(
        f"{name}: {s['examples']} examples (majority class "
        f"{max(s['per_label'].values()) / s['examples']:.1%}), {s['truncated']} truncated, "
        f"{s['dropped_too_long']} dropped as too long"
        for name, s in summary["splits"].items())
    return (f"classify data: {summary['rows']} rows read, {malformed} malformed or unknown-label "
            f"skipped; {splits}")


# --- reading -------------------------------------------------------------------------------------


class Examples:
    """A prepared split as a random-access source of {"tokens", "label"} (grain reads it)."""

    def __init__(self, directory: str, split: str):
        path = os.path.join(sft.local_copy(directory), f"{split}.%s.npy")
        if not os.path.isfile(path % "offsets"):
            raise ClassifyError(f"classification split '{split}' is not prepared in '{directory}'")
        self.tokens = np.load(path % "tokens", mmap_mode="r", allow_pickle=False)
        self.offsets = np.load(path % "offsets", allow_pickle=False)
        self.labels = np.load(path % "labels", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": np.array(self.tokens[self.offsets[i]:self.offsets[i + 1]]),
                "label": self.labels[i]}


def row(tokens: np.ndarray, label: int, seq_len: int, weight: float = 1.0) -> dict:
    """One example as a model row: right-padded tokens, segment id 1 on its tokens, positions
    0.., and its label and weight."""
    n = len(tokens)
    inputs = np.zeros(seq_len, np.int32)
    inputs[:n] = tokens
    segment_ids = (np.arange(seq_len) < n).astype(np.int32)
    return {"inputs": inputs, "segment_ids": segment_ids,
            "positions": (np.arange(seq_len) * segment_ids).astype(np.int32),
            "labels": np.int32(label), "weights": np.float32(weight)}


def rows(cfg: Config, split: str, shard, train: bool, tok) -> grain.IterDataset:
    """This stream's examples of `split` as model rows: shuffled and repeated forever (reshuffled
    each epoch) for training, once in order otherwise."""
    prepare(cfg, tok)
    source = Examples(_PREPARED[(cfg.data, cfg.classify, tok.path)], split)
    ds = grain.MapDataset.source(source)[shard.index :: shard.count]
    if len(ds) == 0:
        raise ClassifyError(f"classification split '{split}' has no examples for input stream "
                            f"{shard.index} of {shard.count}")
    if train:
        ds = ds.shuffle(seed=cfg.train.seed).repeat()
    seq_len = cfg.data.seq_len
    return ds.map(lambda e: row(e["tokens"], e["label"], seq_len)).to_iter_dataset()


def empty_batch(cfg: Config, rows_per_batch: int) -> dict:
    """A batch of weight-0 rows (it adds nothing to a loss or a confusion matrix)."""
    one = row(np.zeros(0, np.int32), 0, cfg.data.seq_len, weight=0.0)
    return {k: np.stack([v] * rows_per_batch) for k, v in one.items()}


# --- metrics -------------------------------------------------------------------------------------


def metrics(confusion: np.ndarray) -> dict:
    """Accuracy and macro precision / recall / F1 of a confusion matrix [true, predicted]."""
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"accuracy": float(hits.sum() / max(confusion.sum(), 1.0)),
            "macro_precision": float(precision.mean()), "macro_recall": float(recall.mean()),
            "macro_f1": float(f1.mean())}


# --- predicting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Classification:
    """`LM.classify`'s result: per text, the most probable label and the probabilities of all
    labels [texts, labels] (float32, in `names` order)."""

    labels: list[str]
    probs: np.ndarray
    names: tuple[str, ...]


@functools.partial(jax.jit, static_argnums=0)
def _class_logits(graphdef, params, inputs, segment_ids, positions):
    return nnx.merge(graphdef, params).classify(inputs, segment_ids, positions)


def predict(lm, texts, batch_size: int = 64) -> Classification:
    """Classify `texts` with a loaded classifier `lm`, each read as in training (BOS + text +
    EOS, cut to data.seq_len), in batches of rows padded to a power of two (a new input size
    compiles at most once per power of two)."""
    if not lm.config.model.num_labels:
        raise ValueError("this model is not a classifier (model.num_labels is 0)")
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a list of strings")
    tok = lm.tokenizer
    if tok is None:
        raise ValueError("this classifier has no tokenizer.model to read text with")
    seq_len = lm.config.data.seq_len
    encoded = [encode(t, tok, seq_len, "truncate_prompt")[0] for t in texts]
    probs = []
    with jax.set_mesh(lm.mesh), sharding.logical_rules(lm.rules):
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            length = min(seq_len, max(8, 1 << (max(map(len, chunk)) - 1).bit_length()))
            n = max(8, 1 << (len(chunk) - 1).bit_length())
            batch = [row(t, 0, length) for t in chunk] + [row(chunk[0], 0, length)] * (n - len(chunk))
            arrays = {k: np.stack([r[k] for r in batch]) for k in ("inputs", "segment_ids",
                                                                   "positions")}
            logits = _class_logits(lm.graphdef, lm.params, arrays["inputs"],
                                   arrays["segment_ids"], arrays["positions"])
            probs.append(np.asarray(jax.nn.softmax(logits, axis=-1))[:len(chunk)])
    probs = np.concatenate(probs) if probs else np.zeros((0, len(lm.labels)), np.float32)
    return Classification([lm.labels[i] for i in probs.argmax(-1)], probs, lm.labels)

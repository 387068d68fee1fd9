"""The input pipeline: TFDS source -> grain -> tokenize -> pack -> batch -> global jax.Array.

    source (array_record, random access)
      -> this process's input streams (stream s of S reads every S-th document; see `streams`)
      -> shuffle by seed, reshuffled every epoch, repeated forever          [train only]
      -> tokenize: BOS + ids + EOS per document
      -> pack: concatenate and split into rows of seq_len + 1 tokens (grain's ConcatThenSplit;
         long documents are split across rows, never dropped), with segment ids and positions
      -> batch: global_batch_size / S rows per stream, this process's streams side by side
      -> model batch: inputs/targets shifted by one, a loss weight per target (validation
         also: the UTF-8 bytes each target stands for, for bits per byte)

The training iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` restore it
exactly, and the orbax grain handler checkpoints it. The validation iterator reads its split once,
in order, and pads its last batch with weight-0 rows so every batch has the same shape.

Classification data (jaxlm/classify.py) is one example per row, not packed: its rows are
model rows already, with a label and a weight per row.

This module computes no model numerics and names no mesh axis: `to_global` takes the sharding.
"""

from __future__ import annotations

import dataclasses
import time

import grain
import jax
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ZipIterDataset

from jaxlm import classify, datasets, sft, tokenizer
from jaxlm.config import Config

# Tokenizing is the costly step and SentencePiece releases the GIL, so a few threads help; the
# default (16 threads, 500 prefetched) only adds contention on a small host.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @staticmethod
    def of_this_process() -> Shard:
        return Shard(jax.process_index(), jax.process_count())


def per_process_batch(cfg: Config, shard: Shard) -> int:
    if cfg.train.global_batch_size % shard.count:
        raise ValueError(
            f"config key 'train.global_batch_size' ({cfg.train.global_batch_size}) is not "
            f"divisible by the number of processes ({shard.count})"
        )
    return cfg.train.global_batch_size // shard.count


class _Tokenize(grain.transforms.Map):
    """A document -> {"tokens": BOS + ids + EOS}; with `with_bytes` (validation only) also
    "token_bytes", the UTF-8 bytes of text each token stands for (0 for BOS and EOS)."""

    def __init__(self, tok: tokenizer.Tokenizer, feature: str, with_bytes: bool = False):
        self.tok = tok
        self.feature = feature
        self.piece_bytes = tok.piece_bytes() if with_bytes else None  # built once, not per thread

    def map(self, example):
        text = example[self.feature]
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        ids = self.tok.encode(text)
        tokens = np.empty(len(ids) + 2, np.int32)
        tokens[0], tokens[1:-1], tokens[-1] = tokenizer.BOS_ID, ids, tokenizer.EOS_ID
        if self.piece_bytes is None:
            return {"tokens": tokens}
        return {"tokens": tokens, "token_bytes": self.piece_bytes[tokens]}


def model_batch(packed: dict) -> dict:
    """Packed rows [b, seq_len + 1] -> inputs, targets, segment_ids, positions, weights [b, seq_len],
    and target_bytes (int32; 0 where the weight is 0) when the rows carry token_bytes.

    A target counts (weight 1) when it continues the input's document: same segment, not padding,
    and, for rows that carry a `loss` mask (SFT), when the mask marks it.
    """
    tokens, segments, positions = (
        packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
    )
    same_document = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)
    if "loss" in packed:
        same_document &= packed["loss"][:, 1:] > 0
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments[:, :-1],
        "positions": positions[:, :-1],
        "weights": same_document.astype(np.float32),
    }
    if "token_bytes" in packed:
        target_bytes = np.where(same_document, packed["token_bytes"][:, 1:], 0)
        batch["target_bytes"] = target_bytes.astype(np.int32)
    return batch


def documents(cfg: Config, split: str, shard: Shard, train: bool) -> grain.MapDataset:
    """This process's documents of `split`: every shard.count-th one; shuffled and repeated
    forever (reshuffled each epoch) for training, once in order otherwise."""
    source = datasets.source(cfg.data, split)
    ds = grain.MapDataset.source(source)[shard.index :: shard.count]
    if len(ds) == 0:
        raise datasets.DataError(
            f"split '{split}' of dataset '{cfg.data.dataset}' has no documents for process "
            f"{shard.index} of {shard.count}"
        )
    if train:
        ds = ds.shuffle(seed=cfg.train.seed).repeat()  # repeat reseeds the shuffle each epoch
    return ds


def packed(cfg: Config, split: str, shard: Shard, train: bool, tok, rows: int) -> grain.IterDataset:
    """Rows of seq_len + 1 tokens with `tokens_segment_ids` (0 = padding) and `tokens_positions`;
    outside training also `token_bytes` (see `_Tokenize`). SFT data (jaxlm/sft.py) packs whole
    examples, `rows` at a time, and adds their `loss` mask."""
    if cfg.data.dataset in sft.DATASETS:
        return sft.packed(cfg, split, shard, train, tok, rows, with_bytes=not train)
    return _pack(documents(cfg, split, shard, train), tok, datasets.text_feature(cfg.data),
                 cfg.data.seq_len, with_bytes=not train)


def _pack(docs: grain.MapDataset, tok, feature: str, seq_len: int, with_bytes: bool):
    ds = docs.map(_Tokenize(tok, feature, with_bytes)).to_iter_dataset(READ_OPTIONS)
    # token_bytes has the tokens' lengths, so it is split at the same places and stays aligned.
    lengths = {"tokens": seq_len + 1, **({"token_bytes": seq_len + 1} if with_bytes else {})}
    return ConcatThenSplitIterDataset(ds, length_struct=lengths)


def streams(cfg: Config, shard: Shard) -> list[Shard]:
    """The input streams this process reads: of S = `data.streams` (0 = one per process), process
    p of P reads the S/P streams p * S/P, ..., (p + 1) * S/P - 1. Each stream is its own packed
    pipeline over every S-th document (shuffled, for training), and a process's rows are its
    streams' side by side; jax puts process p's rows after process p - 1's, so the global batch is
    the streams' rows in stream order, and with `data.streams` fixed the batches do not depend on
    how many processes read them."""
    total = cfg.data.streams or shard.count
    if total % shard.count:
        raise datasets.DataError(f"config key 'data.streams' ({total}) must be a multiple of the "
                                 f"number of processes ({shard.count})")
    if cfg.train.global_batch_size % total:
        raise datasets.DataError(f"config key 'train.global_batch_size' "
                                 f"({cfg.train.global_batch_size}) must be divisible by the "
                                 f"number of input streams, data.streams ({total})")
    per = total // shard.count
    return [Shard(i, total) for i in range(shard.index * per, (shard.index + 1) * per)]


def _concat_rows(parts) -> dict:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def train_dataset(cfg: Config, shard: Shard | None = None, tok=None) -> grain.IterDataset:
    """Infinite, shuffled, packed batches of this process's share; `iter()` it for a resumable
    iterator (`get_state` / `set_state`)."""
    shard = shard or Shard.of_this_process()
    tok = tok or tokenizer.for_config(cfg)
    mine = streams(cfg, shard)
    rows = cfg.train.global_batch_size // (len(mine) * shard.count)
    split = cfg.data.train_split
    rows_ready = cfg.data.dataset in classify.DATASETS  # model rows already
    if rows_ready:
        parts = [classify.rows(cfg, split, s, True, tok).batch(rows, drop_remainder=True)
                 for s in mine]
    else:
        parts = [packed(cfg, split, s, True, tok, rows).batch(rows, drop_remainder=True)
                 for s in mine]
    # One zipped iterator keeps a single checkpointable state for all of this process's streams.
    ds = parts[0] if len(parts) == 1 else ZipIterDataset(parts).map(_concat_rows)
    return ds if rows_ready else ds.map(model_batch)


def eval_dataset(cfg: Config, shard: Shard | None = None, tok=None):
    """This process's validation batches: its input streams (`streams`) read the split once, in
    order, packed, side by side; a stream that has run out gives weight-0 rows until all of this
    process's have. Like the training batches, the global ones do not depend on the process count
    when `data.streams` is fixed."""
    shard = shard or Shard.of_this_process()
    tok = tok or tokenizer.for_config(cfg)
    mine = streams(cfg, shard)
    rows = per_process_batch(cfg, shard) // len(mine)
    split = cfg.data.eval_split
    if cfg.data.dataset in classify.DATASETS:
        parts = [classify.rows(cfg, split, s, False, tok).batch(rows, drop_remainder=False)
                 .map(lambda b: _pad_rows(b, rows)) for s in mine]
        empty = classify.empty_batch(cfg, rows)
    else:
        parts = [_eval_batches(packed(cfg, split, s, False, tok, rows), rows) for s in mine]
        empty = empty_batch(cfg, rows=rows)
    return parts[0] if len(parts) == 1 else _side_by_side(parts, empty)


def _side_by_side(parts, empty: dict):
    """One batch of every part per step, `empty` for a part that has ended, until all have."""
    iterators = [iter(p) for p in parts]
    while True:
        got = [next(it, None) for it in iterators]
        if all(b is None for b in got):
            return
        yield _concat_rows([empty if b is None else b for b in got])


def texts_dataset(cfg: Config, texts: list[str], shard: Shard | None = None,
                  tok=None) -> grain.IterDataset:
    """Validation batches, as `eval_dataset` makes them, of `texts` (each one document), once
    and in order; this process takes every shard.count-th text."""
    shard = shard or Shard.of_this_process()
    tok = tok or tokenizer.for_config(cfg)
    docs = grain.MapDataset.source([{"text": t} for t in texts])[shard.index :: shard.count]
    return _eval_batches(_pack(docs, tok, "text", cfg.data.seq_len, with_bytes=True),
                         per_process_batch(cfg, shard))


def _eval_batches(rows: grain.IterDataset, batch: int) -> grain.IterDataset:
    return rows.batch(batch, drop_remainder=False).map(lambda b: model_batch(_pad_rows(b, batch)))


def empty_batch(cfg: Config, shard: Shard | None = None, rows: int | None = None) -> dict:
    """A validation batch of this process's shape (or of `rows` rows) whose weights and
    target_bytes are all 0 (it adds nothing to a loss)."""
    rows = rows or per_process_batch(cfg, shard or Shard.of_this_process())
    if cfg.data.dataset in classify.DATASETS:
        return classify.empty_batch(cfg, rows)
    zeros = np.zeros((rows, cfg.data.seq_len), np.int32)
    return {"inputs": zeros, "targets": zeros, "segment_ids": zeros, "positions": zeros,
            "weights": zeros.astype(np.float32), "target_bytes": zeros}


def _pad_rows(packed: dict, rows: int) -> dict:
    missing = rows - len(next(iter(packed.values())))
    if missing == 0:
        return packed
    # Padding rows are zeros: segment id 0 and weight 0, so they count for nothing.
    return {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in packed.items()}


def prepare(cfg: Config, tok) -> str | None:
    """Prepare what the data pipeline of `cfg` reads beyond the dataset itself (SFT or
    classification rows, once); a line for the log, or None."""
    if cfg.data.dataset in classify.DATASETS:
        return classify.summary_line(classify.prepare(cfg, tok))
    if cfg.data.dataset not in sft.DATASETS:
        return None
    return sft.summary_line(sft.prepare(cfg.data, tok))


def batch_shardings(cfg: Config, sharding: jax.sharding.NamedSharding):
    """How a model batch is laid out: every array as `sharding` ([batch, length]), except a
    classification batch's per-row labels and weights, split by its batch axes alone."""
    if not cfg.model.num_labels:
        return sharding
    rows = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0]))
    return {"inputs": sharding, "segment_ids": sharding, "positions": sharding, "labels": rows,
            "weights": rows}


def to_global(batch: dict, sharding) -> dict:
    """Assemble every process's local rows into global arrays laid out by `sharding` (one for
    all, or one per key: `batch_shardings`)."""
    def of(k):
        return sharding[k] if isinstance(sharding, dict) else sharding

    return {k: jax.make_array_from_process_local_data(of(k), v) for k, v in batch.items()}


def bench(cfg: Config, batches: int = 50) -> dict:
    """Host-side throughput of the training pipeline (tokenize + pack + batch), one process."""
    tok = tokenizer.for_config(cfg)
    it = iter(train_dataset(cfg, Shard(0, 1), tok))
    next(it)  # the first batch pays for opening files and starting threads
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(it)["inputs"].size
    seconds = time.perf_counter() - start
    return {
        "dataset": cfg.data.dataset,
        "seq_len": cfg.data.seq_len,
        "batch": cfg.train.global_batch_size,
        "batches": batches,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_sec": round(tokens / seconds),
    }

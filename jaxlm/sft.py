"""Supervised fine-tuning data: JSONL rows -> token sequences with a loss mask -> packed rows.

A row is either `{"prompt": ..., "completion": ...}` (the two texts joined as they are) or
`{"messages": [{"role": ..., "content": ...}, ...]}`, each message rendered by
`data.chat_template` (role markers as plain text; the default writes "<|user|>\\n...\\n").
The loss covers the completion, or every assistant message's content and the end of its turn,
and the EOS that ends the sequence when the text ends with such a part.

Tokenization is of the whole rendered text at once (never prompt and completion apart, which
can move the boundary), then each token is weighted by the bytes it covers: a token with any
byte of a loss part is a loss token. jaxlm tokenizers are byte-exact, so the pieces' byte counts
(`Tokenizer.piece_bytes`) locate every token in the text.

Preparing (`prepare`, on first use) writes each split as three flat .npy arrays (tokens, loss
mask, row offsets; no pickles) and a `jaxlm_prepare.json` summary with every count: rows read,
kept, truncated, dropped as too long, malformed (by reason, with the first place each was seen).
A malformed row is an error naming its file and line, unless `data.bad_rows=skip`, which
counts it. The pipeline (`packed`) reads those arrays through grain and packs whole examples
into rows with first-fit packing (an example is never split across rows), keeping the mask
aligned, so the loss weights come from the mask and never from the pad id.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from jaxlm import datasets, finetune_data, paths, tokenizer
from jaxlm.config import DataConfig

SFT = "sft"
DATASETS = (SFT, finetune_data.STDLIB_SFT)  # data.dataset values read by this module
SUMMARY_FILE = datasets.SUMMARY_FILE
FORMAT_VERSION = 1  # bump when the prepared layout or the rendering rules change
ASSISTANT = "assistant"


class SFTError(datasets.DataError):
    """An SFT file or row is unusable. One line naming the file and line."""


# --- rendering -----------------------------------------------------------------------------------


def template_parts(template: str) -> tuple[str, str]:
    """The chat template split at {content}: (text before it, text after it), each with {role}."""
    if template.count("{content}") != 1:
        raise SFTError(f"config key 'data.chat_template' must contain {{content}} exactly once, "
                       f"got {template!r}")
    before, after = template.split("{content}")
    for part in (before, after):
        try:
            part.format(role="x")
        except (KeyError, IndexError, ValueError):
            raise SFTError(f"config key 'data.chat_template' may use only {{role}} and "
                           f"{{content}}, got {template!r}") from None
    return before, after


def render(row, template: str) -> list[tuple[str, bool]]:
    """A parsed JSONL row -> [(text, counts in the loss)], or raises ValueError saying why."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' is not a non-empty list")
        before, after = template_parts(template)
        parts = []
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError("a message without string 'role' and 'content'")
            loss = m["role"] == ASSISTANT
            parts += [(before.format(role=m["role"]), False),
                      (m["content"] + after.format(role=m["role"]), loss)]
        if not any(loss for _, loss in parts):
            raise ValueError("no assistant message")
        return parts
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise ValueError("'prompt' and 'completion' must both be strings")
        if not completion:
            raise ValueError("empty 'completion'")
        return [(prompt, False), (completion, True)]
    raise ValueError("neither 'prompt'/'completion' nor 'messages'")


def generation_prompt(messages: list[dict], template: str) -> str:
    """The text a chat model fine-tuned on `template` continues: the messages rendered, then the
    opening of an assistant turn (for `LM.generate`)."""
    before, after = template_parts(template)
    return "".join(before.format(role=m["role"]) + m["content"] + after.format(role=m["role"])
                   for m in messages) + before.format(role=ASSISTANT)


def encode(parts: list[tuple[str, bool]], tok: tokenizer.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, loss uint8) of BOS + the parts tokenized as one text + EOS. loss[i] says
    whether token i is a target the loss counts (BOS never; EOS when the last part counts)."""
    text = "".join(t for t, _ in parts)
    ids = tok.encode(text)
    byte_loss = np.concatenate([np.full(len(t.encode("utf-8")), loss, np.uint8) for t, loss in parts]
                               + [np.zeros(0, np.uint8)])
    sizes = tok.piece_bytes()[ids]
    if sizes.sum() == byte_loss.size and (sizes > 0).all():
        ends = np.cumsum(sizes)
        starts = ends - sizes
        # A token with any byte in a loss part is a loss token.
        token_loss = np.maximum.reduceat(byte_loss, starts) if ids.size else np.zeros(0, np.uint8)
    else:  # text the byte map cannot place (e.g. a literal U+2581): tokenize the parts apart
        pieces = [(tok.encode(t), loss) for t, loss in parts if t]
        ids = np.concatenate([p for p, _ in pieces] + [np.zeros(0, np.int32)]).astype(np.int32)
        token_loss = np.concatenate([np.full(len(p), loss, np.uint8) for p, loss in pieces]
                                    + [np.zeros(0, np.uint8)])
    tokens = np.concatenate([[tokenizer.BOS_ID], ids, [tokenizer.EOS_ID]]).astype(np.int32)
    loss = np.concatenate([[0], token_loss, [int(parts[-1][1])]]).astype(np.uint8)
    return tokens, loss


def fit(tokens: np.ndarray, loss: np.ndarray, max_tokens: int, too_long: str):
    """(tokens, loss, truncated) no longer than `max_tokens`, or None to drop the row.
    "truncate_prompt" removes tokens right after BOS while every removed one is outside the
    loss; a row whose loss part alone does not fit is dropped either way."""
    extra = len(tokens) - max_tokens
    if extra <= 0:
        return tokens, loss, False
    if too_long == "drop":
        return None
    first_loss = int(np.argmax(loss > 0))
    if first_loss - 1 < extra:  # tokens 1 .. extra must all be prompt
        return None
    keep = np.r_[0, np.arange(1 + extra, len(tokens))]
    return tokens[keep], loss[keep], True


# --- preparing -----------------------------------------------------------------------------------


def jsonl_files(pattern: str, key: str) -> list[str]:
    found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
        raise SFTError(f"config key '{key}' ({pattern!r}) matches no file")
    bad = [f for f in found if not f.endswith(".jsonl")]
    if bad:
        raise SFTError(f"config key '{key}' matches '{bad[0]}', which is not a .jsonl file")
    return found


def prepared_dir(cfg: DataConfig, tok: tokenizer.Tokenizer) -> str:
    """Where the SFT data of `cfg`, tokenized by `tok`, is prepared: named by a hash of
    everything that shapes the arrays (file contents, tokenizer, template, lengths, rules)."""
    cfg = finetune_data.effective(cfg)
    rules = f"v{FORMAT_VERSION}|{cfg.chat_template}|{cfg.seq_len}|{cfg.too_long}|{cfg.bad_rows}"
    return paths.join(datasets.data_dir(cfg), SFT, f"{cfg.local_name}-{inputs_hash(rules, cfg, tok)}")


def inputs_hash(rules: str, cfg: DataConfig, tok: tokenizer.Tokenizer) -> str:
    """12 hex digits of a hash of `rules`, the contents of data.files and data.eval_files, and
    the tokenizer: what names a prepared directory (SFT's, classification's)."""
    h = hashlib.sha256(rules.encode())
    for key, pattern in (("data.files", cfg.files), ("data.eval_files", cfg.eval_files)):
        for path in jsonl_files(pattern, key) if pattern else []:
            h.update(f"|{key}|{os.path.basename(path)}|".encode())
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    h.update(hashlib.sha256(paths.read_bytes(tok.path)).digest())
    return h.hexdigest()[:12]


def _read_rows(paths: list[str], cfg: DataConfig, counts: dict):
    """(key, parts) of every usable row; malformed ones raise or are counted."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                counts["rows"] += 1
                try:
                    parts = render(json.loads(line), cfg.chat_template)
                except (ValueError, RecursionError) as e:
                    reason = "not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
                    bad_row(cfg, counts, reason, f"{path}:{lineno}", SFTError)
                    continue
                yield line.strip(), parts


def bad_row(cfg: DataConfig, counts: dict, reason: str, where: str, error: type) -> None:
    """A malformed row at `where` (file:line): `error` naming it, or (data.bad_rows=skip)
    counted under its reason in counts["malformed"], with the first place it was seen."""
    if cfg.bad_rows == "error":
        raise error(f"{where}: {reason} (set data.bad_rows=skip to count and skip such rows)")
    seen = counts["malformed"].setdefault(reason, {"rows": 0, "first": None})
    seen["rows"] += 1
    seen["first"] = seen["first"] or where


def publish(out: str, build) -> dict:
    """Make the prepared directory `out` whole or not at all: `build(staging)` writes its files
    into a staging directory beside it and returns the summary, which is written last as
    SUMMARY_FILE; then the directory is renamed into place (another process that got there
    first wins, and its copy is kept). On object storage the directory is built locally and
    uploaded, its summary last."""
    if paths.is_remote(out):
        with tempfile.TemporaryDirectory(prefix="jaxlm-prepare-") as staging:
            summary = build(staging)
            with open(os.path.join(staging, SUMMARY_FILE), "w") as f:
                json.dump(summary, f, indent=2)
            paths.upload_tree(staging, out, last=SUMMARY_FILE)
        return summary
    os.makedirs(os.path.dirname(out), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out))
    try:
        summary = build(staging)
        with open(os.path.join(staging, SUMMARY_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        try:
            os.rename(staging, out)
        except OSError:
            if not os.path.isfile(os.path.join(out, SUMMARY_FILE)):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _write_split(directory: str, split: str, examples: list) -> None:
    lengths = np.array([len(t) for t, _ in examples], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.uint8))
    tokens = np.concatenate([t for t, _ in examples] + [empty[0]]).astype(np.int32)
    loss = np.concatenate([m for _, m in examples] + [empty[1]]).astype(np.uint8)
    for name, array in (("tokens", tokens), ("loss", loss), ("offsets", offsets)):
        np.save(os.path.join(directory, f"{split}.{name}.npy"), array, allow_pickle=False)


_PREPARED: dict = {}  # (data config, tokenizer path) -> prepared dir, for this process


def prepare(cfg: DataConfig, tok: tokenizer.Tokenizer) -> dict:
    """Tokenize and split the SFT files of `cfg` (once; later calls read the summary)."""
    cfg = finetune_data.effective(cfg)
    # Every evaluation builds its dataset again: hash the files once per process, not each time.
    out = _PREPARED.get((cfg, tok.path)) or _PREPARED.setdefault((cfg, tok.path),
                                                                 prepared_dir(cfg, tok))
    summary_path = paths.join(out, SUMMARY_FILE)
    if paths.isfile(summary_path):
        return json.loads(paths.read_text(summary_path))
    template_parts(cfg.chat_template)
    counts = {"rows": 0, "malformed": {}}
    train_rows = list(_read_rows(jsonl_files(cfg.files, "data.files"), cfg, counts))
    if cfg.eval_files:
        eval_rows = list(_read_rows(jsonl_files(cfg.eval_files, "data.eval_files"), cfg, counts))
    else:  # hold out rows by a hash of their text, as datasets.py holds out documents
        held = datasets.validation_keys([k for k, _ in train_rows])
        eval_rows = [r for r in train_rows if r[0] in held]
        train_rows = [r for r in train_rows if r[0] not in held]
    summary = {"format": FORMAT_VERSION, "files": cfg.files, "eval_files": cfg.eval_files,
               "tokenizer": tok.path, "seq_len": cfg.seq_len, "too_long": cfg.too_long,
               "rows": counts["rows"], "malformed": counts["malformed"], "splits": {}}

    def build(staging):
        for split, rows in ((cfg.train_split, train_rows), (cfg.eval_split, eval_rows)):
            examples, truncated, dropped = [], 0, 0
            for _, parts in rows:
                kept = fit(*encode(parts, tok), cfg.seq_len + 1, cfg.too_long)
                if kept is None:
                    dropped += 1
                    continue
                truncated += kept[2]
                examples.append(kept[:2])
            if not examples:
                raise SFTError(f"SFT split '{split}' of {cfg.eval_files or cfg.files!r} has no "
                               f"usable rows ({len(rows)} read, {dropped} too long for "
                               f"data.seq_len={cfg.seq_len})")
            _write_split(staging, split, examples)
            summary["splits"][split] = {
                "examples": len(examples), "truncated": truncated, "dropped_too_long": dropped,
                "tokens": int(sum(len(t) for t, _ in examples)),
                "loss_tokens": int(sum(int(m.sum()) for _, m in examples))}
        return summary

    return publish(out, build)


def summary_line(summary: dict) -> str:
    """The prepare summary as one line for the log."""
    malformed = sum(v["rows"] for v in summary["malformed"].values())
    splits = "; ".join(f"{name}: {s['examples']} examples, {s['loss_tokens']:,} of {s['tokens']:,} "
                       f"tokens in the loss, {s['truncated']} truncated, {s['dropped_too_long']} "
                       "dropped as too long" for name, s in summary["splits"].items())
    return f"sft data: {summary['rows']} rows read, {malformed} malformed skipped; {splits}"


# --- reading -------------------------------------------------------------------------------------


_LOCAL: dict[str, str] = {}


def local_copy(directory: str) -> str:
    """A prepared directory on local disk (numpy maps the arrays): itself, or, on object storage,
    a copy fetched once per process (a prepared directory is named by a hash of its inputs and
    never rewritten, so the copy cannot go stale)."""
    if not paths.is_remote(directory):
        return directory
    return _LOCAL.get(directory) or _LOCAL.setdefault(directory, paths.local_tree(directory))


class Examples:
    """A prepared split as a random-access source of {"tokens", "loss"} (grain reads it)."""

    def __init__(self, directory: str, split: str):
        path = os.path.join(local_copy(directory), f"{split}.%s.npy")
        if not os.path.isfile(path % "offsets"):
            raise SFTError(f"SFT split '{split}' is not prepared in '{directory}'")
        self.tokens = np.load(path % "tokens", mmap_mode="r", allow_pickle=False)
        self.loss = np.load(path % "loss", mmap_mode="r", allow_pickle=False)
        self.offsets = np.load(path % "offsets", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict:
        a, b = self.offsets[i], self.offsets[i + 1]
        return {"tokens": np.array(self.tokens[a:b]), "loss": np.array(self.loss[a:b])}


def packed(cfg, split: str, shard, train: bool, tok, rows: int, with_bytes: bool):
    """Rows of seq_len + 1 tokens, whole examples packed first-fit into `rows` bins at a time,
    with `tokens_segment_ids` (0 = padding), `tokens_positions` and the aligned `loss` mask;
    with `with_bytes` also `token_bytes` (the UTF-8 bytes of each loss token, 0 elsewhere)."""
    prepare(cfg.data, tok)
    source = Examples(_PREPARED[(finetune_data.effective(cfg.data), tok.path)], split)
    ds = grain.MapDataset.source(source)[shard.index :: shard.count]
    if len(ds) == 0:
        raise SFTError(f"SFT split '{split}' has no examples for input stream {shard.index} of "
                       f"{shard.count}")
    if train:
        ds = ds.shuffle(seed=cfg.train.seed).repeat()
    if with_bytes:
        piece_bytes = tok.piece_bytes()
        ds = ds.map(lambda e: {**e, "token_bytes": piece_bytes[e["tokens"]] * (e["loss"] > 0)})
    length = cfg.data.seq_len + 1
    features = ("tokens", "loss", "token_bytes") if with_bytes else ("tokens", "loss")
    return FirstFitPackIterDataset(
        ds.to_iter_dataset(), length_struct={k: length for k in features},
        num_packing_bins=rows, seed=cfg.train.seed, shuffle_bins=train)

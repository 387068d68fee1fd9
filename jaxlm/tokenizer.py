"""SentencePiece tokenizer: training on a dataset's train split, loading, and the fixed special ids.

Special ids are fixed for every tokenizer jaxlm trains: pad 0, unk 1, bos 2, eos 3. Packing puts
BOS before and EOS after every document; padding (segment id 0) uses token 0.

Training keeps text byte-exact: identity normalization, no dummy prefix, whitespace kept as it is,
`\\n` and `\\t` as pieces of their own, and byte fallback so any character round-trips. That is
what code needs (indentation and newlines carry meaning).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from jaxlm import cleaning, datasets, paths
from jaxlm.config import Config

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SAMPLE_BYTES = 8_000_000  # text sampled from the train split to train a tokenizer
MAX_PIECE_INPUT = 4000  # SentencePiece trains on "sentences"; documents are cut at lines to this


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or too large for the model. One line."""


class Tokenizer:
    """Thin wrapper: str -> int32 ids and back, plus the vocabulary size."""

    def __init__(self, path: str):
        if not paths.isfile(path):
            raise TokenizerError(f"tokenizer model '{path}' not found")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=paths.read_bytes(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot read tokenizer model '{path}': {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()  # -1 when it has none

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_texts(self) -> list[str | None]:
        """The text of every piece ("▁" as a space); None for control, unknown and byte pieces."""
        if not hasattr(self, "_piece_texts"):
            sp = self.sp
            self._piece_texts = [
                None if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
                else sp.id_to_piece(i).replace("\u2581", " ") for i in range(self.vocab_size)]
        return self._piece_texts

    def piece_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 bytes of text each piece stands for: 1 for a byte piece,
        0 for control and unknown pieces (BOS, EOS, pad), else its text's length in bytes.
        jaxlm tokenizers are byte-exact, so a document's pieces sum to its UTF-8 length; that is
        the denominator of bits per byte."""
        if not hasattr(self, "_piece_bytes"):
            self._piece_bytes = np.array(
                [1 if self.sp.is_byte(i) else len(t.encode("utf-8")) if t is not None else 0
                 for i, t in enumerate(self.piece_texts())], np.int32)
        return self._piece_bytes

    def heal(self, ids: list[int]) -> tuple[list[int], list[int] | None]:
        """Token healing for a prompt that ends inside a longer piece (e.g. "def " ends with a
        lone space, which training text almost never has: there the space is part of " name").
        Returns the prompt without its last piece and the pieces the first new token may be
        (those whose text starts with the removed one's), or the prompt unchanged and None when
        no longer piece extends the last one."""
        texts = self.piece_texts()
        last = texts[ids[-1]] if ids and len(ids) > 1 else None
        if not last:
            return ids, None
        allowed = [i for i, t in enumerate(texts) if t is not None and t.startswith(last)]
        if len(allowed) < 2:
            return ids, None
        return ids[:-1], allowed


def _sentences(texts: Iterable[str], budget: int) -> Iterator[str]:
    """Cut documents at line ends into pieces of at most MAX_PIECE_INPUT characters."""
    used = 0
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len(piece) + len(line) > MAX_PIECE_INPUT:
                yield piece
                used += len(piece)
                piece = ""
            piece += line[:MAX_PIECE_INPUT]
        if piece:
            yield piece
            used += len(piece)
        if used >= budget:
            return


def train(texts: Iterable[str], vocab_size: int, path: str, sample_bytes: int = SAMPLE_BYTES) -> str:
    """Train a BPE model with jaxlm's special ids on up to `sample_bytes` of `texts`; write `path`."""
    model = io.BytesIO()
    try:
        _train_sentencepiece(texts, vocab_size, sample_bytes, model)
    except RuntimeError as e:  # sentencepiece reports bad settings as RuntimeError
        message = str(e).strip().splitlines()[0]
        raise TokenizerError(f"cannot train a {vocab_size}-piece tokenizer: {message}") from None
    paths.write_bytes(path, model.getvalue())  # a half-written model is never taken for a good one
    return path


def _train_sentencepiece(texts, vocab_size: int, sample_bytes: int, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(texts, sample_bytes),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        byte_fallback=True,
        user_defined_symbols=["\n", "\t"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4 * MAX_PIECE_INPUT,  # bytes; a character is at most 4
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def default_path(cfg: Config) -> str:
    """Where the tokenizer trained for this dataset and vocabulary size lives."""
    d = cfg.data
    name = d.local_name if d.dataset == datasets.LOCAL else d.dataset
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if d.dataset == datasets.STDLIB:
        slug = datasets.stdlib_corpus_name(d)
    elif d.dataset == datasets.LOCAL:  # the same name over other files is another tokenizer
        slug += "-" + hashlib.sha256(d.files.encode()).hexdigest()[:8]
        if tag := cleaning.Settings.from_data(d).tag():
            slug += f"-{tag}"
    return paths.join(datasets.data_dir(d), "tokenizers", f"{slug}-bpe{cfg.model.vocab_size}.model")


def train_for_config(cfg: Config, path: str | None = None) -> str:
    """Train the tokenizer of `cfg` on its dataset's train split (prepared if needed)."""
    source = datasets.source(cfg.data, cfg.data.train_split)
    feature = datasets.text_feature(cfg.data)
    texts = (_as_text(source[i][feature]) for i in range(len(source)))
    return train(texts, cfg.model.vocab_size, path or default_path(cfg))


def for_config(cfg: Config) -> Tokenizer:
    """The tokenizer `cfg` names (data.tokenizer), or the dataset's default, trained if missing.

    Raises TokenizerError when its vocabulary exceeds model.vocab_size.
    """
    path = paths.resolve(cfg.data.tokenizer) if cfg.data.tokenizer else default_path(cfg)
    if not cfg.data.tokenizer and not paths.isfile(path):
        train_for_config(cfg, path)
    tok = Tokenizer(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise TokenizerError(
            f"config key 'model.vocab_size' ({cfg.model.vocab_size}) is smaller than the "
            f"vocabulary of tokenizer '{path}' ({tok.vocab_size})"
        )
    return tok


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

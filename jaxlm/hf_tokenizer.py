"""The tokenizer files of an exported HF directory, so `transformers.AutoTokenizer` reproduces
jaxlm's sentencepiece ids: tokenizer.json (HF `tokenizers` format), tokenizer_config.json, a copy
of tokenizer.model (what `jaxlm.load` reads back), and the special ids in generation_config.json
and config.json.

tokenizer.json is built here as plain JSON from the sentencepiece model, not by transformers'
sentencepiece converter (which guesses a Llama-style setup and got jaxlm's model wrong) and
without importing `tokenizers` (not a runtime dependency). It expresses only what jaxlm's
trainer produces (BPE, no dummy prefix, whitespace kept); any other model is refused.
"""

from __future__ import annotations

import json
import os
import shutil

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxlm.tokenizer import TokenizerError

SPACE = "\u2581"  # what sentencepiece writes for " " inside pieces
_TYPE = sp_pb2.ModelProto.SentencePiece.Type
_BPE = sp_pb2.TrainerSpec.ModelType.Value("BPE")


def write(sp_model_path: str, directory: str, model_max_length: int | None = None) -> None:
    """Write tokenizer.model, tokenizer.json and tokenizer_config.json into `directory`."""
    proto = _read(sp_model_path)
    _check_expressible(proto, sp_model_path)
    os.makedirs(directory, exist_ok=True)
    copy = os.path.join(directory, "tokenizer.model")
    if not (os.path.exists(copy) and os.path.samefile(sp_model_path, copy)):
        shutil.copyfile(sp_model_path, copy)
    _dump(os.path.join(directory, "tokenizer.json"), tokenizer_json(proto))
    _dump(os.path.join(directory, "tokenizer_config.json"), _tokenizer_config(proto, model_max_length))


def write_token_ids(directory: str, sp_model_path: str | None, eos: list[int]) -> None:
    """generation_config.json with the BOS and pad ids of the sentencepiece model (when there
    is one) and the EOS ids `eos` (an int when one), and the same ids set in config.json.

    Unknown ids are written as null: left out, transformers' LlamaConfig would default to bos 1
    and eos 2, and 2 is jaxlm's BOS."""
    spec = _read(sp_model_path).trainer_spec if sp_model_path else None
    ids = {"bos_token_id": spec.bos_id if spec and spec.bos_id >= 0 else None,
           "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else list(eos),
           "pad_token_id": spec.pad_id if spec and spec.pad_id >= 0 else None}
    _dump(os.path.join(directory, "generation_config.json"), ids)
    config = os.path.join(directory, "config.json")
    with open(config) as f:
        hf = json.load(f)
    _dump(config, {**hf, **ids})


def tokenizer_json(proto: sp_pb2.ModelProto) -> dict:
    """The HF `tokenizers` serialization of a jaxlm sentencepiece BPE model."""
    pieces = proto.pieces
    bos = _piece_of(proto, proto.trainer_spec.bos_id)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added(i, p) for i, p in enumerate(pieces)
                         if p.type in (_TYPE.CONTROL, _TYPE.UNKNOWN, _TYPE.USER_DEFINED)],
        # sentencepiece's only normalization here: " " is stored as "▁". No prepended "▁" (no
        # dummy prefix) and no pre-tokenizer: sentencepiece does not split text before its BPE
        # (whitespace splitting is a training-time rule, so no piece crosses a word anyway).
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        "pre_tokenizer": None,
        "post_processor": _bos_template(bos, proto.trainer_spec.bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},  # no Strip: without a dummy prefix a leading space is real text
        ]},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": _piece_of(proto, proto.trainer_spec.unk_id),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,  # sentencepiece emits one unk for a run of unknown characters
            "byte_fallback": proto.trainer_spec.byte_fallback,
            "ignore_merges": False,  # a word that is a piece is still built by merges, as in sentencepiece
            "vocab": {p.piece: i for i, p in enumerate(pieces)},
            "merges": merges(proto),
        },
    }


def merges(proto: sp_pb2.ModelProto) -> list[list[str]]:
    """HF BPE merges, first applied first, reproducing sentencepiece's BPE encoding.

    Sentencepiece starts from characters and repeatedly joins the adjacent pair whose joined
    piece has the highest score (the leftmost pair on a tie); HF joins the pair of lowest rank
    (leftmost on a tie). So every split of a normal piece into two normal pieces becomes a merge,
    ranked by the joined piece's score, highest first. Control, unknown, byte and user-defined
    pieces never join (sentencepiece freezes user-defined ones such as "\\n"). The one place the
    two can differ: two overlapping pairs that join to the same piece ("a"+"aa" and "aa"+"a")
    are ranked, where sentencepiece takes the left one; the tests compare real files to check
    this does not occur in practice.
    """
    normal = {p.piece for p in proto.pieces if p.type == _TYPE.NORMAL}
    joined = sorted((-p.score, i, p.piece) for i, p in enumerate(proto.pieces)
                    if p.type == _TYPE.NORMAL and len(p.piece) > 1)
    out = []
    for _, _, piece in joined:
        out += [[piece[:cut], piece[cut:]] for cut in range(1, len(piece))
                if piece[:cut] in normal and piece[cut:] in normal]
    return out


def _read(path: str) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except (OSError, ValueError) as e:  # protobuf's DecodeError is a ValueError
        raise TokenizerError(f"cannot read tokenizer model '{path}': {e}") from None
    return proto


def _check_expressible(proto: sp_pb2.ModelProto, path: str) -> None:
    """Refuse sentencepiece settings that tokenizer.json, as written here, does not reproduce."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    wanted = {"model_type": (trainer.model_type, _BPE),
              "treat_whitespace_as_suffix": (trainer.treat_whitespace_as_suffix, False),
              "add_dummy_prefix": (norm.add_dummy_prefix, False),
              "remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
              "escape_whitespaces": (norm.escape_whitespaces, True),
              "precompiled_charsmap": (bool(norm.precompiled_charsmap), False)}
    for name, (got, want) in wanted.items():
        if got != want:
            raise TokenizerError(f"cannot export tokenizer '{path}' to HF: sentencepiece setting "
                                 f"{name}={got!r}, jaxlm's tokenizers have {want!r}")


def _piece_of(proto: sp_pb2.ModelProto, piece_id: int) -> str | None:
    return proto.pieces[piece_id].piece if 0 <= piece_id < len(proto.pieces) else None


def _added(piece_id: int, piece) -> dict:
    # Added tokens are cut out of the text before the BPE model sees it: for "\n" and "\t" that
    # is sentencepiece's own rule; the control pieces are special (skipped when decoding).
    return {"id": piece_id, "content": piece.piece, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": piece.type != _TYPE.USER_DEFINED}


def _bos_template(bos: str | None, bos_id: int) -> dict | None:
    """BOS before each sequence when add_special_tokens=True (jaxlm packs BOS + text + EOS)."""
    if bos is None:
        return None
    token = {"SpecialToken": {"id": bos, "type_id": 0}}
    second = {"SpecialToken": {"id": bos, "type_id": 1}}
    return {"type": "TemplateProcessing",
            "single": [token, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [token, {"Sequence": {"id": "A", "type_id": 0}},
                     second, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _tokenizer_config(proto: sp_pb2.ModelProto, model_max_length: int | None) -> dict:
    spec = proto.trainer_spec
    config = {
        # transformers 5 loads this class straight from tokenizer.json (no re-conversion from
        # tokenizer.model); 4.x knows it too.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _piece_of(proto, spec.bos_id),
        "eos_token": _piece_of(proto, spec.eos_id),
        "unk_token": _piece_of(proto, spec.unk_id),
        "pad_token": _piece_of(proto, spec.pad_id),
        "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False,
        # Sentencepiece reads "<s>" in text as three characters, never as the BOS id.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,  # it would drop spaces before punctuation
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def _dump(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")

"""Evaluation: bits per byte against a hand computation, invariant to packing and batch size;
per-token byte counts on real text; `jaxlm eval --files`; the gzip/xz reference."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint, cli, config, data, datasets, evaluation, model, optim, sharding, tokenizer

SEQ = 16  # rows of 17 tokens: each test document is exactly one row (BOS + 15 ids + EOS)
UNICODE = "naïve café — Größe ≠ 漢字 😀 ünïcödé\n"


def stdlib_texts(count: int, non_ascii: bool = False) -> list[str]:
    """The first `count` stdlib files under 60 KB (with some non-ASCII character if asked)."""
    root, texts = datasets.stdlib_root(), []
    for path in datasets.stdlib_files(root):
        with open(os.path.join(root, path), "rb") as f:
            raw = f.read()
        if len(raw) < 60_000 and (not non_ascii or not raw.isascii()):
            texts.append(raw.decode("utf-8", errors="replace"))
            if len(texts) == count:
                break
    return texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-exact BPE tokenizer (jaxlm's settings) trained on a few stdlib files."""
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    tokenizer.train(stdlib_texts(40) + [UNICODE] * 20, 400, path, sample_bytes=400_000)
    return tokenizer.Tokenizer(path)


@pytest.fixture(scope="module")
def cfg(tok):
    return config.from_dict({
        "model": {"vocab_size": 400, "d_model": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 64, "init_std": 0.3},
        "data": {"seq_len": SEQ, "tokenizer": tok.path},
        "train": {"global_batch_size": 4},
        "mesh": {"data": 1},
    })


@pytest.fixture(scope="module")
def params(cfg):
    graphdef, state = nnx.split(model.init(cfg.model, seed=1), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def docs(tok):
    """7 documents of exactly SEQ - 1 ids that round-trip, cut from stdlib text with Unicode."""
    ids = tok.encode(UNICODE + "".join(stdlib_texts(3, non_ascii=True)))
    out, start = [], 0
    while len(out) < 7:
        text = tok.decode(ids[start : start + SEQ - 1])
        if list(tok.encode(text)) == list(ids[start : start + SEQ - 1]):
            out.append(text)
        start += SEQ - 1
    assert any(not t.isascii() for t in out)
    return out


def run_eval(cfg, graphdef, params, tok, texts, **train):
    one_device = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    cfg = cfg.replace(**train)
    return evaluation.evaluate(cfg, graphdef, params, tok, one_device, texts=texts)


def hand_bits_per_byte(graphdef, params, docs, tok):
    """Each document alone through the model: nats of every next token, over its UTF-8 bytes."""
    rows = np.stack([np.concatenate([[tokenizer.BOS_ID], tok.encode(d), [tokenizer.EOS_ID]])
                     for d in docs])
    logits = nnx.merge(graphdef, params)(jnp.asarray(rows[:, :-1])).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nats = -np.take_along_axis(np.asarray(logp), rows[:, 1:, None], axis=-1).sum()
    num_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return nats / num_bytes / math.log(2), num_bytes


@pytest.fixture(scope="module")
def results(cfg, params, tok, docs):
    graphdef, p = params
    # A: one document per row, 4 rows a batch. B: two documents per row, 2 rows a batch.
    a = run_eval(cfg, graphdef, p, tok, docs)
    b = run_eval(cfg, graphdef, p, tok, docs, data={"seq_len": 2 * SEQ + 1},
                 train={"global_batch_size": 2})
    return a, b


@pytest.mark.slow  # compiles the model's eval step
def test_bits_per_byte_matches_a_hand_computation(params, tok, docs, results):
    expected, num_bytes = hand_bits_per_byte(*params, docs, tok)
    a, _ = results
    assert a["eval_bytes"] == num_bytes
    assert a["eval_tokens"] == 7 * SEQ
    np.testing.assert_allclose(a["eval_bits_per_byte"], expected, rtol=1e-5)
    np.testing.assert_allclose(a["eval_loss"], expected * num_bytes * math.log(2) / (7 * SEQ),
                               rtol=1e-5)


@pytest.mark.slow  # compiles the model's eval step
def test_bits_per_byte_is_invariant_to_packing_and_batch_size(results):
    a, b = results
    assert (a["eval_tokens"], a["eval_bytes"]) == (b["eval_tokens"], b["eval_bytes"])
    np.testing.assert_allclose(b["eval_bits_per_byte"], a["eval_bits_per_byte"], rtol=1e-6)


def test_token_bytes_sum_to_utf8_length_on_real_text(cfg, tok):
    pieces = tok.piece_bytes()
    assert pieces[[tokenizer.PAD_ID, tokenizer.BOS_ID, tokenizer.EOS_ID]].tolist() == [0, 0, 0]
    assert all(pieces[i] == 1 for i in range(tok.vocab_size) if tok.sp.is_byte(i))
    assert pieces.max() > 1  # some pieces are several bytes
    texts = stdlib_texts(4, non_ascii=True) + [UNICODE]
    tokenize = data._Tokenize(tok, "text", with_bytes=True)
    for text in texts:
        assert int(tokenize.map({"text": text})["token_bytes"].sum()) == len(text.encode("utf-8"))
    # Through packing (documents split across rows): token_bytes stays aligned with the tokens,
    # and target_bytes is 0 wherever a target is not scored.
    total = 0
    for batch in data._pack(grain_docs(texts), tok, "text", SEQ, with_bytes=True).batch(4):
        real = batch["tokens_segment_ids"] != 0
        np.testing.assert_array_equal(batch["token_bytes"], np.where(real, pieces[batch["tokens"]], 0))
        total += int(batch["token_bytes"].sum())
        scored = data.model_batch(batch)
        assert scored["target_bytes"].dtype == np.int32
        np.testing.assert_array_equal(  # each scored target's own bytes, 0 where not scored
            scored["target_bytes"], np.where(scored["weights"] > 0, pieces[scored["targets"]], 0))
    assert total == sum(len(t.encode("utf-8")) for t in texts)


def grain_docs(texts):
    import grain

    return grain.MapDataset.source([{"text": t} for t in texts])


def test_empty_batch_has_target_bytes(cfg):
    batch = data.empty_batch(cfg, data.Shard(0, 2))
    assert set(batch) == set(next(iter(data.texts_dataset(cfg, ["x = 1\n"], data.Shard(0, 2)))))
    assert batch["target_bytes"].shape == (2, SEQ) and not batch["target_bytes"].any()


class _NoData:
    def get_state(self):
        return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cfg, params, tok):
    """A workdir as `jaxlm train` leaves one (config, tokenizer, a checkpoint), not trained."""
    path = str(tmp_path_factory.mktemp("run"))
    shutil.copyfile(tok.path, os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(cfg.to_json())
    p = params[1]
    saver = checkpoint.Checkpointer(path, keep=1, async_save=False)
    saver.save(1, p, optim.make(cfg).init(p), _NoData(), cfg)
    saver.close()
    return path


@pytest.mark.slow  # compiles the model's eval step
def test_eval_files_cli(tmp_path, workdir, params, tok, docs, capsys):
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)  # a directory the glob matches is not a file
    for i, d in enumerate(docs):
        (texts / f"doc{i}.txt").write_text(d, encoding="utf-8")
    assert cli.main(["jaxlm", "eval", f"--workdir={workdir}", f"--files={texts}/*"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected, num_bytes = hand_bits_per_byte(*params, docs, tok)
    assert got["files"] == 7 and got["file_bytes"] == got["eval_bytes"] == num_bytes
    assert got["step"] == 1 and got["eval_tokens"] == 7 * SEQ
    np.testing.assert_allclose(got["eval_bits_per_byte"], expected, rtol=1e-5)

    assert cli.main(["jaxlm", "eval", f"--workdir={workdir}", f"--files={tmp_path}/none/*.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxlm: error: --files={tmp_path}/none/*.txt matches no files"]


def test_compression_reference_whole_split_and_file_by_file():
    text = UNICODE.encode() * 3 + b"def f(x):\n    return x + 1\n" * 20
    ref = evaluation.compression_reference([text] * 4)
    assert ref["bytes"] == 4 * len(text)
    # Concatenated, the repeats cost almost nothing; compressed one by one, each pays in full.
    assert ref["xz_bits_per_byte"] < 0.5 * ref["xz_file_bits_per_byte"]
    assert ref["gzip_bits_per_byte"] < 0.5 * ref["gzip_file_bits_per_byte"]
    assert ref["xz_file_bits_per_byte"] < 8 and ref["gzip_file_bits_per_byte"] < 8


def test_compression_reference_cache_keys_on_the_bytes(tmp_path):
    docs = [UNICODE.encode(), b"def f(x):\n    return x + 1\n" * 20]
    first = evaluation.cached_compression_reference(docs, str(tmp_path))
    assert first == evaluation.compression_reference(docs)
    (kept,) = (tmp_path / "compression").iterdir()
    # A second call reads the file: a figure planted there comes back.
    planted = dict(first, gzip_bits_per_byte=-1.0)
    kept.write_text(json.dumps(planted))
    assert evaluation.cached_compression_reference(docs, str(tmp_path)) == planted
    # The same bytes split differently are other documents (file-by-file figures differ).
    joined = evaluation.cached_compression_reference([b"".join(docs)], str(tmp_path))
    assert joined == evaluation.compression_reference([b"".join(docs)])
    assert len(list((tmp_path / "compression").iterdir())) == 2

"""Data: TFDS builders, the tokenizer, packing invariants, process sharding, exact resume, bad data."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxlm import config, data, datasets, tokenizer
from jaxlm.data import Shard

SEQ = 64


@pytest.fixture(scope="module")
def data_dir(stdlib_data_dir):
    return stdlib_data_dir


@pytest.fixture(scope="module")
def cfg(data_dir):
    """The embedded corpus with a small tokenizer (vocab 512) and short rows."""
    return config.from_dict({
        "model": {"vocab_size": 512, "d_model": 32, "num_heads": 4, "num_kv_heads": 4,
                  "max_seq_len": SEQ},
        "data": {"dataset": "stdlib", "data_dir": data_dir, "seq_len": SEQ},
        "train": {"global_batch_size": 8, "seed": 3},
    })


@pytest.fixture(scope="module")
def tok(cfg):
    return tokenizer.for_config(cfg)  # prepares the corpus and trains the tokenizer once


# --- builders ----------------------------------------------------------------------------------


def _paths(builder, split):
    src = builder.as_data_source(split)
    return [src[i]["path"].decode() for i in range(len(src))]


def test_stdlib_builder_splits_are_disjoint_and_stable(tmp_path):
    files = datasets.stdlib_files(datasets.stdlib_root())[:40]
    runs = []
    for d in ("a", "b"):
        b = datasets.StdlibCorpus(root=datasets.stdlib_root(), max_files=40,
                                  data_dir=str(tmp_path / d), file_format="array_record")
        b.download_and_prepare()
        runs.append({s: sorted(_paths(b, s)) for s in ("train", "validation")})
    assert runs[0] == runs[1]  # stable across runs (and machines: the split is a path hash)
    train, validation = set(runs[0]["train"]), set(runs[0]["validation"])
    assert not train & validation
    assert validation, "40 files should put at least one in validation"
    assert train | validation <= set(files)
    assert len(train | validation) + b.counts.counts["empty_skipped"] == len(files)
    # The file text is stored exactly.
    src = b.as_data_source("train")
    example = src[0]
    with open(os.path.join(datasets.stdlib_root(), example["path"].decode()), "rb") as f:
        assert example["text"] == f.read()


def test_stdlib_skips_test_dirs():
    files = datasets.stdlib_files(datasets.stdlib_root())
    assert len(files) > 300
    assert not any(part in datasets.STDLIB_SKIP_DIRS for f in files for part in f.split(os.sep))


def test_prepare_summary(cfg, tok):
    summary = datasets.prepare(cfg.data)
    assert summary["splits"]["train"] > 500 and summary["splits"]["validation"] > 5
    assert summary["documents"] == summary["splits"]["train"] + summary["splits"]["validation"]


def test_unprepared_catalog_dataset_is_one_clear_error(cfg):
    bad = cfg.replace(data={"dataset": "c4/en"}).data
    with pytest.raises(datasets.DataError, match="'c4/en' is not prepared under"):
        datasets.source(bad, "train")


# --- tokenizer ---------------------------------------------------------------------------------


TRICKY = [
    "def f(x):\n\tif x:\n        return 'héllo'  \n\n",
    "  leading spaces, trailing tab\t\n\r\nwindows line\r\n",
    "ünïcödé ≠ ascii; emoji 😀 and CJK 漢字 use byte fallback\n",
    "\n\n\t\t\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_round_trips_exactly(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text


def test_tokenizer_specials_and_pieces(tok):
    sp = tok.sp
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (
        tokenizer.PAD_ID, tokenizer.UNK_ID, tokenizer.BOS_ID, tokenizer.EOS_ID)
    assert tok.vocab_size == 512
    assert list(tok.encode("\n")) == [sp.piece_to_id("\n")]
    assert list(tok.encode("\t")) == [sp.piece_to_id("\t")]


def test_vocab_larger_than_model_is_rejected(cfg, tok):
    small = cfg.replace(model={"vocab_size": 300}, data={"tokenizer": tok.path})
    with pytest.raises(tokenizer.TokenizerError, match="model.vocab_size"):
        tokenizer.for_config(small)


def test_missing_tokenizer_file(cfg):
    bad = cfg.replace(data={"tokenizer": "/nonexistent/tok.model"})
    with pytest.raises(tokenizer.TokenizerError, match="/nonexistent/tok.model"):
        tokenizer.for_config(bad)


# --- packing -----------------------------------------------------------------------------------


def test_packing_invariants(cfg, tok):
    """Validation split, in order: the packed rows hold exactly BOS + ids + EOS of every
    document, in order, with segment ids and positions restarting at each segment."""
    docs = data.documents(cfg, "validation", Shard(0, 1), train=False)
    expected = np.concatenate([
        np.concatenate([[tokenizer.BOS_ID], tok.encode(d["text"].decode()), [tokenizer.EOS_ID]])
        for d in docs
    ])
    rows = list(data.packed(cfg, "validation", Shard(0, 1), False, tok, 1))
    got = []
    for row in rows:
        tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
        assert tokens.shape == seg.shape == pos.shape == (SEQ + 1,)
        real = seg != 0
        assert np.all(real[: real.sum()]), "padding only at the end of a row"
        assert np.all(tokens[~real] == tokenizer.PAD_ID)
        for s in np.unique(seg[real]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1)), "contiguous"
            assert np.array_equal(pos[where], np.arange(len(where))), "positions restart"
        got.append(tokens[real])
    got = np.concatenate(got)
    np.testing.assert_array_equal(got, expected)  # nothing lost, duplicated or reordered
    # Every document ends with EOS, and the token after an EOS starts a document with BOS.
    eos = np.flatnonzero(got == tokenizer.EOS_ID)
    assert len(eos) == len(docs)
    assert np.all(got[eos[:-1] + 1] == tokenizer.BOS_ID)


def test_model_batch_shift_and_weights():
    packed = {
        "tokens": np.array([[2, 10, 11, 3, 2, 12, 3, 0]]),
        "tokens_segment_ids": np.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
        "tokens_positions": np.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
    }
    b = data.model_batch(packed)
    np.testing.assert_array_equal(b["inputs"], [[2, 10, 11, 3, 2, 12, 3]])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 3, 2, 12, 3, 0]])
    # EOS -> next BOS crosses documents; the last target is padding.
    np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 0, 1, 1, 0]])


def test_train_batches_shape(cfg, tok):
    batch = next(iter(data.train_dataset(cfg, Shard(0, 1), tok)))
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "weights"}
    for v in batch.values():
        assert v.shape == (8, SEQ)
    assert batch["weights"].mean() > 0.9


def test_eval_is_deterministic_finite_and_padded(cfg, tok):
    a = list(data.eval_dataset(cfg, Shard(0, 1), tok))
    b = list(data.eval_dataset(cfg, Shard(0, 1), tok))
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert all(x["inputs"].shape == (8, SEQ) for x in a)
    last_rows_weight = a[-1]["weights"].sum(axis=1)
    assert last_rows_weight[-1] == 0 or len(a[-1]["inputs"]) == 8


def test_processes_read_disjoint_shards_covering_the_split(cfg, tok):
    def paths(shard):
        return [d["path"] for d in data.documents(cfg, "train", shard, train=False)]

    everything = paths(Shard(0, 1))
    first, second = paths(Shard(0, 2)), paths(Shard(1, 2))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(everything)
    # And through the whole pipeline: the two processes' first batches differ.
    b0 = next(iter(data.train_dataset(cfg, Shard(0, 2), tok)))
    b1 = next(iter(data.train_dataset(cfg, Shard(1, 2), tok)))
    assert b0["inputs"].shape == (4, SEQ)
    assert not np.array_equal(b0["inputs"], b1["inputs"])


def test_shuffle_changes_every_epoch(cfg):
    ds = data.documents(cfg, "validation", Shard(0, 1), train=True)
    n = len(data.documents(cfg, "validation", Shard(0, 1), train=False))
    epoch0 = [ds[i]["path"] for i in range(n)]
    epoch1 = [ds[i]["path"] for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize("streams", [0, 4])
def test_resume_is_exact(cfg, tok, streams):
    """Take k batches, save the state, restore it into a fresh iterator: the next m batches are
    bitwise those of the uninterrupted iterator (one stream, or several zipped)."""
    cfg = cfg.replace(data={"streams": streams})
    k, m = 3, 4
    reference = iter(data.train_dataset(cfg, Shard(0, 1), tok))
    for _ in range(k):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))  # what a checkpoint stores
    expected = [next(reference) for _ in range(m)]
    resumed = iter(data.train_dataset(cfg, Shard(0, 1), tok))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_global_batch_assembly(cfg, tok):
    batch = next(iter(data.train_dataset(cfg, Shard(0, 1), tok)))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    arrays = data.to_global(batch, sharding)
    assert arrays["inputs"].shape == (8, SEQ) and arrays["inputs"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])


def test_bench_reports_tokens_per_sec(cfg, tok):
    result = data.bench(cfg, batches=5)
    assert result["tokens"] == 5 * 8 * SEQ and result["tokens_per_sec"] > 0


# --- bad data ----------------------------------------------------------------------------------


def test_bad_local_files_are_counted_not_lost(tmp_path):
    """With cleaning off (tests/test_cleaning.py tests it), preparing loses nothing it can read."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    (src / "blank.txt").write_text("  \n\n")
    (src / "bad_utf8.txt").write_bytes(b"good start \xff\xfe bad bytes\n")
    long_line = ("word " * 1_000_000)[:5_000_000]  # a 5 MB single line
    (src / "long.txt").write_text(long_line)
    records = [{"text": f"document number {i}\n"} for i in range(60)]
    lines = [json.dumps(r) for r in records] + ['{"body": "no text field"}', "{not json"]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config.from_dict({
        "model": {"vocab_size": 300, "d_model": 32, "num_heads": 4, "num_kv_heads": 4,
                  "max_seq_len": 128},
        "data": {"dataset": "local", "files": str(src / "*"), "local_name": "bad_data",
                 "data_dir": str(tmp_path / "data"), "seq_len": 128, "clean": False},
        "train": {"global_batch_size": 2},
    })
    summary = datasets.prepare(cfg.data)
    assert summary["empty_skipped"] == 2
    assert summary["invalid_utf8_replaced"] == 1
    assert summary["missing_field_skipped"] == 1 and summary["invalid_json_skipped"] == 1
    assert summary["documents"] == 62 == sum(summary["splits"].values())
    # Every document is packed whole (the long one split across rows, not dropped).
    tok = tokenizer.for_config(cfg)
    texts, packed_tokens = [], 0
    for split in ("train", "validation"):
        if summary["splits"][split] == 0:
            continue
        texts += [d["text"].decode() for d in data.documents(cfg, split, Shard(0, 1), False)]
        packed_tokens += sum(int((r["tokens_segment_ids"] != 0).sum())
                             for r in data.packed(cfg, split, Shard(0, 1), False, tok, 1))
    assert long_line in texts
    assert sum("\ufffd" in t for t in texts) == 1, [t[:80] for t in texts if "\ufffd" in t]
    assert packed_tokens == sum(len(tok.encode(t)) + 2 for t in texts)


def test_empty_glob_is_one_clear_error(tmp_path):
    cfg = config.from_dict({
        "data": {"dataset": "local", "files": str(tmp_path / "nothing" / "*.txt"),
                 "data_dir": str(tmp_path / "data")},
    })
    with pytest.raises(datasets.DataError, match="matches no files") as info:
        datasets.prepare(cfg.data)
    assert str(tmp_path / "nothing") in str(info.value) and "\n" not in str(info.value)


def test_tokenizer_training_failure_is_one_line(tmp_path):
    with pytest.raises(tokenizer.TokenizerError, match="cannot train a 40-piece tokenizer") as info:
        tokenizer.train(["some text with many different characters: é ü ß 漢 字"], 40,
                        str(tmp_path / "t.model"))
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "t.model")


def test_prepared_catalog_dataset_by_name(tmp_path):
    """Any TFDS dataset already prepared in array_record under data_dir is read by its name
    (here one jaxlm prepared itself, read back as a catalog dataset), with its text feature."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"doc{i}.txt").write_text(f"catalog document {i}\n" * 20)
    local = config.from_dict({
        "data": {"dataset": "local", "files": str(src / "*.txt"), "local_name": "catalog_like",
                 "data_dir": str(tmp_path / "data"), "clean": False},  # no tag on the name
    })
    datasets.prepare(local.data)
    catalog = local.replace(data={"dataset": "local_text/catalog_like", "text_field": "text"})
    train_split = datasets.source(catalog.data, "train")
    texts = sorted(train_split[i]["text"].decode() for i in range(len(train_split)))
    assert texts and all(t.startswith("catalog document") for t in texts)
    pinned = catalog.replace(data={"dataset": "local_text/catalog_like:1.0.0"})
    assert len(datasets.source(pinned.data, "train")) == len(train_split)
    with pytest.raises(datasets.DataError, match="no feature data.text_field='body'"):
        datasets.source(catalog.replace(data={"text_field": "body"}).data, "train")
    with pytest.raises(datasets.DataError, match="no split 'test'"):
        datasets.source(catalog.data, "test")


def test_tfrecord_datasets_are_refused(tmp_path):
    version_dir = tmp_path / "data" / "old_corpus" / "1.0.0"
    version_dir.mkdir(parents=True)
    (version_dir / "dataset_info.json").write_text(json.dumps({"fileFormat": "tfrecord"}))
    cfg = config.from_dict({"data": {"dataset": "old_corpus", "data_dir": str(tmp_path / "data")}})
    with pytest.raises(datasets.DataError, match="tfrecord format; jaxlm reads array_record"):
        datasets.source(cfg.data, "train")


def test_data_and_tokenizer_commands(tmp_path, cfg):
    import subprocess
    import sys

    common = ["--config=configs/tiny.py", f"--config.data.data_dir={cfg.data.data_dir}",
              "--config.model.vocab_size=512"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "data", "prepare", *common],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["splits"]["train"] > 500
    model_path = tmp_path / "tok.model"
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "tokenizer", "train", *common,
                          f"--output={model_path}"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"tokenizer": str(model_path), "vocab_size": 512}
    assert tokenizer.Tokenizer(str(model_path)).decode(
        tokenizer.Tokenizer(str(model_path)).encode("x = 1\n")) == "x = 1\n"


@pytest.mark.parametrize("streams", [2, 4])
def test_streams_make_batches_independent_of_process_count(cfg, tok, streams):
    """With data.streams fixed, one process's batch equals two processes' halves side by side,
    the layout that jax assembles into the global batch (process 0's rows first), for training
    and validation batches. With 4 streams each of the two processes reads two."""
    fixed = cfg.replace(data={"streams": streams})
    for make, batches in ((data.train_dataset, 3), (data.eval_dataset, 1000)):
        alone = iter(make(fixed, Shard(0, 1), tok))
        first = iter(make(fixed, Shard(0, 2), tok))
        second = iter(make(fixed, Shard(1, 2), tok))
        for i in range(batches):
            whole, a, b = next(alone, None), next(first, None), next(second, None)
            if whole is None:  # the validation split is read once
                assert (a, b) == (None, None) and i > 2
                break
            # A process that has run out feeds weight-0 rows while another still reads.
            a = data.empty_batch(fixed, Shard(0, 2)) if a is None else a
            b = data.empty_batch(fixed, Shard(1, 2)) if b is None else b
            assert a["inputs"].shape == (4, SEQ)
            for key in whole:
                np.testing.assert_array_equal(whole[key], np.concatenate([a[key], b[key]]))
    # Without fixed streams, the data depends on the process count (the test can fail).
    default_alone = next(iter(data.train_dataset(cfg, Shard(0, 1), tok)))
    assert not np.array_equal(default_alone["inputs"][:4], next(iter(
        data.train_dataset(cfg, Shard(0, 2), tok)))["inputs"])


def test_streams_must_fit_processes_and_batch(cfg, tok):
    with pytest.raises(datasets.DataError, match="'data.streams' \\(3\\) must be a multiple"):
        data.train_dataset(cfg.replace(data={"streams": 3}), Shard(0, 2), tok)
    with pytest.raises(datasets.DataError, match="train.global_batch_size"):
        data.train_dataset(cfg.replace(data={"streams": 3}), Shard(0, 1), tok)


def test_empty_batch_adds_nothing(cfg):
    batch = data.empty_batch(cfg, Shard(0, 2))
    assert batch["inputs"].shape == (4, SEQ) and batch["weights"].sum() == 0

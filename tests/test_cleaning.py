"""Cleaning at prepare time (jaxlm/cleaning.py): each step removes or keeps exactly what its key
says, the counts are right, and with cleaning off the prepared text is the files' text."""

import json
import os
import random

import pytest

from jaxlm import cleaning, config, datasets


def _prose(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    lines = [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(words // 12)]
    return "\n".join(lines) + "\n"


def _edited(text: str, edits: int) -> str:
    words = text.split(" ")
    for i in range(edits):
        words[(i + 1) * len(words) // (edits + 1)] = "EDITED"
    return " ".join(words)


BASE = _prose(0)
CORPUS = {
    "a_base.txt": BASE,
    "b_exact.txt": BASE,  # the same text: an exact duplicate
    "c_near.txt": _edited(BASE, 3),  # three words changed: a near duplicate (Jaccard ~0.9)
    "d_binary.txt": random.Random(1).randbytes(3000),
    "e_long_line.txt": _prose(2) + "x" * 5000 + "\n",
    "f_control.txt": "caf" + "e\u0301" + "\x00\x1b text\r\nwith\ttabs\r\n" + _prose(3),
    "g_short.txt": "print(1)\n",
    "h_other.txt": _prose(4),
}
F_CLEAN = "caf\u00e9 text\nwith\ttabs\n" + _prose(3)  # NFC, no NUL / ESC / CR


def _write_corpus(root) -> str:
    root.mkdir(parents=True)
    for name, text in CORPUS.items():
        path = root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    # Two jsonl rows repeating each other, and one repeating a .txt document.
    rows = [{"text": _prose(5)}, {"text": _prose(5)}, {"text": _prose(4)}]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "*")


def _prepare(tmp_path, **data):
    pattern = str(tmp_path / "src" / "*")
    if not (tmp_path / "src").exists():
        _write_corpus(tmp_path / "src")
    cfg = config.from_dict({"data": {"dataset": "local", "files": pattern, "local_name": "crafted",
                                     "data_dir": str(tmp_path / "data"), **data}})
    summary = datasets.prepare(cfg.data)
    b = datasets.builder(cfg.data)
    docs = {}
    for split in ("train", "validation"):
        if summary["splits"][split]:
            src = b.as_data_source(split)
            for i in range(len(src)):
                docs[os.path.basename(src[i]["path"].decode())] = (split, src[i]["text"].decode())
    return summary, docs


def _removed(summary):
    return {k: summary[k] for k in cleaning.COUNT_KEYS if summary[k]}


def test_defaults_remove_each_kind_of_junk_and_count_it(tmp_path):
    summary, docs = _prepare(tmp_path)
    kept = set(docs)
    # One of the three copies of BASE survives; which one depends on the split order (validation
    # first), so the splits never share a text.
    assert len(kept & {"a_base.txt", "b_exact.txt", "c_near.txt"}) == 1
    assert datasets.validation_keys(list(CORPUS) + ["rows.jsonl:0", "rows.jsonl:1",
                                                    "rows.jsonl:2"]) == {"b_exact.txt"}
    assert docs["b_exact.txt"][0] == "validation"  # kept over a_base.txt, which sorts first
    assert {"d_binary.txt", "e_long_line.txt", "g_short.txt"}.isdisjoint(kept)
    assert {"f_control.txt", "h_other.txt"} <= kept
    assert docs["f_control.txt"][1] == F_CLEAN
    # rows.jsonl: row 0 kept, row 1 repeats it exactly, row 2 repeats h_other.txt exactly.
    rows = sorted(k for k in kept if k.startswith("rows.jsonl"))
    assert rows == ["rows.jsonl:0"], rows
    assert _removed(summary) == {
        "nfc_changed": 1, "control_chars_removed_from": 2,  # f, and the binary file
        "too_short_removed": 1, "replacement_chars_removed": 1, "long_line_removed": 1,
        "exact_duplicates_removed": 3, "near_duplicates_removed": 1,
    }
    assert summary["documents"] == len(docs) == 4 == sum(summary["splits"].values())
    texts = [t for _, t in docs.values()]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("key, value, now_kept, zero", [
    ("min_chars", 0, "g_short.txt", "too_short_removed"),
    ("max_line_chars", 0, "e_long_line.txt", "long_line_removed"),
    ("max_replacement_share", 1.0, "d_binary.txt", "replacement_chars_removed"),
    ("dedup_near", 0.0, "c_near.txt", "near_duplicates_removed"),
    ("dedup_near", 0.95, "c_near.txt", "near_duplicates_removed"),  # the threshold is the key
])
def test_each_key_turns_its_step_off(tmp_path, key, value, now_kept, zero):
    summary, docs = _prepare(tmp_path, **{key: value})
    assert now_kept in docs and summary[zero] == 0


def test_max_chars(tmp_path):
    summary, docs = _prepare(tmp_path, max_chars=4000)  # e_long_line.txt has 5000+ characters
    assert summary["too_long_removed"] == 1 and summary["long_line_removed"] == 0
    assert all(len(t) <= 4000 for _, t in docs.values())


def test_normalisation_keys(tmp_path):
    summary, docs = _prepare(tmp_path, clean_nfc=False)
    assert docs["f_control.txt"][1] == F_CLEAN.replace("\u00e9", "e\u0301")
    assert summary["nfc_changed"] == 0
    summary, docs = _prepare(tmp_path / "more", clean_control=False, max_replacement_share=1.0)
    assert docs["f_control.txt"][1].startswith("caf\u00e9\x00\x1b text\r\n")
    assert summary["control_chars_removed_from"] == 0


def test_exact_off_leaves_copies_to_the_near_step(tmp_path):
    summary, docs = _prepare(tmp_path, dedup_exact=False)
    assert summary["exact_duplicates_removed"] == 0 and summary["near_duplicates_removed"] == 4
    summary, docs = _prepare(tmp_path / "more", dedup_exact=False, dedup_near=0.0)
    assert {"a_base.txt", "b_exact.txt", "c_near.txt", "rows.jsonl:1"} <= set(docs)


def test_cleaning_off_prepares_the_files_as_read(tmp_path):
    summary, docs = _prepare(tmp_path, clean=False)
    expected = {}
    for name, text in CORPUS.items():
        raw = text if isinstance(text, bytes) else text.encode()
        expected[name] = raw.decode("utf-8", errors="replace")
    for i, line in enumerate((tmp_path / "src" / "rows.jsonl").read_text().splitlines()):
        expected[f"rows.jsonl:{i}"] = json.loads(line)["text"]
    assert {k: t for k, (_, t) in docs.items()} == expected
    assert _removed(summary) == {}
    # The prepared copy keeps the name it had before cleaning existed, so it is the same files.
    assert os.path.basename(os.path.dirname(summary["path"])) == "crafted"


def test_other_settings_prepare_another_copy(tmp_path):
    one, _ = _prepare(tmp_path)
    two, _ = _prepare(tmp_path, dedup_near=0.9)
    assert one["path"] != two["path"] and "crafted_c" in one["path"]


def test_out_of_range_keys_are_one_line():
    with pytest.raises(config.ConfigError, match="'data.dedup_near' must be in"):
        config.from_dict({"data": {"dedup_near": 1.5}})
    with pytest.raises(config.ConfigError, match="'data.min_chars' must be >= 0"):
        config.from_dict({"data": {"min_chars": -1}})


def test_embedded_corpus_is_cleaned(stdlib_data_dir):
    """The real corpus: no text twice, and of the near-identical codec tables only some remain."""
    cfg = config.from_dict({"data": {"data_dir": stdlib_data_dir}})
    summary = datasets.prepare(cfg.data)
    assert summary["near_duplicates_removed"] > 5 and summary["exact_duplicates_removed"] >= 1
    texts, paths = [], set()
    for split in ("train", "validation"):
        src = datasets.source(cfg.data, split)
        for i in range(len(src)):
            texts.append(src[i]["text"])
            paths.add(src[i]["path"].decode())
    assert len(set(texts)) == len(texts)
    assert len(paths & {"encodings/cp037.py", "encodings/cp1140.py", "encodings/cp500.py"}) == 1

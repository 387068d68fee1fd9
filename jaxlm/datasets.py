"""Text datasets as TFDS array_record sources: the embedded corpus, local files, catalog datasets.

- `stdlib`: the `.py` files of the running interpreter's standard library (no download, present
  on every machine that runs jaxlm). One example per file: {"path", "text"}.
- `local`: users' own `.txt` files (one document per file) or `.jsonl` files (one document per
  line, text under `data.text_field`), found by the glob `data.files`, prepared under the name
  `data.local_name`.
- any other name (`c4/en`, `lm1b`, ...): a TFDS dataset already prepared in array_record format
  under `data.data_dir`, read from its directory (no catalog code or TensorFlow imported).

`stdlib` and `local` prepare themselves on first use. Preparing cleans the text (jaxlm/cleaning.py:
normalisation, filters, exact and near deduplication, each step a `data.*` key) and writes
array_record files (TFDS's format that needs no TensorFlow) and a `jaxlm_prepare.json` summary with
the counts of skipped empty documents, of documents whose invalid UTF-8 was replaced, and of what
each cleaning step removed or changed. Train/validation splits are decided by a hash of each
document's path, so they are stable across runs and machines; cleaning only removes documents.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
import sysconfig
import tempfile
from collections.abc import Iterator

import tensorflow_datasets as tfds

from jaxlm import cleaning, paths
from jaxlm.config import DataConfig

STDLIB = "stdlib"
LOCAL = "local"
VALIDATION_PERCENT = 3  # share of documents (by path hash) in the validation split
SUMMARY_FILE = "jaxlm_prepare.json"
# Directories of the stdlib that some installs lack or that hold deliberately broken files, and
# pydoc_data: one generated 750 KB string of English help text, not code.
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}


class _QuietCustomConfigs(logging.Filter):
    """TFDS logs a warning each time a builder gets a config not in BUILDER_CONFIGS, which is how
    jaxlm names the stdlib corpus (by Python version) and local datasets (by the user's name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_QuietCustomConfigs())


class DataError(ValueError):
    """A dataset cannot be found, prepared or read. The message is one line naming the path."""


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")


def validation_keys(keys: list[str]) -> set[str]:
    """The keys in the validation split: VALIDATION_PERCENT of them by hash, and at least one
    (the smallest hash) when there are two or more, so small corpora still have a validation set."""
    chosen = {k for k in keys if _key_hash(k) % 100 < VALIDATION_PERCENT}
    if not chosen and len(keys) > 1:
        chosen = {min(keys, key=_key_hash)}
    return chosen


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted, skipping STDLIB_SKIP_DIRS."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS)
        rel = os.path.relpath(directory, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.endswith(".py")]
    return sorted(found)


def stdlib_config_name() -> str:
    """The corpus depends on the interpreter: its version names the config, so two Pythons never
    share one prepared dataset (or tokenizer)."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def stdlib_corpus_name(d: DataConfig) -> str:
    """Names the prepared embedded corpus: its interpreter, version and cleaning. Files derived
    from it (tokenizers, tasks, fine-tuning rows) are kept under this name."""
    tag = cleaning.Settings.from_data(d).tag()
    return f"stdlib-{stdlib_config_name()}-v{StdlibCorpus.VERSION}" + (f"-{tag}" if tag else "")


class _Counts:
    """What preparing skipped, repaired or cleaned away, written to SUMMARY_FILE."""

    def __init__(self):
        self.counts = {"documents": 0, "empty_skipped": 0, "invalid_utf8_replaced": 0,
                       "missing_field_skipped": 0, "invalid_json_skipped": 0,
                       **dict.fromkeys(cleaning.COUNT_KEYS, 0)}

    def decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["invalid_utf8_replaced"] += 1
            return raw.decode("utf-8", errors="replace")

    def empty(self, text: str) -> bool:
        if text.strip():
            return False
        self.counts["empty_skipped"] += 1
        return True


def _text_features():
    return tfds.features.FeaturesDict({"path": tfds.features.Text(), "text": tfds.features.Text()})


class _CleanedSplits:
    """The two splits of a text builder, cleaned (jaxlm/cleaning.py).

    A first pass reads every document, validation first, and decides which are kept (duplicates
    are only known with the whole corpus seen); the examples are then read again, each normalised
    the same way. Builders give `_read(split, counts)`: (key, text) in a fixed order."""

    SPLITS = ("validation", "train")  # cleaning order: a duplicate is removed from train

    def _read(self, split: str, counts: _Counts) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def _cleaned_splits(self, settings: cleaning.Settings) -> dict:
        cleaner = cleaning.Cleaner(settings)
        kept = set()
        for split in self.SPLITS:
            for key, text in self._read(split, self.counts):
                text = cleaner.normalize(text)
                if not self.counts.empty(text) and cleaner.admit(text):
                    kept.add(key)
        self.counts.counts.update(cleaner.counts, documents=len(kept))
        return {split: self._generate_examples(split, kept, settings) for split in ("train", "validation")}

    def _generate_examples(self, split: str, kept: set[str], settings: cleaning.Settings):
        normal = cleaning.Cleaner(settings)
        for key, text in self._read(split, _Counts()):
            if key in kept:
                yield key, {"path": key, "text": normal.normalize(text, count=False)}


def _config_name(name: str, settings: cleaning.Settings) -> str:
    return f"{name}_{tag}" if (tag := settings.tag()) else name


class StdlibCorpus(_CleanedSplits, tfds.core.GeneratorBasedBuilder):
    """The Python standard library's .py sources, one example per file."""

    # Bump when the selection of files changes, so prepared copies are rebuilt, not reused.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Skip pydoc_data.", "1.0.0": "First version."}

    def __init__(self, *, root: str | None = None, max_files: int | None = None,
                 clean: cleaning.Settings | None = None, **kwargs):
        self._root = root or stdlib_root()
        self._max_files = max_files
        self._clean = clean or cleaning.Settings.off()
        name = stdlib_config_name()
        if root is not None or max_files is not None:
            tag = hashlib.sha256(f"{self._root}|{max_files}".encode()).hexdigest()[:8]
            name += f"_custom{tag}"
        self.counts = _Counts()
        super().__init__(config=tfds.core.BuilderConfig(name=_config_name(name, self._clean)),
                         **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(features=_text_features())

    def _split_generators(self, dl_manager):
        files = stdlib_files(self._root)[: self._max_files]
        if not files:
            raise DataError(f"no .py files under the stdlib root '{self._root}'")
        validation = validation_keys(files)
        self._files = {"train": [f for f in files if f not in validation],
                       "validation": [f for f in files if f in validation]}
        return self._cleaned_splits(self._clean)

    def _read(self, split, counts):
        for rel in self._files[split]:
            with open(os.path.join(self._root, rel), "rb") as f:
                yield rel, counts.decode(f.read())


class LocalText(_CleanedSplits, tfds.core.GeneratorBasedBuilder):
    """Users' .txt files (one document each) and .jsonl files (one document per line)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, name: str, pattern: str, text_field: str = "text",
                 clean: cleaning.Settings | None = None, **kwargs):
        self._pattern = os.path.expanduser(pattern)
        self._text_field = text_field
        self._clean = clean or cleaning.Settings.off()
        self.counts = _Counts()
        config = tfds.core.BuilderConfig(name=_config_name(name, self._clean),
                                         description=f"{pattern} [{text_field}]")
        super().__init__(config=config, **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(features=_text_features())

    def _split_generators(self, dl_manager):
        files = sorted(glob.glob(self._pattern, recursive=True))
        self._paths = [f for f in files if os.path.isfile(f)]
        if not self._paths:
            raise DataError(f"data.files pattern '{self._pattern}' matches no files")
        # Split by the path relative to the files' common folder: moving the whole tree elsewhere
        # keeps every document in its split.
        self._root = os.path.commonpath([os.path.dirname(f) for f in self._paths])
        keys = [os.path.relpath(k, self._root) for f in self._paths for k in self._keys(f)]
        self._validation = validation_keys(keys)
        return self._cleaned_splits(self._clean)

    def _keys(self, path: str) -> Iterator[str]:
        """Keys of the documents `path` may hold (before skipping empty or invalid ones)."""
        if not path.endswith(".jsonl"):
            yield path
            return
        with open(path, "rb") as f:
            yield from (f"{path}:{i}" for i, line in enumerate(f) if line.strip())

    def _read(self, split, counts):
        def wanted(key: str) -> bool:
            return (os.path.relpath(key, self._root) in self._validation) == (split == "validation")

        for path in self._paths:
            yield from self._documents(path, wanted, counts)

    def _documents(self, path: str, wanted, counts: _Counts) -> Iterator[tuple[str, str]]:
        """(key, text) of the documents in `path` whose key `wanted` accepts; only those are
        decoded, so each document is counted once, by the split that holds it."""
        if not path.endswith(".jsonl"):
            if wanted(path):
                with open(path, "rb") as f:
                    yield path, counts.decode(f.read())
            return
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                key = f"{path}:{i}"
                if not line.strip() or not wanted(key):
                    continue
                try:
                    record = json.loads(counts.decode(line))
                except json.JSONDecodeError:
                    counts.counts["invalid_json_skipped"] += 1
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(self._text_field), str):
                    counts.counts["missing_field_skipped"] += 1
                    continue
                yield key, record[self._text_field]


def data_dir(cfg: DataConfig) -> str:
    return paths.resolve(cfg.data_dir) if paths.is_remote(cfg.data_dir) else os.path.expanduser(cfg.data_dir)


def local_data_dir(cfg: DataConfig) -> str:
    """Where files derived from the data for local readers (lm-eval task files, fine-tuning rows)
    go: `data_dir` itself, or its local cache when it is on object storage."""
    return paths.cache_path(data_dir(cfg)) if paths.is_remote(cfg.data_dir) else data_dir(cfg)


def builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `cfg.dataset` (prepared or not)."""
    match cfg.dataset:
        case "stdlib":
            return StdlibCorpus(clean=cleaning.Settings.from_data(cfg), data_dir=data_dir(cfg),
                                file_format="array_record")
        case "local":
            return LocalText(name=cfg.local_name, pattern=cfg.files, text_field=cfg.text_field,
                             clean=cleaning.Settings.from_data(cfg), data_dir=data_dir(cfg),
                             file_format="array_record")
        case _:
            return _prepared_builder(cfg)


def _prepared_builder(cfg: DataConfig) -> tfds.core.DatasetBuilder:
    name, _, version = cfg.dataset.partition(":")
    root = paths.join(data_dir(cfg), name)
    versions = sorted(
        (v for v in (paths.listdir(root) if paths.isdir(root) else [])
         if paths.isfile(paths.join(root, v, "dataset_info.json"))),
        key=lambda v: tuple(int(p) for p in v.split(".") if p.isdigit()),
    )
    if version:
        versions = [v for v in versions if v == version]
    if not versions:
        raise DataError(
            f"dataset '{cfg.dataset}' is not prepared under '{data_dir(cfg)}' (no "
            f"{name}/<version>/dataset_info.json); prepare it with TFDS in array_record format, "
            f"or use data.dataset=stdlib or local"
        )
    path = paths.join(root, versions[-1])
    file_format = json.loads(paths.read_text(paths.join(path, "dataset_info.json"))).get(
        "fileFormat", "tfrecord")
    if file_format != "array_record":
        raise DataError(f"dataset at '{path}' is in {file_format} format; jaxlm reads array_record "
                        "(prepare with file_format='array_record'; tfrecord needs TensorFlow)")
    return tfds.builder_from_directory(path)


def prepare(cfg: DataConfig) -> dict:
    """Prepare `cfg.dataset` if needed; returns the summary (path, split sizes, skipped counts)."""
    b = builder(cfg)
    summary_path = paths.join(str(b.data_dir), SUMMARY_FILE)
    if isinstance(b, (StdlibCorpus, LocalText)) and not _is_prepared(b):
        if paths.is_remote(cfg.data_dir):  # TFDS writes array_record to local files only
            with tempfile.TemporaryDirectory(prefix="jaxlm-prepare-") as staging:
                staged = builder(dataclasses.replace(cfg, data_dir=staging))
                _build(staged, cfg.dataset, str(b.data_dir))
                paths.upload_tree(str(staged.data_dir), str(b.data_dir),
                                  last="dataset_info.json")  # the mark of a finished copy
            b = builder(cfg)
        else:
            _build(b, cfg.dataset, str(b.data_dir))
    counts = json.loads(paths.read_text(summary_path)) if paths.isfile(summary_path) else {}
    return {"dataset": cfg.dataset, "path": str(b.data_dir), "splits": _split_sizes(b), **counts}


def _build(b: tfds.core.DatasetBuilder, name: str, shown: str) -> dict:
    """Prepare a stdlib or local builder into its (local) folder, with SUMMARY_FILE beside it."""
    os.makedirs(os.path.dirname(str(b.data_dir)), exist_ok=True)
    tfds.disable_progress_bar()  # our summary below says what was prepared
    try:
        b.download_and_prepare()
    except AssertionError as e:  # TFDS refuses to write a split with no examples
        raise DataError(f"cannot prepare dataset '{name}': {e} (too few non-empty "
                        "documents for a train and a validation split)") from None
    paths.write_text(paths.join(str(b.data_dir), SUMMARY_FILE), json.dumps(b.counts.counts))
    splits = ", ".join(f"{n} {split}" for split, n in _split_sizes(b).items())
    done = {k: v for k, v in b.counts.counts.items() if v and k != "documents"}
    print(f"prepared dataset {name} at {shown}: {splits} documents; skipped, "
          f"repaired or cleaned: {json.dumps(done) if done else 'none'}", flush=True)
    return b.counts.counts


def _split_sizes(b: tfds.core.DatasetBuilder) -> dict[str, int]:
    return {name: info.num_examples for name, info in b.info.splits.items()}


def _is_prepared(b: tfds.core.DatasetBuilder) -> bool:
    return paths.isfile(paths.join(str(b.data_dir), "dataset_info.json"))


def source(cfg: DataConfig, split: str):
    """Random-access source of `split` (prepared on first use for stdlib and local)."""
    prepare(cfg)
    b = builder(cfg)
    if split not in b.info.splits:
        raise DataError(f"dataset '{cfg.dataset}' has no split '{split}'; it has "
                        f"{', '.join(sorted(b.info.splits))}")
    feature = text_feature(cfg)
    if feature not in b.info.features:
        raise DataError(f"dataset '{cfg.dataset}' has no feature data.text_field="
                        f"'{feature}'; it has {', '.join(sorted(b.info.features))}")
    return b.as_data_source(split)


def text_feature(cfg: DataConfig) -> str:
    """The feature holding the text: always "text" for stdlib and local (for local,
    data.text_field names the jsonl field read at prepare time), data.text_field otherwise."""
    return "text" if cfg.dataset in (STDLIB, LOCAL) else cfg.text_field

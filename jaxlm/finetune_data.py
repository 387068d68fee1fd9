"""Fine-tuning data that needs no download, derived from the embedded corpus deterministically.

- `stdlib_sft` (`data.dataset=stdlib_sft`): supervised fine-tuning rows
  `{"prompt": a function's def line(s) and docstring, "completion": the rest of its body}`, from
  the corpus's train split for training and its validation split for validation, so the
  validation functions are ones the pretrained model never read.
- `stdlib_classify` (`data.dataset=stdlib_classify`): `{"text": a snippet of SNIPPET_LINES lines,
  "label": the top-level package of its file}` for the PACKAGES below, the snippets of a file
  all on one side: a quarter of each package's files (every 4th in the order of a hash of
  their paths) are validation files, whichever corpus split they are in. (The pretraining run
  read most of these files as text, but never their package names as labels.)

The JSONL files are written once under `<data_dir>/finetune/<corpus>/` and then read like any
user's files (jaxlm/sft.py, jaxlm/classify.py).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os

from jaxlm import datasets, paths, tasks
from jaxlm.config import DataConfig

VERSION = 1  # bump when the rows change, so old copies are rebuilt
STDLIB_SFT = "stdlib_sft"
STDLIB_CLASSIFY = "stdlib_classify"
# The stdlib packages with the most code in the corpus (after encodings and lib2to3, whose
# tables and fixers are too easy to tell apart, and distutils), in label order.
PACKAGES = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "unittest",
            "xml")
SNIPPET_LINES = 12
MAX_SNIPPETS_PER_FILE = 16  # so the longest files do not make up a class alone
MAX_BODY_LINES = 24  # longer functions are left out: their bodies rarely fit a tiny context


def sft_rows(docs: list[tuple[str, str]]) -> list[dict]:
    """{prompt, completion, path} for every function with a docstring and a body after it, in
    file and source order. Both are dedented to the def's indentation; the completion ends with
    a newline."""
    rows = []
    for path, text in docs:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
                continue
            doc = node.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)) or node.body[1].lineno <= doc.end_lineno:
                continue
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            body = lines[doc.end_lineno:node.end_lineno]
            if not 0 < len(body) <= MAX_BODY_LINES:
                continue
            indent = len(lines[start]) - len(lines[start].lstrip())
            head = lines[start:doc.end_lineno]
            if any(line[:indent].strip() for line in head + body):  # not uniformly indented
                continue
            rows.append({"prompt": "\n".join(x[indent:] for x in head) + "\n",
                         "completion": "\n".join(x[indent:] for x in body) + "\n", "path": path})
    return rows


def classify_rows(docs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    """(train, validation) rows {text, label, path} of the PACKAGES' files: consecutive windows
    of SNIPPET_LINES lines with at least half of them not blank, at most MAX_SNIPPETS_PER_FILE
    per file (evenly spread over it)."""
    by_package: dict[str, list] = {p: [] for p in PACKAGES}
    for path, text in docs:
        if path.split("/")[0] in PACKAGES and "/" in path:
            by_package[path.split("/")[0]].append((hashlib.sha256(path.encode()).hexdigest(), path,
                                                   text))
    train, validation = [], []
    for package, files in by_package.items():
        # Every 4th file in the order of a hash of its path is a validation file: a quarter of
        # each package's files, at least one.
        for rank, (_, path, text) in enumerate(sorted(files)):
            lines = text.splitlines()
            windows = [lines[i:i + SNIPPET_LINES] for i in range(0, len(lines), SNIPPET_LINES)]
            windows = [w for w in windows if 2 * sum(bool(x.strip()) for x in w) >= SNIPPET_LINES]
            if len(windows) > MAX_SNIPPETS_PER_FILE:
                step = len(windows) / MAX_SNIPPETS_PER_FILE
                windows = [windows[int(i * step)] for i in range(MAX_SNIPPETS_PER_FILE)]
            (validation if rank % 4 == 0 else train).extend(
                {"text": "\n".join(w) + "\n", "label": package, "path": path} for w in windows)
    return train, validation


def sft_dir(data_cfg: DataConfig) -> str:
    corpus = datasets.stdlib_corpus_name(data_cfg)
    return os.path.join(datasets.local_data_dir(data_cfg), "finetune", f"{corpus}-f{VERSION}")


def write_sft(data_cfg: DataConfig) -> tuple[str, str]:
    """(train, validation) JSONL paths of the stdlib SFT rows, written once."""
    out = sft_dir(data_cfg)
    files = tuple(os.path.join(out, f"sft.{split}.jsonl") for split in ("train", "validation"))
    if all(os.path.isfile(p) for p in files):
        return files
    stdlib = dataclasses.replace(data_cfg, dataset=datasets.STDLIB, text_field="text")
    os.makedirs(out, exist_ok=True)
    for path, split in zip(files, ("train", "validation"), strict=True):
        rows = sft_rows(tasks.documents(datasets.source(stdlib, split)))
        paths.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return files


def write_classify(data_cfg: DataConfig) -> tuple[str, str]:
    """(train, validation) JSONL paths of the stdlib classification rows, written once."""
    out = sft_dir(data_cfg)
    files = tuple(os.path.join(out, f"classify.{split}.jsonl") for split in ("train", "validation"))
    if all(os.path.isfile(p) for p in files):
        return files
    stdlib = dataclasses.replace(data_cfg, dataset=datasets.STDLIB, text_field="text")
    docs = [d for split in ("train", "validation")
            for d in tasks.documents(datasets.source(stdlib, split))]
    os.makedirs(out, exist_ok=True)
    for path, rows in zip(files, classify_rows(docs), strict=True):
        paths.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return files


def effective(data_cfg: DataConfig) -> DataConfig:
    """The data config a demo dataset stands for: `stdlib_sft` is `sft` over its own files,
    `stdlib_classify` is `classify` over its own."""
    if data_cfg.dataset == STDLIB_SFT:
        train, validation = write_sft(data_cfg)
    elif data_cfg.dataset == STDLIB_CLASSIFY:
        train, validation = write_classify(data_cfg)
    else:
        return data_cfg
    return dataclasses.replace(data_cfg, files=train, eval_files=validation)

"""Fine-tuning data that needs no download, derived from the embedded corpus deterministically.

- `stdlib_sft` (`data.dataset=stdlib_sft`): supervised fine-tuning rows
  `{"prompt": a function's def line(s) and docstring, "completion": the rest of its body}`, from
  the corpus's train split for training and its validation split for validation, so the
  validation functions are ones the pretrained model never read.

The JSONL files are written once under `<data_dir>/finetune/<corpus>/` and then read like any
user's SFT files (jaxlm/sft.py).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os

from jaxlm import datasets, tasks
from jaxlm.config import DataConfig

VERSION = 1  # bump when the rows change, so old copies are rebuilt
STDLIB_SFT = "stdlib_sft"
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


def sft_dir(data_cfg: DataConfig) -> str:
    corpus = f"stdlib-{datasets.stdlib_config_name()}-v{datasets.StdlibCorpus.VERSION}"
    return os.path.join(datasets.data_dir(data_cfg), "finetune", f"{corpus}-f{VERSION}")


def write_sft(data_cfg: DataConfig) -> tuple[str, str]:
    """(train, validation) JSONL paths of the stdlib SFT rows, written once."""
    out = sft_dir(data_cfg)
    paths = tuple(os.path.join(out, f"sft.{split}.jsonl") for split in ("train", "validation"))
    if all(os.path.isfile(p) for p in paths):
        return paths
    stdlib = dataclasses.replace(data_cfg, dataset=datasets.STDLIB, text_field="text")
    os.makedirs(out, exist_ok=True)
    for path, split in zip(paths, ("train", "validation"), strict=True):
        rows = sft_rows(tasks.documents(datasets.source(stdlib, split)))
        tasks.write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return paths


def effective(data_cfg: DataConfig) -> DataConfig:
    """The data config a demo dataset stands for: `stdlib_sft` is `sft` over its own files."""
    if data_cfg.dataset != STDLIB_SFT:
        return data_cfg
    train, validation = write_sft(data_cfg)
    return dataclasses.replace(data_cfg, files=train, eval_files=validation)

"""Evaluation tasks that need no download: lm-eval YAML + JSONL built from the embedded corpus.

Three tasks are derived from the validation split of the `stdlib` corpus (files the tokenizer
and the model never train on), deterministically: the same interpreter gives the same bytes.

- `stdlib_mc` (multiple choice, accuracy): given a function's `def` line(s) and docstring, pick
  its real first body line among four; the three distractors are first body lines of other
  functions, re-indented like the answer. Few-shot examples come from a disjoint set of files.
- `stdlib_ppl` (`loglikelihood_rolling`): whole validation files; lm-eval reports word and byte
  perplexity and bits per byte.
- `stdlib_complete` (`generate_until` a newline, exact match): the next line of code after up
  to CONTEXT_LINES preceding lines of its file.

`write(data_cfg)` writes them under `<data_dir>/tasks/<corpus>/` (the YAML files name the JSONL
files by absolute path, as lm-eval's `json` loader needs) and returns that folder, which is what
`lm_eval.tasks.TaskManager(include_path=...)` reads. A user's own tasks are the same two kinds
of file in a folder of theirs (see docs/evaluation.md).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import random

from jaxlm import datasets, paths
from jaxlm.config import DataConfig

VERSION = 1  # bump when what the tasks contain changes, so old copies are rebuilt
FEWSHOT_PERCENT = 20  # share of validation files (by path hash) that only give few-shot examples
CONTEXT_LINES = 12  # stdlib_complete: lines of code before the line to complete
COMPLETIONS_PER_FILE = 8  # stdlib_complete: lines chosen per file
NAMES = ("stdlib_mc", "stdlib_ppl", "stdlib_complete")


def _is_fewshot(path: str) -> bool:
    return int(hashlib.sha256(path.encode()).hexdigest(), 16) % 100 < FEWSHOT_PERCENT


def _seed(path: str) -> int:
    return int(hashlib.sha256(f"jaxlm-tasks-{VERSION}:{path}".encode()).hexdigest()[:16], 16)


@dataclasses.dataclass
class _Function:
    head: str  # the def line(s) and docstring, dedented, ending with a newline
    indent: str  # the indentation of the first body line (relative to the def)
    first: str  # the first body line after the docstring, without that indentation


def _functions(text: str) -> list[_Function]:
    """Functions with a docstring and a statement after it, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc, body = node.body[0], node.body[1]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)) or body.lineno <= doc.end_lineno:
            continue
        start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
        base = len(lines[start]) - len(lines[start].lstrip())
        line = lines[body.lineno - 1]
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or len(stripped) > 100:
            continue
        head = "\n".join(x[base:] for x in lines[start:doc.end_lineno]) + "\n"
        indent = line[base:len(line) - len(line.lstrip())]
        found.append(_Function(head, indent, stripped))
    return found


def multiple_choice(docs: list[tuple[str, str]]) -> list[dict]:
    """stdlib_mc rows for (path, text) documents: {context, choices, label, path}."""
    functions = [(path, f) for path, text in docs for f in _functions(text)]
    pool = sorted({f.first for _, f in functions})
    rows = []
    for n, (path, f) in enumerate(functions):
        rng = random.Random(_seed(f"{path}#{n}"))
        others = [line for line in pool if line != f.first]
        if len(others) < 3:
            continue
        choices = [f.indent + line for line in rng.sample(others, 3)]
        label = rng.randrange(4)
        choices.insert(label, f.indent + f.first)
        rows.append({"context": f.head, "choices": choices, "label": label, "path": path})
    return rows


def rolling(docs: list[tuple[str, str]]) -> list[dict]:
    """stdlib_ppl rows: one per file, its whole text."""
    return [{"text": text, "path": path} for path, text in docs]


def completions(docs: list[tuple[str, str]]) -> list[dict]:
    """stdlib_complete rows: {context: preceding lines (each ending in a newline), target: the
    next line, without its newline}. Targets are lines of 8 to 80 characters that are not blank
    or comments, chosen by a seed from the file's path."""
    rows = []
    for path, text in docs:
        lines = text.splitlines(keepends=True)
        candidates = [i for i in range(CONTEXT_LINES, len(lines))
                      if 8 <= len(lines[i].strip()) <= 80 and not lines[i].lstrip().startswith("#")
                      and lines[i].endswith("\n")]
        rng = random.Random(_seed(path))
        for i in sorted(rng.sample(candidates, min(COMPLETIONS_PER_FILE, len(candidates)))):
            rows.append({"context": "".join(lines[i - CONTEXT_LINES:i]),
                         "target": lines[i].rstrip("\n"), "path": path})
    return rows


def _yaml(name: str, files: dict[str, str], body: str) -> str:
    """A task YAML reading local JSONL files (lm-eval's `json` loader, absolute paths)."""
    data_files = ", ".join(f"{split}: {json.dumps(path)}" for split, path in files.items())
    return (f"# Written by jaxlm (jaxlm/tasks.py, version {VERSION}); rebuilt when missing.\n"
            f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files: {{{data_files}}}\n{body}")


_MC = """test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: %d
"""

_PPL = """test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: %d
"""

_COMPLETE = """test_split: test
fewshot_split: train
output_type: generate_until
doc_to_text: context
doc_to_target: target
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 48
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: %d
"""


def task_dir(data_cfg: DataConfig) -> str:
    corpus = datasets.stdlib_corpus_name(data_cfg)
    return os.path.join(datasets.local_data_dir(data_cfg), "tasks", f"{corpus}-t{VERSION}")


def write(data_cfg: DataConfig) -> str:
    """Write the three tasks (once) from the stdlib corpus's validation split; their folder."""
    out = task_dir(data_cfg)
    if all(os.path.isfile(os.path.join(out, f"{n}.yaml")) for n in NAMES):
        return out
    stdlib = dataclasses.replace(data_cfg, dataset=datasets.STDLIB, text_field="text")
    return build(documents(datasets.source(stdlib, "validation")), out)


def documents(source) -> list[tuple[str, str]]:
    """(path, text) of every example of a TFDS source with `path` and `text` features, sorted."""
    docs = []
    for i in range(len(source)):
        example = source[i]
        docs.append(tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v)
                          for v in (example["path"], example["text"])))
    return sorted(docs)


def build(docs: list[tuple[str, str]], out: str) -> str:
    """Write the tasks' YAML and JSONL files for (path, text) documents into `out`."""
    test = [d for d in docs if not _is_fewshot(d[0])]
    shots = [d for d in docs if _is_fewshot(d[0])]
    os.makedirs(out, exist_ok=True)
    tables = {
        "stdlib_mc": ({"test": multiple_choice(test), "train": multiple_choice(shots)}, _MC),
        "stdlib_ppl": ({"test": rolling(test)}, _PPL),
        "stdlib_complete": ({"test": completions(test), "train": completions(shots)}, _COMPLETE),
    }
    for name, (splits, body) in tables.items():
        files = {}
        for split, rows in splits.items():
            files[split] = os.path.abspath(os.path.join(out, f"{name}.{split}.jsonl"))
            paths.write_text(files[split], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                for r in rows))
        paths.write_text(os.path.join(out, f"{name}.yaml"), _yaml(name, files, body % VERSION))
    return out

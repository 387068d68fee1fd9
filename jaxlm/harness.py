"""lm-evaluation-harness in process: jaxlm's `LM.score` and `LM.generate` behind lm-eval's LM API.

    from jaxlm import harness
    results = harness.evaluate(jaxlm.load("runs/tiny"), ["stdlib_mc"], limit=100)

`HarnessLM` is an `lm_eval.api.model.TemplateLM`, so lm-eval's own code splits each
(context, continuation) pair into tokens: trailing whitespace of the context moves to the
continuation, the pair is encoded whole and split where the context's tokens end. jaxlm then
scores every request of a call in packed rows (many short requests share a row, segment ids keep
them apart) with one jitted forward per batch of rows, on the loaded model's mesh.

Conventions, chosen to match how jaxlm trains (BOS first in every document) and stated here
because lm-eval's HF backend leaves them to flags:
- contexts are encoded with BOS first (lm-eval's `hf` model with `add_bos_token=True` does the
  same); an empty context is BOS alone;
- `loglikelihood_rolling` scores every token of the text after a BOS prefix, through lm-eval's
  window helpers, with the text itself encoded without BOS (the `hf` model with
  `add_bos_token=True` would also score a second BOS as the text's first token; with
  `add_bos_token=False` it matches jaxlm);
- `generate_until` decodes greedily (or samples, when a task asks) without token healing, cuts
  each text at the first stop string on the host, and left-truncates contexts to
  `max_seq_len - max_gen_toks` tokens, as the `hf` model does.

Several processes: every process runs the same requests (lm-eval sees rank 0 of 1 everywhere),
the jitted programs span the global mesh, and only process 0 prints or writes results.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata

from jaxlm import tasks as tasks_lib

# lm-eval and the datasets library must never reach the network: set before they are imported.
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)

import lm_eval  # noqa: E402
import lm_eval.evaluator  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.models import utils as model_utils  # noqa: E402

GENERATE_BATCH = 32  # prompts per LM.generate call (sorted by length, so little padding)


class HarnessError(ValueError):
    """A task cannot be found or run offline. One line."""


class HarnessLM(TemplateLM):
    """lm-eval's model interface over a loaded `jaxlm.LM` (which must have a tokenizer)."""

    def __init__(self, lm, *, add_bos: bool = True, max_gen_toks: int = 256):
        super().__init__()
        if lm.tokenizer is None:
            raise HarnessError("lm-eval tasks need the model's tokenizer; this model has none")
        self.lm, self.tok = lm, lm.tokenizer
        self.add_bos = add_bos
        self.max_gen_toks = max_gen_toks
        self.max_length = lm.config.model.max_seq_len
        self.requests_scored = 0  # for requests/s in the benchmark

    @property
    def eot_token_id(self) -> int:
        return self.lm.eos_ids[0] if self.lm.eos_ids else self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        ids = self.tok.encode(string).tolist()
        return [self.prefix_token_id] + ids if bos else ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        scores = self.lm.score([(context, continuation) for _, context, continuation in requests])
        self.requests_scored += len(requests)
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, score in zip(owners, self.lm.score(windows), strict=True):
            totals[n] += score.logprob
        self.requests_scored += len(requests)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        eos = self.tok_decode([self.eot_token_id])
        for members in groups.values():
            kwargs = model_utils.normalize_gen_kwargs(dict(requests[members[0]].args[1]),
                                                      self.max_gen_toks)
            until = [s for s in model_utils.handle_stop_sequences(kwargs.pop("until", None), eos)
                     if s]
            new = int(kwargs.pop("max_gen_toks"))
            if new >= self.max_length:
                raise HarnessError(f"max_gen_toks ({new}) must be less than model.max_seq_len "
                                   f"({self.max_length})")
            sampling = {"temperature": float(kwargs.get("temperature", 0.0))
                        if kwargs.get("do_sample") else 0.0,
                        "top_k": int(kwargs.get("top_k") or 0),
                        "top_p": float(kwargs.get("top_p") or 1.0)}
            prompts = {n: self.tok_encode(requests[n].args[0])[-(self.max_length - new):]
                       for n in members}
            order = sorted(members, key=lambda n: -len(prompts[n]))
            for lo in range(0, len(order), GENERATE_BATCH):
                chunk = order[lo: lo + GENERATE_BATCH]
                result = self.lm.generate([prompts[n] for n in chunk], max_new_tokens=new,
                                          stop=until or None, heal=False, **sampling)
                for n, ids in zip(chunk, result.ids, strict=True):
                    out[n] = model_utils.postprocess_generated_text(
                        self.tok_decode(ids), until, None)
        self.requests_scored += len(requests)
        return out


def task_manager(include_path: Sequence[str] | str | None, data_cfg, names: Sequence[str]):
    """lm-eval's TaskManager over jaxlm's offline tasks (written on first use) and the user's
    folders; lm-eval's own catalogue only when a name is found in neither. `data_cfg` None:
    without jaxlm's tasks."""
    paths = [tasks_lib.write(data_cfg)] if data_cfg is not None else []
    for path in [include_path] if isinstance(include_path, str) else list(include_path or []):
        if not os.path.isdir(path):
            raise HarnessError(f"--include_path '{path}' is not a directory")
        paths.append(os.path.abspath(path))
    manager = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=False)
    missing = [name for name in names if name not in manager.all_tasks]
    # Indexing lm-eval's whole catalogue parses thousands of YAML files (tens of seconds): only
    # when a missing name appears in one of them at all.
    if missing and all(_named_in_catalogue(name) for name in missing):
        manager = lm_eval.tasks.TaskManager(include_path=paths, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise HarnessError(f"unknown task '{unknown[0]}' (not among jaxlm's {', '.join(tasks_lib.NAMES)}, "
                           "the --include_path folders or lm-eval's tasks)")
    return manager


def _named_in_catalogue(name: str) -> bool:
    """Whether any YAML file of lm-eval's own tasks contains `name` (a cheap text search)."""
    root = os.path.dirname(lm_eval.tasks.__file__)
    for directory, _, files in os.walk(root):
        for file in files:
            if file.endswith(".yaml"):
                with open(os.path.join(directory, file), encoding="utf-8", errors="replace") as f:
                    if name in f.read():
                        return True
    return False


def evaluate(lm, task_names: Sequence[str], *, include_path=None, num_fewshot: int | None = None,
             limit: int | float | None = None, data_cfg=None, seed: int = 0) -> dict:
    """Run lm-eval tasks on `lm`; lm-eval's results dict plus `requests_per_sec` and `seconds`.
    `data_cfg` says where jaxlm's own tasks live (default: the model's data.data_dir)."""
    names = list(task_names)
    if not names:
        raise HarnessError("no tasks given")
    manager = task_manager(include_path, data_cfg or lm.config.data, names)
    model = HarnessLM(lm)
    start = time.perf_counter()
    try:
        with _jaxlm_env_info():
            results = lm_eval.simple_evaluate(
                model=model, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                limit=limit, bootstrap_iters=0, log_samples=False, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=None, fewshot_random_seed=seed)
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise HarnessError(f"task data is not local ({_one_line(e)}); jaxlm runs lm-eval "
                           "offline: point the task's dataset_kwargs data_files at local files") from None
    seconds = time.perf_counter() - start
    results["requests_per_sec"] = round(model.requests_scored / max(seconds, 1e-9), 2)
    results["seconds"] = round(seconds, 2)
    return results


def env_info(storage: dict) -> None:
    """What `simple_evaluate` records about the environment, for a jaxlm model: jaxlm, jax and
    its devices. lm-eval's own `add_env_info` describes torch (it imports torch and transformers
    and runs torch's collect_env, which starts pip and other programs): 3.8 s the first time in
    a process and 0.8 s each time after (measured on the 2-core VM), on every `jaxlm evaluate`
    and at every in-training task evaluation, for a stack jaxlm does not run on. Same keys."""
    import jax

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "N/A"

    devices = jax.devices()
    storage.update({
        "pretty_env_info": "\n".join([
            f"jaxlm version: {version('jaxlm')}",
            f"jax version: {jax.__version__}, jaxlib {version('jaxlib')}",
            f"backend: {jax.default_backend()}, {len(devices)} device(s) "
            f"({devices[0].device_kind}), {jax.process_count()} process(es)",
            f"Python version: {sys.version.split()[0]}",
            f"OS: {platform.platform()}",
        ]),
        "transformers_version": version("transformers"),  # not imported
        "lm_eval_version": version("lm_eval"),
        "upper_git_hash": None,
    })


@contextlib.contextmanager
def _jaxlm_env_info():
    """`env_info` in place of lm-eval's `add_env_info` for one `simple_evaluate` call (lm-eval
    0.4 looks the name up in `lm_eval.evaluator` at call time); anything else is left alone."""
    original = getattr(lm_eval.evaluator, "add_env_info", None)
    if original is None:
        yield
        return
    lm_eval.evaluator.add_env_info = env_info
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = original


def main_metrics(results: dict) -> dict[str, float]:
    """{"task/metric": value} of every numeric metric in lm-eval's results (filter "none")."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if filt == "none" and not name.endswith("_stderr") and isinstance(value, int | float):
                out[f"{task}/{name}"] = float(value)
    return out


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def report(results: dict, model_path: str, step: int | None, output: str | None) -> dict:
    """Print lm-eval's results table (process 0), write the full results to `output`, and
    return the summary that `jaxlm evaluate` prints as its last line."""
    import jax

    summary = {"model": model_path, "step": step, "metrics": main_metrics(results),
               "n_shot": results.get("n-shot", {}), "requests_per_sec": results["requests_per_sec"],
               "seconds": results["seconds"], "output": output}
    if jax.process_index() == 0:
        print(lm_utils.make_table(results), flush=True)
        if output:
            from jaxlm import paths as paths_lib  # (`paths` is a name in use here)

            paths_lib.write_text(output, json.dumps(results, indent=2, default=str))
    return summary


class TrainingTasks:
    """lm-eval tasks run on the training loop's evaluation schedule (`train.eval_tasks`), on the
    current parameters, in place on the training mesh (no copy, no checkpoint round trip).

    One `LM` is built on the first call and given the new parameters on later ones, so its
    jitted scoring and generation programs compile once per run."""

    def __init__(self, cfg, tokenizer_path: str):
        self.cfg, self.tokenizer_path = cfg, tokenizer_path
        self.names = [n.strip() for n in cfg.train.eval_tasks.split(",") if n.strip()]
        self.lm = None
        task_manager(None, cfg.data, self.names)  # unknown names fail now, not at the first eval
        from flax import nnx

        from jaxlm import model

        # Abstract shapes now: the loop calls this object inside its mesh context, where Flax
        # would try to place abstract variables by their logical names.
        self.graphdef, self.abstract = nnx.split(model.abstract(cfg.model), nnx.Param)

    def __call__(self, params: dict, mesh) -> dict[str, float]:
        from flax import nnx

        from jaxlm import api

        if self.lm is None:
            nnx.replace_by_pure_dict(self.abstract, params)
            self.lm = api.LM(self.cfg, nnx.merge(self.graphdef, self.abstract),
                             tokenizer_path=self.tokenizer_path, mesh=mesh)
        else:  # the training step donated the last call's arrays: hold the new ones
            nnx.replace_by_pure_dict(self.lm.params, params)
        results = evaluate(self.lm, self.names, limit=self.cfg.train.eval_task_limit or None,
                           data_cfg=self.cfg.data, seed=self.cfg.train.seed)
        metrics = main_metrics(results)
        metrics["eval_tasks_seconds"] = results["seconds"]
        return metrics

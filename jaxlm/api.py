"""The public API that eval scripts use: `jaxlm.load(path)` -> `LM`.

    import jaxlm
    lm = jaxlm.load("path/to/hf_llama_dir")   # or a jaxlm workdir: latest checkpoint's params
    lm = jaxlm.load("runs/tiny", step=250)     # a given checkpoint of a workdir
    lm = jaxlm.load("runs/tiny", quantize="int8", mesh="config")  # int8 weights, sharded
    logits = lm.logits(tokens)                 # int [B, L] -> float32 [B, L, vocab]
    out = lm.generate(["def "], max_new_tokens=64)   # out.texts, out.ids, out.finish_reasons
    scores = lm.score([("x = ", "1")])         # summed log-prob, token count, is_greedy
    out = clf.classify(["import asyncio"])     # a classifier's labels and probabilities
    maps = lm.attention_maps("def f(x):")      # float32 [layers, heads, L, L]
    lm.save_hf("out_dir")                      # transformers' AutoModelForCausalLM + AutoTokenizer

`LM` holds a validated `Config`, the model's parameters placed on a mesh (one device unless
asked), and jitted programs compiled once per (bucketed) input shape. This module owns no
numerics: it wires config, model, tokenizer, generation, scoring and conversion together, and
checks what users pass in (one-line `GenerateError`s naming the value).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import (
    attention,
    checkpoint,
    classify,
    convert,
    generate,
    hf_tokenizer,
    model,
    paths,
    quantize,
    scoring,
    sharding,
)
from jaxlm import config as config_lib
from jaxlm import tokenizer as tokenizer_lib
from jaxlm.generate import GenerateError


@dataclasses.dataclass
class Generation:
    """`LM.generate`'s result, one entry per prompt. `texts` is None without a tokenizer; `ids`
    are the new tokens without the EOS; `logprobs` (when asked) their log-probabilities under
    the model (temperature 1, nothing filtered); `stats` has prefill/decode tokens/s."""

    texts: list[str] | None
    ids: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop" (a stop string) or "length"
    logprobs: list[list[float]] | None
    stats: dict


class LM:
    """A language model ready for inference: config + placed parameters + jitted programs."""

    def __init__(self, cfg: config_lib.Config, decoder: model.Decoder, *, step: int | None = None,
                 tokenizer_path: str | None = None, eos_ids: Sequence[int] | None = None,
                 mesh=None, quantize: str | None = None):
        self.config = cfg
        self.step = step  # the checkpoint's step, for a model loaded from a workdir
        self.tokenizer_path = tokenizer_path
        self.quantize = _quantize_kind(quantize)
        self.graphdef, params = nnx.split(decoder, nnx.Param)
        self.mesh = _resolve_mesh(mesh, cfg)
        self.rules = sharding.DEFAULT_RULES
        sharding.check_divisible(self.mesh, cfg.model, self.rules)
        self.params = _place(params, cfg.model, self.mesh, self.rules, self.quantize)
        self._tokenizer = None
        self.eos_ids = list(eos_ids) if eos_ids is not None else (
            [self.tokenizer.eos_id] if self.tokenizer and self.tokenizer.eos_id >= 0 else [])

        @attention.forward_only
        def forward(params, tokens_BL, segment_ids_BL, positions_BL):
            return nnx.merge(self.graphdef, params)(tokens_BL, segment_ids_BL, positions_BL)

        self._forward = jax.jit(forward)
        self._generator = generate.Generator(cfg.model, self.graphdef, self.mesh, self.rules)
        self._score_step = jax.jit(scoring.make_score_step(self.graphdef))
        self._shared_step = jax.jit(scoring.make_shared_step(cfg.model, self.graphdef))

    @property
    def num_params(self) -> int:
        leaves = jax.tree.leaves(self.params, is_leaf=lambda x: isinstance(x, quantize.QArray))
        return sum(x.q.size if isinstance(x, quantize.QArray) else x.size for x in leaves)

    @property
    def tokenizer(self) -> tokenizer_lib.Tokenizer | None:
        if self._tokenizer is None and self.tokenizer_path:
            self._tokenizer = tokenizer_lib.Tokenizer(self.tokenizer_path)
        return self._tokenizer

    def logits(self, tokens, segment_ids=None, positions=None) -> jax.Array:
        """float32 logits [B, L, vocab] for int tokens [B, L] (optionally packed: see model.py)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array [batch, length], got {tokens.dtype}"
                             f"{list(tokens.shape)}")
        vocab = self.config.model.vocab_size
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got min {int(tokens.min())} "
                             f"max {int(tokens.max())}")
        with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
            return self._forward(self.params, tokens, segment_ids, positions)

    @property
    def labels(self) -> tuple[str, ...]:
        """A classifier's label names (classify.labels) in class-index order; () for an LM."""
        return tuple(self.config.classify.labels.split(",")) if self.config.model.num_labels else ()

    def classify(self, texts: Sequence[str]) -> classify.Classification:
        """A classifier's labels and probabilities for `texts` (jaxlm/classify.py `predict`)."""
        return classify.predict(self, texts)

    def attention_maps(self, tokens_or_text, layers=None, heads=None) -> np.ndarray:
        """float32 attention probabilities [layers, heads, L, S] of one sequence (a string or
        token ids), from the reference path (jaxlm/attention_maps.py)."""
        from jaxlm import attention_maps

        return attention_maps.attention_maps(self, tokens_or_text, layers, heads)

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text` with the model's tokenizer (BOS first, as in training)."""
        tok = self.tokenizer
        if tok is None:
            raise GenerateError("this model has no tokenizer (a workdir's tokenizer.model or a HF "
                                "directory's sentencepiece tokenizer.model): pass token ids")
        ids = tok.encode(text).tolist()
        return ([tok.bos_id] if bos and tok.bos_id >= 0 else []) + ids

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None,
                 logprobs: bool = False, heal: bool = True,
                 stream: Callable[[str], None] | None = None) -> Generation:
        """Generate for a batch of prompts (strings, tokenized with BOS first, or token-id lists),
        greedy at temperature 0, else sampled (temperature, then top-k, then top-p). Generation
        of a row ends at an EOS id, at `max_new_tokens`, or at the first of the `stop` strings
        (cut from the text). `stream` (one prompt only) is called with each new piece of text.

        `heal` (string prompts): a prompt ending inside a longer piece, such as "def " with its
        lone trailing space, drops that piece and makes the first new token one that starts with
        its text (token healing); the texts returned still continue the prompt as written, and
        that first id stands for the dropped piece plus what follows it."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        _check_sampling(max_new_tokens, temperature, top_k, top_p, stop)
        if (stop or stream) and self.tokenizer is None:
            raise GenerateError("stop strings and streaming need a tokenizer; this model has none")
        if stream is not None and len(prompts) != 1:
            raise GenerateError(f"streaming takes one prompt, got {len(prompts)}")
        originals = self._prompt_ids(prompts, max_new_tokens)
        ids, allowed = list(originals), [None] * len(prompts)
        tok = self.tokenizer
        if heal:
            for r, prompt in enumerate(prompts):
                if isinstance(prompt, str):
                    ids[r], allowed[r] = tok.heal(originals[r])
        text_of = None
        if tok is not None:
            # Decoding prompt + new ids and cutting the prompt's own text keeps what a piece
            # means next to its neighbours (a leading-space rule, a healed piece).
            heads = [tok.decode(p) for p in originals]

            def text_of(row: int, new: list[int]) -> str:
                full = tok.decode(ids[row] + new)
                return full[len(heads[row]):] if full.startswith(heads[row]) else tok.decode(new)

        stop_check = (lambda r, new: _find_stop(text_of(r, new), stop) is not None) if stop else None
        on_step = _streamer(lambda new: text_of(0, new), stream) if stream else None
        out = self._generator.run(
            self.params, ids, max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, first_allowed=allowed,
            stop_check=stop_check, chunk=1 if stream else None, on_step=on_step)
        texts = None
        if text_of is not None:
            texts = [text_of(r, row) for r, row in enumerate(out.ids)]
            for r, text in enumerate(texts):
                cut = _find_stop(text, stop)
                if cut is not None:  # keep the shortest prefix of ids that holds the stop string
                    texts[r], out.finish_reasons[r] = text[:cut], "stop"
                    n = next(n for n in range(len(out.ids[r]) + 1)
                             if _find_stop(text_of(r, out.ids[r][:n]), stop) is not None)
                    out.ids[r], out.logprobs[r] = out.ids[r][:n], out.logprobs[r][:n]
        return Generation(texts, out.ids, out.finish_reasons, out.logprobs if logprobs else None,
                          out.stats)

    def score(self, pairs: Sequence[tuple]) -> list[scoring.Score]:
        """For (context, continuation) pairs, strings or token-id lists: the continuation's summed
        log-probability, its token count and whether greedy decoding would produce it. Strings
        are tokenized whole (BOS + context + continuation) and split where the context's own
        tokens end, so the boundary never shifts a token."""
        requests = []
        for n, (context, continuation) in enumerate(pairs):
            if isinstance(context, str) != isinstance(continuation, str):
                raise GenerateError(f"pair {n} mixes a string and token ids")
            if isinstance(context, str):
                whole, head = self.encode(context + continuation), self.encode(context)
                cut = len(head) if whole[:len(head)] == head else len(head) - 1
                context, continuation = whole[:cut], whole[cut:]
            requests.append((self._check_ids(context, f"pair {n}'s context"),
                             self._check_ids(continuation, f"pair {n}'s continuation")))
        return scoring.score(self._score_step, self.params, requests,
                             self.config.model.max_seq_len, self.mesh, self.rules,
                             shared_fn=self._shared_step)

    def save_hf(self, directory: str, dtype: str | None = None) -> None:
        """Write a HF Llama directory (config.json + safetensors, in `dtype`, default the params'),
        its special ids, and the tokenizer files when the LM has a tokenizer (hf_tokenizer.py)."""
        if self.quantize != "none":
            raise GenerateError("save_hf writes float weights: load the model without quantize")
        pure = nnx.to_pure_dict(jax.device_get(self.params))
        convert.write_hf(directory, pure, self.config.model, dtype, self.labels)
        if self.tokenizer_path:
            try:
                hf_tokenizer.write(self.tokenizer_path, directory, self.config.model.max_seq_len)
            except tokenizer_lib.TokenizerError as e:
                # Not a tokenizer jaxlm trained (e.g. an imported Llama's): keep its model file
                # for transformers' own converter rather than write a tokenizer.json that differs.
                shutil.copyfile(self.tokenizer_path, os.path.join(directory, "tokenizer.model"))
                print(f"jaxlm: warning: {e}; copied tokenizer.model only", file=sys.stderr)
        hf_tokenizer.write_token_ids(directory, self.tokenizer_path, self.eos_ids)

    def _check_ids(self, ids, what: str) -> list[int]:
        ids = [int(i) for i in ids]
        vocab = self.config.model.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise GenerateError(f"{what} has token id {bad}, outside [0, {vocab})")
        return ids

    def _prompt_ids(self, prompts, max_new_tokens: int) -> list[list[int]]:
        """Checked token ids of each prompt (strings encoded with BOS first)."""
        if not prompts:
            raise GenerateError("no prompts given")
        limit = self.config.model.max_seq_len - max_new_tokens
        out = []
        for n, prompt in enumerate(prompts):
            ids = self.encode(prompt) if isinstance(prompt, str) else self._check_ids(
                prompt, f"prompt {n}")
            if not ids:
                raise GenerateError(f"prompt {n} is empty")
            if len(ids) > limit:
                raise GenerateError(
                    f"prompt {n} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} at "
                    f"most {max(limit, 0)} fit model.max_seq_len ({self.config.model.max_seq_len})")
            out.append(ids)
        return out


def _check_sampling(max_new_tokens, temperature, top_k, top_p, stop) -> None:
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise GenerateError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise GenerateError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise GenerateError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p!r}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise GenerateError(f"stop must be non-empty strings, got {stop!r}")


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _streamer(decode, stream):
    """on_step for the generator: hands `stream` the text added since the last call (holding
    back a trailing partial UTF-8 character, which decodes as U+FFFD until it is complete)."""
    shown = [0]

    def on_step(ids):
        text = decode(ids).rstrip("\ufffd")
        if len(text) > shown[0]:
            stream(text[shown[0]:])
            shown[0] = len(text)

    return on_step


def _quantize_kind(kind: str | None) -> str:
    try:
        return quantize.check_kind(kind)
    except quantize.QuantizeError as e:
        raise GenerateError(str(e)) from None


def _resolve_mesh(mesh, cfg: config_lib.Config):
    """None: the first local device. "config": the config's mesh sizes over all devices, without
    pipeline stages (their devices go to data). A dict: mesh sizes (data, fsdp, tensor; -1 fills)."""
    one = {"data": 1, "stage": 1, "fsdp": 1, "tensor": 1, "sequence_parallel": False}
    if mesh is None:
        return sharding.make_mesh(cfg.replace(mesh=one).mesh, jax.local_devices()[:1])
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh
    if mesh == "config":
        sizes = sharding.without_stages(cfg.mesh)
    elif isinstance(mesh, dict):
        unknown = set(mesh) - {"data", "fsdp", "tensor"}
        if unknown:
            raise GenerateError(f"mesh keys must be data, fsdp, tensor; got {sorted(unknown)}")
        sizes = {**one, **mesh}
    else:
        raise GenerateError(f"mesh must be None, 'config' or a dict of sizes, got {mesh!r}")
    return sharding.make_mesh(cfg.replace(mesh=sizes).mesh)


def _place(params, cfg: model.ModelConfig, mesh, rules, kind: str):
    """Params (an nnx State) quantized as asked and put on the mesh by their logical names."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    pure = nnx.to_pure_dict(params)
    if kind == "int8":
        pure = jax.jit(quantize.quantize_params, static_argnums=1)(pure, cfg.tie_embeddings)
    nnx.replace_by_pure_dict(params, jax.device_put(pure, generate.param_shardings(
        pure, specs, mesh, rules)))
    return params


def from_params(cfg: config_lib.Config, params: dict, **kwargs) -> LM:
    """An LM from a config and a pure nested dict of parameter arrays (jaxlm layout)."""
    graphdef, abstract_state = nnx.split(model.abstract(cfg.model), nnx.Param)
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract_state))
    got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("parameters do not match the model config (names, shapes or dtypes)")
    nnx.replace_by_pure_dict(abstract_state, params)
    return LM(cfg, nnx.merge(graphdef, abstract_state), **kwargs)


def load(path: str, *, step: int | None = None, dtype: str | None = None,
         param_dtype: str = "float32", quantize: str | None = None, mesh=None,
         adapter: str | None = None) -> LM:
    """Load an `LM` from a HF Llama directory (config.json + safetensors) or a jaxlm workdir.

    For a workdir, only the parameters of the checkpoint at `step` (default: the latest finished
    one) are restored, whatever mesh wrote them, straight into this LM's placement. `dtype`
    overrides the compute dtype (a workdir keeps its training dtype by default; HF loads compute
    in float32). `quantize="int8"`: int8 weight-only matmul weights (jaxlm/quantize.py). `mesh`:
    None = the first local device; "config" = the config's mesh sizes over all devices, pipeline
    stages folded into data; or a dict of sizes such as {"data": 2, "fsdp": 2, "tensor": 2}.

    The tokenizer is the workdir's tokenizer.model, or a HF directory's sentencepiece
    tokenizer.model when it has one; EOS ids come from the tokenizer, or for a HF directory from
    generation_config.json / config.json.

    A LoRA run's workdir loads as its base with the factors merged in. `adapter`: a PEFT LoRA
    adapter directory merged into the loaded model (jaxlm/peft.py; before any quantization).
    """
    if adapter is not None:
        lm = load(path, step=step, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        from jaxlm import lora_runs

        return lora_runs.with_adapter(lm, adapter, quantize)
    if not paths.isdir(path):
        raise FileNotFoundError(f"'{path}' is not a directory")
    if paths.isdir(checkpoint.checkpoint_dir(path)):
        return _load_workdir(path, step, dtype, quantize, mesh)
    path = paths.local_tree(path)  # a HF directory on object storage: read from a local copy
    if os.path.isfile(os.path.join(path, convert.CONFIG_FILE)):
        hf = convert.read_hf_config(path)
        cfg = convert.config_from_hf(hf, dtype=dtype or "float32", param_dtype=param_dtype)
        tensors = convert.read_hf_tensors(path)
        params = convert.params_from_hf(tensors, cfg.model, source=f"'{path}'")
        tok = os.path.join(path, "tokenizer.model")
        return from_params(cfg, params, tokenizer_path=tok if os.path.isfile(tok) else None,
                           eos_ids=_hf_eos_ids(path, hf), quantize=quantize, mesh=mesh)
    raise convert.ConversionError(
        f"'{path}' is neither a jaxlm workdir (no checkpoints/) nor a HF Llama directory "
        "(no config.json)"
    )


def _hf_eos_ids(path: str, hf: dict) -> list[int] | None:
    """EOS ids as transformers' generate takes them: generation_config.json, else config.json
    (an int or a list); None when neither names one (the tokenizer's EOS, if any, is used)."""
    eos = hf.get("eos_token_id")
    generation = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation):
        with open(generation) as f:
            eos = json.load(f).get("eos_token_id", eos)
    if eos is None:
        return None
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _load_workdir(workdir: str, step: int | None, dtype: str | None, kind: str | None,
                  mesh) -> LM:
    cfg = config_lib.from_dict(checkpoint.saved_config(workdir, step))
    if dtype:
        cfg = cfg.replace(model={"dtype": dtype})
    placed_on = _resolve_mesh(mesh, cfg)
    if cfg.lora.rank:
        from jaxlm import lora_runs

        step, params = lora_runs.merged_params(cfg, workdir, step, placed_on)
    else:
        _, abstract_params = nnx.split(model.abstract(cfg.model), nnx.Param)
        specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
        shardings = sharding.tree_shardings(placed_on, specs)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              nnx.to_pure_dict(abstract_params), shardings)
        step, params = checkpoint.restore_params(workdir, target, step)
    tok = paths.join(workdir, "tokenizer.model")  # (object storage: a local copy of it)
    return from_params(cfg, params, step=step,
                       tokenizer_path=paths.local_file(tok) if paths.isfile(tok) else None,
                       quantize=kind, mesh=placed_on)


def evaluate_workdir(workdir: str, step: int | None = None, quantize: str | None = None,
                     files: Sequence[str] | None = None) -> dict:
    """Validation loss, perplexity, bits per byte, token and byte counts of a workdir's
    checkpoint, on one device (with int8 weights when `quantize="int8"`): on its config's
    validation split, or on the text `files` (each a document, every one read whole) when given,
    then also reporting how many files and UTF-8 bytes they hold."""
    from jaxlm import evaluation, tokenizer

    texts = evaluation.read_texts(list(files)) if files is not None else None
    lm = load(workdir, step=step, quantize=quantize)
    # The LM sits on one device already (load's default): evaluate there, with its tokenizer.
    tok = lm.tokenizer or tokenizer.for_config(lm.config)
    cfg = lm.config.replace(mesh={"data": 1, "stage": 1, "fsdp": 1, "tensor": 1,
                                  "sequence_parallel": False})
    result = evaluation.evaluate(cfg, lm.graphdef, nnx.to_pure_dict(lm.params), tok, lm.mesh,
                                 texts=texts)
    if texts is not None:
        result |= {"files": len(texts), "file_bytes": sum(len(t.encode("utf-8")) for t in texts)}
    return {"step": lm.step, **result}


def bench_generate(cfg: config_lib.Config, batch: int, prompt_len: int, new_tokens: int,
                   kind: str | None = None, repeats: int = 3) -> dict:
    """Time greedy generation of a randomly initialized `cfg` model on random prompts (no EOS,
    so every row makes `new_tokens` tokens), after one untimed run that compiles. Prefill and
    decode tokens/s are the medians of `repeats` runs."""
    lm = LM(cfg, model.init(cfg.model, cfg.train.seed), eos_ids=[], quantize=kind)
    rng = np.random.default_rng(cfg.train.seed)
    prompts = rng.integers(4, cfg.model.vocab_size, (batch, prompt_len)).tolist()
    start = time.perf_counter()
    lm.generate(prompts, max_new_tokens=new_tokens)
    first = time.perf_counter() - start
    runs = [lm.generate(prompts, max_new_tokens=new_tokens).stats for _ in range(repeats)]
    prefill = sorted(r["prefill_tokens_per_sec"] for r in runs)
    decode = sorted(r["decode_tokens_per_sec"] for r in runs)
    # What a decode step must read: every weight but the embedding table (one row is looked up),
    # unless the table is also the output layer.
    pure = nnx.to_pure_dict(lm.params)
    weights = quantize.num_bytes(pure) - (0 if cfg.model.tie_embeddings else quantize.num_bytes(
        pure["embed_VD"]))
    return {
        "mode": "generate", "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "quantize": lm.quantize, "dtype": cfg.model.dtype,
        "prefill_tokens_per_sec": round(prefill[len(prefill) // 2], 1),
        "decode_tokens_per_sec": round(decode[len(decode) // 2], 1),
        "decode_tokens_per_sec_runs": [round(d, 1) for d in decode],
        "first_run_seconds": round(first, 2), "bytes_read_per_step": weights,
        "num_params": lm.num_params, "device": jax.devices()[0].device_kind,
    }


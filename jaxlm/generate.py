"""Generation: left-padded batched prefill into a KV cache, then a jitted fixed-buffer decode loop.

    gen = Generator(cfg.model, graphdef, mesh)
    out = gen.run(params, [[2, 17, 5], [2, 9]], max_new_tokens=32, eos_ids=(3,))

Rows are left-padded to a bucketed prompt length P, so their last prompt tokens share slot P - 1
and every row writes the same cache slot at each step; a row's positions count its real tokens
only (pads get segment 0 and are never attended), which is what transformers' `generate` does
with left padding and an attention mask. One prefill fills slots [0, P) and emits the first token;
the decode loop (`lax.while_loop`) feeds each row its last token until every row has emitted an
EOS id or `max_new_tokens` tokens. After its EOS a row emits the pad id, and the host cuts it.

Compiled programs are keyed by bucketed shapes only: batch and prompt length round up to powers
of two (batch also to a multiple of the batch shards), the new-token buffer to a power of two;
`max_new_tokens`, the sampling settings and the EOS ids are traced values, so changing them does
not recompile. The decode state (cache included) is donated to the next decode call.

Sampling is in float32 and in transformers' order: temperature, then top-k, then top-p;
temperature 0 is greedy (argmax of the raw logits) in the same program. Step i's key is
`fold_in(PRNGKey(seed), i)`, so a seed reproduces a sample exactly for the same batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import attention, model, quantize, sharding
from jaxlm.config import ModelConfig

MAX_EOS = 4  # EOS ids are a padded array of at least this size (more ids: a larger bucket)
STOP_CHUNK = 16  # decode steps between host checks of stop strings


class GenerateError(ValueError):
    """A bad prompt or sampling setting. One line naming the value."""


def bucket(n: int, minimum: int = 8) -> int:
    """The power of two >= n (at least `minimum`): the compiled shape for a size n."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def batch_bucket(rows: int, shards: int) -> int:
    """Compiled batch size for `rows`: a power of two, rounded up to a multiple of the batch shards."""
    return -(-bucket(rows, 1) // shards) * shards


# --- sampling ------------------------------------------------------------------------------------


def filter_logits(logits_BV, temperature, top_k, top_p):
    """Logits after temperature, top-k and top-p (transformers' order); removed tokens are -inf.

    top-k keeps the k largest (ties with the k-th kept; 0 = all). top-p keeps, of what top-k
    left, the smallest set of most likely tokens whose probability reaches p: a token stays when
    the probability of the tokens ranked above it is still below p (the first always stays)."""
    V = logits_BV.shape[-1]
    x_BV = logits_BV.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
    sorted_BV = -jnp.sort(-x_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    sorted_BV = jnp.where(jnp.arange(V) < k, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep = jnp.maximum(jnp.sum((above_BV < top_p) & (jnp.arange(V) < k), axis=-1), 1)
    threshold_B1 = jnp.take_along_axis(sorted_BV, keep[:, None] - 1, axis=-1)
    return jnp.where(x_BV >= threshold_B1, x_BV, -jnp.inf)


def choose(logits_BV, key, temperature, top_k, top_p):
    """(token ids [B], their log-probabilities under the raw logits [B])."""
    logits_BV = logits_BV.astype(jnp.float32)

    def sampled():
        x_BV = jax.lax.cond((top_k > 0) | (top_p < 1.0),  # skip the sort when nothing filters
                            lambda: filter_logits(logits_BV, temperature, top_k, top_p),
                            lambda: logits_BV / temperature)
        return jax.random.categorical(key, x_BV, axis=-1).astype(jnp.int32)

    tokens_B = jax.lax.cond(temperature > 0, sampled,
                            lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
    logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    return tokens_B, jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]


# --- the decode state and the two jitted programs ----------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: model.KVCache
    tokens_BM: jax.Array  # int32: emitted tokens, M = the new-token buffer
    logprobs_BM: jax.Array  # float32: their log-probabilities
    step: jax.Array  # int32 scalar: tokens emitted by every row so far
    done_B: jax.Array  # bool: row emitted an EOS (or is batch padding)
    lengths_B: jax.Array  # int32: real prompt tokens per row
    key: jax.Array  # the run's PRNG key (step i uses fold_in(key, i))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Settings:
    """Traced per call, so changing them never recompiles."""

    max_new: jax.Array  # int32 scalar
    temperature: jax.Array  # float32 scalar
    top_k: jax.Array  # int32 scalar
    top_p: jax.Array  # float32 scalar
    eos_E: jax.Array  # int32 [E], padded with -1
    pad_id: jax.Array  # int32 scalar: emitted after a row's EOS


def _emit(state: DecodeState, logits_BV, s: Settings) -> DecodeState:
    i = state.step
    tokens_B, logprobs_B = choose(logits_BV, jax.random.fold_in(state.key, i), s.temperature,
                                  s.top_k, s.top_p)
    tokens_B = jnp.where(state.done_B, s.pad_id, tokens_B)
    done_B = state.done_B | jnp.any(tokens_B[:, None] == s.eos_E[None, :], axis=-1)
    return dataclasses.replace(
        state,
        tokens_BM=jax.lax.dynamic_update_slice_in_dim(state.tokens_BM, tokens_B[:, None], i, axis=1),
        logprobs_BM=jax.lax.dynamic_update_slice_in_dim(state.logprobs_BM, logprobs_B[:, None], i,
                                                        axis=1),
        step=i + 1, done_B=done_B)


def left_padded(start_B, P: int):
    """(segment ids, positions) [B, P] of rows whose real tokens start at slot start_B[b]: the
    left pads are segment 0 (never attended) and positions count the real tokens only."""
    slot_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (start_B.shape[0], P))
    segment_ids_BP = (slot_BP >= start_B[:, None]).astype(jnp.int32)
    return segment_ids_BP, jnp.maximum(slot_BP - start_B[:, None], 0)


def make_prefill(cfg: ModelConfig, graphdef, buffer: int):
    """(params, layers, tokens [B, P], start [B], active [B], first_allowed [B, V], seed,
    settings) -> DecodeState after the first emitted token, chosen among `first_allowed` (token
    healing). The cache has P + buffer slots. `layers`: None, or `model.unstack_layers(params)`."""

    @attention.forward_only
    def prefill(params, layers, tokens_BP, start_B, active_B, first_allowed_BV, seed, s: Settings):
        B, P = tokens_BP.shape
        segment_ids_BP, positions_BP = left_padded(start_B, P)
        # Per-layer cache buffers go with per-layer weights, except at batch 1 (kv_cache.py).
        cache = model.KVCache.empty(cfg, B, P + buffer, start_B, per_layer=layers is not None and B > 1)
        decoder = nnx.merge(graphdef, params)
        logits_B1V, cache = decoder(tokens_BP, segment_ids_BP, positions_BP, cache=cache,
                                    last_only=True, layers=layers)
        state = DecodeState(
            cache=cache, tokens_BM=jnp.zeros((B, buffer), jnp.int32),
            logprobs_BM=jnp.zeros((B, buffer), jnp.float32), step=jnp.zeros((), jnp.int32),
            done_B=~active_B, lengths_B=P - start_B, key=jax.random.key(seed))
        return _emit(state, jnp.where(first_allowed_BV, logits_B1V[:, 0], -jnp.inf), s)

    return prefill


def make_decode(graphdef):
    """(params, layers, state, until, settings) -> state: decode steps until `step` reaches
    min(until, max_new) or every row is done."""

    def decode(params, layers, state: DecodeState, until, s: Settings):
        decoder = nnx.merge(graphdef, params)
        limit = jnp.minimum(until, s.max_new)

        def running(state):
            return (state.step < limit) & ~jnp.all(state.done_B)

        def one_step(state):
            last_B1 = jax.lax.dynamic_slice_in_dim(state.tokens_BM, state.step - 1, 1, axis=1)
            positions_B1 = (state.lengths_B + state.step - 1)[:, None]
            logits_B1V, cache = decoder(last_B1, None, positions_B1, cache=state.cache,
                                        layers=layers)
            return _emit(dataclasses.replace(state, cache=cache), logits_B1V[:, 0], s)

        return jax.lax.while_loop(running, one_step, state)

    return decode


def param_shardings(params: dict, specs: dict, mesh, rules: sharding.Rules = sharding.DEFAULT_RULES):
    """NamedShardings for pure-dict params (arrays or QArrays) from their logical PartitionSpecs:
    an int8 weight like its float weight; its scales likewise, the contracted axes replicated."""
    def one(value, spec):
        names = tuple(spec)
        if isinstance(value, quantize.QArray):
            scale_names = names[: len(names) - value.contracted] + (None,) * value.contracted
            return quantize.QArray(sharding.named_sharding(mesh, names, rules),
                                   sharding.named_sharding(mesh, scale_names, rules),
                                   value.contracted)
        return sharding.named_sharding(mesh, names, rules)

    return jax.tree.map(one, params, specs, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec | quantize.QArray))


def abstract_inputs(batch: int, prompt_len: int, vocab: int):
    """ShapeDtypeStructs of prefill's token arguments (for AOT compilation)."""
    return (jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_),
            jax.ShapeDtypeStruct((batch, vocab), jnp.bool_))


def settings(max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, eos_ids=(), pad_id=0):
    eos = np.full((max(MAX_EOS, len(eos_ids)),), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    return Settings(jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k),
                    jnp.float32(top_p), jnp.asarray(eos), jnp.int32(pad_id))


# --- the host side -------------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    """What `Generator.run` returns: per row, the new ids (without the EOS), why it stopped
    ("eos", "length" or "stop"), and their log-probabilities (raw model distribution)."""

    ids: list[list[int]]
    finish_reasons: list[str]
    logprobs: list[list[float]]
    stats: dict


class Generator:
    """Compiled prefill and decode for one model under one mesh, cached per bucketed shape."""

    def __init__(self, cfg: ModelConfig, graphdef, mesh, rules: sharding.Rules = sharding.DEFAULT_RULES):
        self.cfg, self.graphdef, self.mesh, self.rules = cfg, graphdef, mesh, rules
        self.compiled: dict[tuple[int, int, int], tuple] = {}  # (B, P, buffer) -> programs
        # Per-layer weight buffers on CPU (model.unstack_layers says why), made once per params.
        self.unstack = mesh.devices.flat[0].platform == "cpu"
        self._layers: tuple[int, list] | None = None

    def layers_for(self, params):
        if not self.unstack:
            return None
        if self._layers is None or self._layers[0] != id(params):
            with jax.set_mesh(self.mesh):
                self._layers = (id(params), model.unstack_layers(params))
        return self._layers[1]

    def _programs(self, buffer: int, params, layers, args, seed, s):
        """(prefill, decode) compiled for these shapes, once (timed apart from generation)."""
        key = (*args[0].shape, buffer)
        if key not in self.compiled:
            prefill = jax.jit(make_prefill(self.cfg, self.graphdef, buffer))
            decode = jax.jit(make_decode(self.graphdef), donate_argnums=(2,))
            state = jax.eval_shape(prefill, params, layers, *args, seed, s)
            self.compiled[key] = (prefill.lower(params, layers, *args, seed, s).compile(),
                                  decode.lower(params, layers, state, jnp.int32(0), s).compile())
        return self.compiled[key]

    def run(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
            eos_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int = 0, first_allowed: Sequence | None = None,
            stop_check: Callable | None = None, chunk: int | None = None,
            on_step: Callable | None = None) -> Output:
        """Generate for token-id prompts (checked by the caller). `first_allowed[row]`: the ids
        the row's first new token may be (None: any). `stop_check(row, ids)` -> bool is asked
        every `chunk` steps (STOP_CHUNK) about rows still running; `on_step(ids of row 0)` is
        called after every `chunk` steps (for streaming)."""
        n = len(prompts)
        shards = sharding.batch_shards(self.mesh, self.rules)
        B = batch_bucket(n, shards)
        P = bucket(max(len(p) for p in prompts))
        buffer = bucket(max_new_tokens)
        tokens = np.full((B, P), pad_id, np.int32)
        start = np.full((B,), P - 1, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, P - len(prompt):] = prompt
            start[row] = P - len(prompt)
        active = np.arange(B) < n  # batch padding: a one-token prompt of pad ids, done at once
        allowed = np.ones((B, self.cfg.vocab_size), bool)
        for row, ids in enumerate(first_allowed or []):
            if ids is not None:
                allowed[row] = False
                allowed[row, list(ids)] = True
        s = settings(max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id)
        if stop_check is not None or on_step is not None:
            chunk = chunk or STOP_CHUNK
        with jax.set_mesh(self.mesh), sharding.logical_rules(self.rules):
            batch = sharding.named_sharding(self.mesh, ("batch", None), self.rules)
            row = sharding.named_sharding(self.mesh, ("batch",), self.rules)
            args = (jax.device_put(tokens, batch), jax.device_put(start, row),
                    jax.device_put(active, row), jax.device_put(allowed, batch))
            t_compile = time.perf_counter()
            layers = self.layers_for(params)
            prefill, decode = self._programs(buffer, params, layers, args, jnp.uint32(seed), s)
            t0 = time.perf_counter()
            state = prefill(params, layers, *args, jnp.uint32(seed), s)
            jax.block_until_ready(state.step)
            t1 = time.perf_counter()
            stopped_at = np.zeros((B,), np.int64)  # step at which a stop string was seen; 0: none
            while True:
                until = max_new_tokens if chunk is None else int(state.step) + chunk
                state = decode(params, layers, state, jnp.int32(until), s)
                step, done = int(state.step), sharding.fetch(state.done_B).copy()
                if on_step is not None:
                    on_step(sharding.fetch(state.tokens_BM)[0, :step].tolist())
                if stop_check is not None:
                    tokens_now = sharding.fetch(state.tokens_BM)[:, :step]
                    hits = [r for r in range(n) if not done[r] and stop_check(r, tokens_now[r].tolist())]
                    if hits:
                        stopped_at[hits], done[hits] = step, True
                        state = dataclasses.replace(state, done_B=jax.device_put(done, row))
                if step >= max_new_tokens or done.all():
                    break
            t2 = time.perf_counter()
        return self._output(state, n, eos_ids, stopped_at, max_new_tokens,
                            {"compile_seconds": t0 - t_compile, "prefill_seconds": t1 - t0,
                             "decode_seconds": t2 - t1, "rows": n,
                             "prompt_tokens": int(sum(len(p) for p in prompts))})

    @staticmethod
    def _output(state, n, eos_ids, stopped_at, max_new_tokens, stats) -> Output:
        step = int(state.step)
        tokens = sharding.fetch(state.tokens_BM)[:n, :step]
        logprobs = sharding.fetch(state.logprobs_BM)[:n, :step]
        ids, reasons, lps = [], [], []
        eos = set(int(e) for e in eos_ids)
        for r in range(n):
            row = tokens[r].tolist()
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            if cut is not None:
                reasons.append("eos")
            elif stopped_at[r]:
                cut = int(stopped_at[r])
                reasons.append("stop")
            else:
                cut = min(len(row), max_new_tokens)
                reasons.append("length")
            ids.append(row[:cut])
            lps.append(logprobs[r, :cut].tolist())
        new_tokens = sum(len(i) + (reason == "eos") for i, reason in zip(ids, reasons, strict=True))
        stats["new_tokens"] = new_tokens
        stats["prefill_tokens_per_sec"] = stats["prompt_tokens"] / max(stats["prefill_seconds"], 1e-9)
        # The first new token comes out of the prefill; the decode loop made the others.
        stats["decode_tokens_per_sec"] = max(new_tokens - n, 0) / max(stats["decode_seconds"], 1e-9)
        return Output(ids, reasons, lps, stats)

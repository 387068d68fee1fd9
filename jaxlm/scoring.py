"""Scoring (context, continuation) requests: the log-likelihood behind evaluation.

Each request becomes one segment, context + continuation with targets shifted by one, and
segments are packed first-fit (longest first) into rows of a bucketed length, with segment ids
and positions restarting at 0, so a request scores exactly as it would alone (the model never
attends across segments). One jitted forward per batch of rows returns, at each scored position
(the continuations' tokens, where alone the output layer runs), the target's log-probability and
whether it is the argmax; the host sums them over each continuation. The logits stay inside the
jitted program. Every program here is forward-only (`attention.forward_only`).

Requests that share their whole context (the choices of a multiple-choice question) go another
way when asked (`shared_fn`): each distinct context runs once, as a prefill into a KV cache,
and every continuation of it runs as a short chunk attending to a copy of those cache rows
(`make_shared_step`), so the context's tokens are computed once instead of once per request.

A request longer than `max_seq_len + 1` tokens loses tokens from the left of its context (as
lm-eval's HF backend does); a continuation that alone is too long is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import attention, model, sharding
from jaxlm.generate import GenerateError, batch_bucket, bucket, left_padded

TOKENS_PER_BATCH = 8192  # tokens per jitted forward (bounds the [rows, length, vocab] logits)


class Score(NamedTuple):
    logprob: float  # summed log-probability of the continuation's tokens
    num_tokens: int  # tokens in the continuation
    is_greedy: bool  # greedy decoding from the context would produce exactly the continuation


def make_score_step(graphdef):
    """(params, inputs, targets, segment ids, positions [B, L], scored positions at_BS [B, S])
    -> (log-probability of the target, whether it is the argmax) at each scored position [B, S].
    The output layer runs at the scored positions only: a continuation is a few tokens of a
    long row, and [B, L, V] is most of a forward's memory traffic."""

    @attention.forward_only
    def step(params, inputs_BL, targets_BL, segment_ids_BL, positions_BL, at_BS):
        logits_BSV = nnx.merge(graphdef, params)(inputs_BL, segment_ids_BL, positions_BL,
                                                 at_BS=at_BS)
        targets_BS = jnp.take_along_axis(targets_BL, at_BS, axis=1)
        logprobs_BSV = jax.nn.log_softmax(logits_BSV.astype(jnp.float32), axis=-1)
        target_BS = jnp.take_along_axis(logprobs_BSV, targets_BS[..., None], axis=-1)[..., 0]
        return target_BS, jnp.argmax(logits_BSV, axis=-1) == targets_BS

    return step


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: rows of request indices whose lengths sum to at most `capacity`."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def _segments(requests, max_seq_len: int):
    """(inputs, targets, continuation length) per request, context cut from the left to fit."""
    out = []
    for n, (context, continuation) in enumerate(requests):
        if not continuation:
            raise GenerateError(f"request {n} has an empty continuation")
        if not context:
            raise GenerateError(f"request {n} has an empty context (its first continuation token "
                                "would have nothing to be predicted from)")
        if len(continuation) > max_seq_len:
            raise GenerateError(f"request {n}'s continuation has {len(continuation)} tokens, more "
                                f"than model.max_seq_len ({max_seq_len})")
        seq = (list(context) + list(continuation))[-(max_seq_len + 1):]
        out.append((seq[:-1], seq[1:], len(continuation)))
    return out


def score(step_fn, params, requests, max_seq_len: int, mesh,
          rules: sharding.Rules = sharding.DEFAULT_RULES,
          tokens_per_batch: int = TOKENS_PER_BATCH, shared_fn=None) -> list[Score]:
    """Scores of token-id (context, continuation) requests. With `shared_fn`
    (`make_shared_step`), requests that share their whole context with another request and fit
    `max_seq_len` unshortened are scored from one pass over that context; the rest in packed rows."""
    if not requests:
        return []
    segments = _segments(requests, max_seq_len)
    results: list[Score | None] = [None] * len(segments)
    groups: dict[tuple, list[int]] = {}
    if shared_fn is not None:
        for i, (context, continuation) in enumerate(requests):
            if len(context) + len(continuation) <= max_seq_len + 1:
                groups.setdefault(tuple(context), []).append(i)
    shared = [sub for members in groups.values() for sub in _fitting(members, requests, max_seq_len)]
    alone = sorted(set(range(len(segments))) - {i for g in shared for i in g})
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        _score_packed(step_fn, params, segments, alone, results, max_seq_len, mesh, rules,
                      tokens_per_batch)
        _score_shared(shared_fn, params, requests, shared, results, mesh, rules,
                      tokens_per_batch)
    return results


MIN_SHARED_CONTEXT = 16  # shorter shared contexts save too little to leave the packed rows


def _fitting(members: list[int], requests, max_seq_len: int) -> list[list[int]]:
    """Requests of one context split into runs whose context + chunk fit `max_seq_len` (a
    row of the shared pass is no longer than a training row); runs of one request, and
    contexts too short to be worth sharing, are left to the packed rows."""
    n_context = len(requests[members[0]][0])
    if len(members) < 2 or n_context < MIN_SHARED_CONTEXT:
        return []
    runs, current, used = [], [], n_context
    for i in members:
        n = len(requests[i][1]) - 1
        if current and used + n > max_seq_len:
            runs.append(current)
            current, used = [], n_context
        current.append(i)
        used += n
    runs.append(current)
    return [run for run in runs if len(run) > 1]


def _score_packed(step_fn, params, segments, chosen, results, max_seq_len, mesh, rules,
                  tokens_per_batch) -> None:
    """Score segments[i] for i in `chosen` in packed rows, into results[i]."""
    if not chosen:
        return
    lengths = [len(segments[i][0]) for i in chosen]
    R = min(bucket(max(lengths), 16), max(max(lengths), max_seq_len))
    rows = [[chosen[j] for j in row] for row in pack(lengths, R)]
    shards = sharding.batch_shards(mesh, rules)
    per_batch = max(shards, (max(1, tokens_per_batch // R) // shards) * shards)
    placed = sharding.named_sharding(mesh, ("batch", None), rules)
    for lo in range(0, len(rows), per_batch):
        group = rows[lo: lo + per_batch]
        B = min(per_batch, batch_bucket(len(group), shards))
        scored = max(sum(segments[i][2] for i in members) for members in group)
        S = min(-(-scored // 16) * 16, R)
        arrays = np.zeros((4, B, R), np.int32)  # inputs, targets, segment ids, positions
        at_BS = np.zeros((B, S), np.int32)  # the scored columns of each row, then column 0
        where = []  # (request, row, first of its entries in at_BS, continuation length)
        for r, members in enumerate(group):
            col = used = 0
            for seg, i in enumerate(members, start=1):
                inputs, targets, n_cont = segments[i]
                n = len(inputs)
                arrays[0, r, col:col + n], arrays[1, r, col:col + n] = inputs, targets
                arrays[2, r, col:col + n], arrays[3, r, col:col + n] = seg, np.arange(n)
                at_BS[r, used:used + n_cont] = np.arange(col + n - n_cont, col + n)
                where.append((i, r, used, n_cont))
                col, used = col + n, used + n_cont
        logprob_BS, greedy_BS = step_fn(params, *(jax.device_put(a, placed) for a in arrays),
                                        jax.device_put(at_BS, placed))
        logprob_BS, greedy_BS = sharding.fetch(logprob_BS), sharding.fetch(greedy_BS)
        for i, r, c, n in where:
            results[i] = Score(float(logprob_BS[r, c:c + n].astype(np.float64).sum()), n,
                               bool(greedy_BS[r, c:c + n].all()))


def make_shared_step(cfg, graphdef):
    """Requests that share a context, in two passes through the model's KV cache: the distinct
    contexts, one row each (left-padded, as a prefill), then in the same row the continuations
    of that context packed one after another (each but its last token), every one a segment
    that attends to the cached context and to itself only (model.py). For a multiple-choice
    question the context, most of the tokens, is computed once instead of once per choice. A
    continuation's first token is scored from the context's last logits, the others from the
    chunk's."""

    @attention.forward_only
    def step(params, context_BP, start_B, inputs_BC, segment_ids_BC, positions_BC, targets_BC,
             first_BJ):
        B, P = context_BP.shape
        segment_ids_BP, positions_BP = left_padded(start_B, P)
        decoder = nnx.merge(graphdef, params)
        cache = model.KVCache.empty(cfg, B, P + inputs_BC.shape[1], start_B)
        last_B1V, cache = decoder(context_BP, segment_ids_BP, positions_BP, cache=cache,
                                  last_only=True)
        chunk_BCV, _ = decoder(inputs_BC, segment_ids_BC, positions_BC, cache=cache)
        first_BV = jax.nn.log_softmax(last_B1V[:, 0].astype(jnp.float32), axis=-1)
        first_BJ_lp = jnp.take_along_axis(first_BV, first_BJ, axis=-1)
        first_greedy_BJ = jnp.argmax(last_B1V[:, 0], axis=-1)[:, None] == first_BJ
        chunk_BCV = jax.nn.log_softmax(chunk_BCV.astype(jnp.float32), axis=-1)
        target_BC = jnp.take_along_axis(chunk_BCV, targets_BC[..., None], axis=-1)[..., 0]
        return (first_BJ_lp, first_greedy_BJ, target_BC,
                jnp.argmax(chunk_BCV, axis=-1) == targets_BC)

    return step


def _score_shared(shared_fn, params, requests, groups, results, mesh, rules,
                  tokens_per_batch) -> None:
    """Score the requests of each group (indices sharing one context) with `shared_fn`."""
    if not groups:
        return
    shards = sharding.batch_shards(mesh, rules)

    def chunk_len(g):  # chunk tokens of a group: each continuation but its last token
        return sum(len(requests[i][1]) - 1 for i in g)

    def up(n, step):  # finer than powers of two: a row here holds one context, not several
        return -(-max(n, 1) // step) * step

    groups = sorted(groups, key=lambda g: (len(requests[g[0]][0]), chunk_len(g)))
    batches, current = [], []
    for g in groups:  # up to tokens_per_batch tokens (context + chunk), a power of two of rows
        width = up(len(requests[g[0]][0]), 32) + up(max(map(chunk_len, [g, *current])), 16)
        cap = 1 << (max(1, tokens_per_batch // width).bit_length() - 1)
        if current and len(current) + 1 > max(cap, shards):
            batches.append(current)
            current = []
        current.append(g)
    batches.append(current)
    rows = sharding.named_sharding(mesh, ("batch", None), rules)
    for batch in batches:
        P = up(max(len(requests[g[0]][0]) for g in batch), 32)
        C = up(max(chunk_len(g) for g in batch), 16)
        J = max(len(g) for g in batch)
        B = batch_bucket(len(batch), shards)
        context_BP, start_B = np.zeros((B, P), np.int32), np.full((B,), P, np.int32)
        chunk = np.zeros((4, B, C), np.int32)  # inputs, segment ids, positions, targets
        first_BJ = np.zeros((B, J), np.int32)
        where = []  # (request, row, index among the row's firsts, first chunk column, length)
        for b in range(B):  # padding rows repeat the first group, so no row is all pads
            g = batch[min(b, len(batch) - 1)]
            context = requests[g[0]][0]
            context_BP[b, P - len(context):], start_B[b] = context, P - len(context)
            col = 0
            for j, i in enumerate(g):
                continuation = requests[i][1]
                n = len(continuation) - 1
                first_BJ[b, j] = continuation[0]
                chunk[0, b, col:col + n] = continuation[:-1]
                chunk[1, b, col:col + n] = j + 1
                chunk[2, b, col:col + n] = len(context) + np.arange(n)
                chunk[3, b, col:col + n] = continuation[1:]
                if b < len(batch):
                    where.append((i, b, j, col, n))
                col += n
        out = shared_fn(params, jax.device_put(context_BP, rows),
                        jax.device_put(start_B, sharding.named_sharding(mesh, ("batch",), rules)),
                        *(jax.device_put(a, rows) for a in chunk), jax.device_put(first_BJ, rows))
        first_lp, first_greedy, chunk_lp, chunk_greedy = (sharding.fetch(x) for x in out)
        for i, b, j, col, n in where:
            logprob = float(first_lp[b, j]) + float(chunk_lp[b, col:col + n].astype(np.float64).sum())
            greedy = bool(first_greedy[b, j]) and bool(chunk_greedy[b, col:col + n].all())
            results[i] = Score(logprob, n + 1, greedy)

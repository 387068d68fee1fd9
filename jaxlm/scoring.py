"""Scoring (context, continuation) requests in packed rows: the log-likelihood behind evaluation.

Each request becomes one segment, context + continuation with targets shifted by one, and
segments are packed first-fit (longest first) into rows of a bucketed length, with segment ids
and positions restarting at 0, so a request scores exactly as it would alone (the model never
attends across segments). One jitted forward per batch of rows returns, per token, the target's
log-probability and whether it is the argmax; the host sums them over each continuation. The
[rows, length, vocab] logits stay inside the jitted program.

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

from jaxlm import sharding
from jaxlm.generate import GenerateError, batch_bucket, bucket

TOKENS_PER_BATCH = 8192  # tokens per jitted forward (bounds the [rows, length, vocab] logits)


class Score(NamedTuple):
    logprob: float  # summed log-probability of the continuation's tokens
    num_tokens: int  # tokens in the continuation
    is_greedy: bool  # greedy decoding from the context would produce exactly the continuation


def make_score_step(graphdef):
    def step(params, inputs_BL, targets_BL, segment_ids_BL, positions_BL):
        logits_BLV = nnx.merge(graphdef, params)(inputs_BL, segment_ids_BL, positions_BL)
        logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
        target_BL = jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]
        return target_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL

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
          tokens_per_batch: int = TOKENS_PER_BATCH) -> list[Score]:
    """Scores of token-id (context, continuation) requests, computed in packed rows."""
    if not requests:
        return []
    segments = _segments(requests, max_seq_len)
    lengths = [len(inputs) for inputs, _, _ in segments]
    R = min(bucket(max(lengths), 16), max(max(lengths), max_seq_len))
    rows = pack(lengths, R)
    shards = sharding.batch_shards(mesh, rules)
    per_batch = max(shards, (max(1, tokens_per_batch // R) // shards) * shards)
    results: list[Score | None] = [None] * len(segments)
    with jax.set_mesh(mesh), sharding.logical_rules(rules):
        placed = sharding.named_sharding(mesh, ("batch", None), rules)
        for lo in range(0, len(rows), per_batch):
            group = rows[lo: lo + per_batch]
            B = min(per_batch, batch_bucket(len(group), shards))
            arrays = np.zeros((4, B, R), np.int32)  # inputs, targets, segment ids, positions
            where = []  # (request, row, first target column, continuation length)
            for r, members in enumerate(group):
                col = 0
                for seg, i in enumerate(members, start=1):
                    inputs, targets, n_cont = segments[i]
                    n = len(inputs)
                    arrays[0, r, col:col + n], arrays[1, r, col:col + n] = inputs, targets
                    arrays[2, r, col:col + n], arrays[3, r, col:col + n] = seg, np.arange(n)
                    where.append((i, r, col + n - n_cont, n_cont))
                    col += n
            logprob_BL, greedy_BL = step_fn(params, *(jax.device_put(a, placed) for a in arrays))
            logprob_BL, greedy_BL = sharding.fetch(logprob_BL), sharding.fetch(greedy_BL)
            for i, r, c, n in where:
                results[i] = Score(float(logprob_BL[r, c:c + n].astype(np.float64).sum()), n,
                                   bool(greedy_BL[r, c:c + n].all()))
    return results

"""LM.score: packed (context, continuation) log-likelihoods equal each pair scored alone."""

import jax
import numpy as np
import pytest

from jaxlm import api, config, generate, model, scoring

VOCAB = 96


def tiny():
    return config.from_dict({
        "model": {"vocab_size": VOCAB, "d_model": 32, "num_layers": 3, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 64, "max_seq_len": 64},
        "data": {"seq_len": 32},
    })


@pytest.fixture(scope="module")
def lm():
    return api.LM(tiny(), model.init(tiny().model, seed=2), eos_ids=[])


def alone(lm, context, continuation):
    """Summed log-prob and greedy flag of the continuation from lm.logits on the pair alone."""
    return alone_all(lm, [(context, continuation)])[0]


def alone_all(lm, pairs):
    """`alone` for many pairs in one forward: each pair is its own row, right-padded, which
    leaves the logits of its real positions as they are alone (the model is causal)."""
    width = lm.config.model.max_seq_len
    rows = np.zeros((len(pairs), width), np.int32)
    for r, (context, continuation) in enumerate(pairs):
        seq = (context + continuation)[:-1]
        rows[r, :len(seq)] = seq
    logp_all = np.asarray(jax.nn.log_softmax(lm.logits(rows), axis=-1))
    out = []
    for logp, (context, continuation) in zip(logp_all, pairs, strict=True):
        at = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
        targets = np.asarray(continuation)
        out.append((logp[at, targets].sum(), bool((logp[at].argmax(-1) == targets).all())))
    return out


def test_packed_scores_equal_each_pair_alone(lm):
    rng = np.random.RandomState(0)
    pairs = [(rng.randint(1, VOCAB, c).tolist(), rng.randint(1, VOCAB, n).tolist())
             for c, n in [(3, 1), (10, 4), (1, 2), (20, 7), (5, 5), (2, 1), (30, 3)]]
    lengths = [len(c) + len(n) - 1 for c, n in pairs]
    assert len(scoring.pack(lengths, 64)) < len(pairs)  # several requests share a row
    scores = lm.score(pairs)
    for (_, continuation), got, (logprob, greedy) in zip(pairs, scores, alone_all(lm, pairs),
                                                              strict=True):
        assert got.num_tokens == len(continuation)
        np.testing.assert_allclose(got.logprob, logprob, atol=1e-4, rtol=1e-5)
        assert got.is_greedy == greedy


def test_shared_contexts_score_as_each_pair_alone(lm):
    """Choices of one context (scored from one pass over it, through the KV cache) beside pairs
    with contexts of their own: every score equals the pair alone; a context too long for the
    window goes the packed way, cut from the left."""
    rng = np.random.RandomState(1)
    questions = [rng.randint(1, VOCAB, c).tolist() for c in (20, 3, 40, 16)]
    pairs = [(q, rng.randint(1, VOCAB, n).tolist()) for q in questions for n in (1, 4, 2, 9)]
    # Six choices that do not fit one row after their context: split into runs.
    pairs += [(questions[0], rng.randint(1, VOCAB, 9).tolist()) for _ in range(6)]
    assert len(scoring._fitting([0, 1, 2, 3] + list(range(16, 22)), pairs, 64)) == 2
    pairs += [(rng.randint(1, VOCAB, 7).tolist(), [5, 6]), (list(range(1, 70)), [8, 9])]
    scores = lm.score(pairs)
    kept = [((c + n)[-(lm.config.model.max_seq_len + 1):][:-len(n)], n) for c, n in pairs]
    for (_, continuation), got, (logprob, greedy) in zip(pairs, scores, alone_all(lm, kept),
                                                         strict=True):
        assert got.num_tokens == len(continuation)
        np.testing.assert_allclose(got.logprob, logprob, atol=1e-4, rtol=1e-5)
        assert got.is_greedy == greedy
    # The same requests without the shared path: the same scores.
    plain = scoring.score(lm._score_step, lm.params, pairs, lm.config.model.max_seq_len, lm.mesh)
    np.testing.assert_allclose([s.logprob for s in plain], [s.logprob for s in scores], atol=1e-4)


def test_is_greedy_on_the_models_own_greedy_output(lm):
    context = [2, 17, 33, 5]
    greedy = lm.generate([context], max_new_tokens=6).ids[0]
    other = greedy[:-1] + [(greedy[-1] + 1) % VOCAB]
    got = lm.score([(context, greedy), (context, other), (context, greedy[:1])])
    assert [s.is_greedy for s in got] == [True, False, True]
    assert got[0].logprob > got[1].logprob


def test_pack_fits_capacity_and_uses_every_request():
    lengths = [30, 5, 17, 64, 2, 40, 22, 9]
    rows = scoring.pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == 3  # 189 tokens need at least 3 rows of 64, and first-fit decreasing finds 3


def test_long_context_is_cut_from_the_left(lm):
    context, continuation = list(range(1, 90)), [5, 6]
    (got,) = lm.score([(context, continuation)])
    keep = (context + continuation)[-(lm.config.model.max_seq_len + 1):]
    logprob, _ = alone(lm, keep[:-2], continuation)
    np.testing.assert_allclose(got.logprob, logprob, atol=1e-4)


@pytest.mark.parametrize("pair, named", [
    (([2, 3], []), "empty continuation"),
    (([], [2, 3]), "empty context"),
    (([2], [3] * 65), "more than model.max_seq_len"),
    (([2, VOCAB], [3]), f"token id {VOCAB}"),
    (("text", [3]), "mixes a string and token ids"),
])
def test_bad_requests_are_one_line(lm, pair, named):
    with pytest.raises(generate.GenerateError, match=named):
        lm.score([pair])

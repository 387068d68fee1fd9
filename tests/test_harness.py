"""lm-eval in process: jaxlm's harness against lm-eval's own HF backend on the same exported model,
packing, and the offline tasks built from the embedded corpus."""

import json
import os

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from flax import nnx

from jaxlm import api, config, datasets, harness, model, tasks, tokenizer

pytestmark = pytest.mark.slow

VOCAB = 384


def _stdlib_docs(count: int, offset: int = 0) -> list[tuple[str, str]]:
    root = datasets.stdlib_root()
    files = [f for f in datasets.stdlib_files(root) if f.startswith(("json", "email", "http"))]
    docs = []
    for rel in files[offset: offset + count]:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            docs.append((rel, f.read()))
    return docs


def _without_byte_outputs(cfg, tok) -> dict:
    """Random weights that never emit a byte-fallback piece: residual channel 0 is a constant
    (set in every embedding, written by no layer), so after the final norm it is positive, and
    the byte pieces' output rows weigh it by -50. Invalid UTF-8 from random byte pieces decodes
    differently in sentencepiece (one U+FFFD per bad byte, the rest kept) and in HF's
    ByteFallback decoder (one U+FFFD per token of the run), which is not what this compares."""
    _, state = nnx.split(model.init(cfg.model, seed=4), nnx.Param)
    p = jax.tree.map(np.array, nnx.to_pure_dict(state))
    p["embed_VD"][:, 0] = 8.0
    p["blocks"]["attn"]["w_o_DHK"][:, 0] = 0.0
    p["blocks"]["mlp"]["w_down_DF"][:, 0] = 0.0
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    p["w_out_VD"][:, 0] = 0.0
    p["w_out_VD"][byte_ids, 0] = -50.0
    return jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random model with a real tokenizer, exported with save_hf, and tasks built from a few
    stdlib files (as `tasks.write` builds them from the validation split)."""
    root = tmp_path_factory.mktemp("harness")
    tok_path = tokenizer.train([t for _, t in _stdlib_docs(30, 10)], VOCAB, str(root / "tok.model"),
                               sample_bytes=400_000)
    cfg = config.from_dict({
        "model": {"vocab_size": VOCAB, "d_model": 48, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 96, "max_seq_len": 128, "rope_theta": 50000.0},
        "data": {"seq_len": 64, "data_dir": str(root / "data")}})
    lm = api.from_params(cfg, _without_byte_outputs(cfg, tokenizer.Tokenizer(tok_path)),
                         tokenizer_path=tok_path)
    hf_dir = str(root / "hf")
    lm.save_hf(hf_dir)
    task_dir = tasks.build(_stdlib_docs(8), str(root / "tasks"))
    return lm, hf_dir, task_dir


def _run(model, task_dir, names, limit, num_fewshot=None):
    manager = lm_eval.tasks.TaskManager(include_path=[task_dir], include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, bootstrap_iters=0, log_samples=True,
                                   torch_random_seed=None)


def _responses(results, task):
    return [(s["doc_id"], s["resps"]) for s in sorted(results["samples"][task],
                                                       key=lambda s: s["doc_id"])]


def test_harness_equals_lm_eval_hf_backend(setup):
    """The same requests through lm-eval's `hf` model (torch) and jaxlm's harness: per-request
    log-likelihoods equal to 1e-4, the same accuracy, the same greedy generations."""
    from lm_eval.models.huggingface import HFLM

    lm, hf_dir, task_dir = setup
    common = {"pretrained": hf_dir, "backend": "causal", "device": "cpu", "batch_size": 16,
              "dtype": "float32", "max_length": lm.config.model.max_seq_len}
    ours = _run(harness.HarnessLM(lm), task_dir,
                ["stdlib_mc", "stdlib_complete", "stdlib_ppl"], limit=12, num_fewshot=1)
    # BOS first for contexts; the rolling task with add_bos_token=False (see harness.py).
    theirs = _run(HFLM(add_bos_token=True, **common), task_dir,
                  ["stdlib_mc", "stdlib_complete"], limit=12, num_fewshot=1)
    theirs_ppl = _run(HFLM(add_bos_token=False, **common), task_dir, ["stdlib_ppl"], limit=12)

    mc_ours, mc_theirs = _responses(ours, "stdlib_mc"), _responses(theirs, "stdlib_mc")
    assert len(mc_ours) == 12 and [d for d, _ in mc_ours] == [d for d, _ in mc_theirs]
    got = np.array([[c[0][0] for c in r] for _, r in mc_ours])
    want = np.array([[c[0][0] for c in r] for _, r in mc_theirs])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert ([[c[0][1] for c in r] for _, r in mc_ours]
            == [[c[0][1] for c in r] for _, r in mc_theirs])
    assert ours["results"]["stdlib_mc"]["acc,none"] == theirs["results"]["stdlib_mc"]["acc,none"]

    ppl_ours = [r[0][0] for _, r in _responses(ours, "stdlib_ppl")]
    ppl_theirs = [r[0][0] for _, r in _responses(theirs_ppl, "stdlib_ppl")]
    assert len(ppl_ours) == len(ppl_theirs) >= 4
    # Whole files of thousands of tokens: the sums agree to 1e-4 per token.
    np.testing.assert_allclose(ppl_ours, ppl_theirs, rtol=1e-5, atol=1e-4)
    assert (ours["results"]["stdlib_ppl"]["bits_per_byte,none"]
            == pytest.approx(theirs_ppl["results"]["stdlib_ppl"]["bits_per_byte,none"], rel=1e-6))

    gen_ours = [r[0][0] for _, r in _responses(ours, "stdlib_complete")]
    gen_theirs = [r[0][0] for _, r in _responses(theirs, "stdlib_complete")]
    assert gen_ours == gen_theirs and any(gen_ours)


def test_packed_requests_score_as_each_alone(setup):
    lm, _, _ = setup
    model_ = harness.HarnessLM(lm)
    # Short enough that the four share one row length, and three of them share a row.
    pairs = [("def f(x):\n", "    return x"), ("import ", "os"), ("", "class A:\n    pass"),
             ("x = [1, 2, 3]\n" * 2, "print(x)")]
    requests = [lm_eval.api.instance.Instance("loglikelihood", {}, pair, n)
                for n, pair in enumerate(pairs)]
    together = model_.loglikelihood(requests)
    alone = [model_.loglikelihood([r])[0] for r in requests]
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], atol=1e-5, rtol=0)
    assert [g for _, g in together] == [g for _, g in alone]


def test_task_files_are_deterministic_and_from_validation_only(tmp_path):
    """Two builds give the same bytes; built from a corpus's validation split, no task text is
    found in a training document."""
    b = datasets.StdlibCorpus(root=datasets.stdlib_root(), max_files=60,
                              data_dir=str(tmp_path / "data"), file_format="array_record")
    b.download_and_prepare()
    validation = tasks.documents(b.as_data_source("validation"))
    train = [t for _, t in tasks.documents(b.as_data_source("train"))]
    first, second = tasks.build(validation, str(tmp_path / "a")), tasks.build(validation,
                                                                             str(tmp_path / "b"))
    names = sorted(f for f in os.listdir(first) if f.endswith(".jsonl"))
    assert names and names == sorted(f for f in os.listdir(second) if f.endswith(".jsonl"))
    for name in names:
        with open(os.path.join(first, name), "rb") as f, open(os.path.join(second, name), "rb") as g:
            assert f.read() == g.read(), name
    rows = {n: [json.loads(x) for x in open(os.path.join(first, n))] for n in names}
    valid_paths = {p for p, _ in validation}
    for n, items in rows.items():
        assert all(r["path"] in valid_paths for r in items), n
    mc = rows["stdlib_mc.test.jsonl"] + rows.get("stdlib_mc.train.jsonl", [])
    assert mc and all(len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in mc)
    assert not any(r["context"] in t for r in mc for t in train)
    assert {r["path"] for r in rows["stdlib_mc.test.jsonl"]}.isdisjoint(
        {r["path"] for r in rows.get("stdlib_mc.train.jsonl", [])})  # few-shot from other files


def test_unknown_task_and_missing_include_path_are_one_line(setup, tmp_path):
    lm, _, task_dir = setup
    with pytest.raises(harness.HarnessError, match="unknown task 'no_such_task'"):
        harness.task_manager([task_dir], None, ["no_such_task"])
    with pytest.raises(harness.HarnessError, match="is not a directory"):
        harness.task_manager([str(tmp_path / "missing")], None, ["stdlib_mc"])

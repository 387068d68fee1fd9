"""Classification in the one loop: the score head and its pooling, the objective and metrics,
a run from an LM with best checkpoint and early stopping on accuracy, LM.classify, the HF
export that transformers' AutoModelForSequenceClassification loads, LoRA with a trained head,
and bad input."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import classify, config, finetune, lora, lora_runs, model, objectives, train
from jaxlm.config import ConfigError

pytestmark = pytest.mark.slow

SMALL = {"vocab_size": 512, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "mlp_dim": 48, "max_seq_len": 64, "tie_embeddings": False}
LABELS = "add,mul,sub"


def rows(n, seed):
    """Arithmetic lines labelled by their operator (a task the model can learn quickly)."""
    rng = np.random.RandomState(seed)
    ops = {"add": "+", "mul": "*", "sub": "-"}
    out = []
    for i in range(n):
        label = list(ops)[i % 3]
        a, b = rng.randint(0, 99, 2)
        out.append({"text": f"x{i} = {a} {ops[label]} {b}\n", "label": label})
    return out


def write_jsonl(path, items):
    with open(path, "w") as f:
        for r in items:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    return write_jsonl(d / "train.jsonl", rows(96, 0)), write_jsonl(d / "val.jsonl", rows(24, 1))


@pytest.fixture(scope="module")
def source(tmp_path_factory, stdlib_data_dir):
    """A short LM run on the embedded corpus: the decoder the classifiers start from."""
    out = str(tmp_path_factory.mktemp("source"))
    train.train(config.from_dict({
        "model": SMALL, "data": {"data_dir": stdlib_data_dir, "seq_len": 32},
        "train": {"steps": 2, "global_batch_size": 8, "eval_every": 2, "eval_batches": 1},
        "checkpoint": {"every": 2}}), out)
    return out


def classify_cfg(source, files, tmp_path, **groups):
    base = {
        "data": {"dataset": "classify", "files": files[0], "eval_files": files[1],
                 "data_dir": str(tmp_path / "data"), "seq_len": 32},
        "classify": {"labels": LABELS},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "train": {"init_from": source, "steps": 24, "global_batch_size": 8, "log_every": 4,
                  "eval_every": 4},
        "checkpoint": {"every": 4, "keep": 10},
    }
    for group, keys in groups.items():
        base[group] = {**base.get(group, {}), **keys}
    return config.from_dict(base)


def pure(params):
    return jax.device_get(nnx.to_pure_dict(params))


# --- the head, the objective, the metrics -----------------------------------------------------------


def test_pooling_reads_the_last_real_token_left_or_right_padded():
    cfg = config.from_dict({"model": {**SMALL, "num_labels": 3}, "data": {"seq_len": 32}}).model
    graphdef, params = nnx.split(model.init(cfg, seed=0), nnx.Param)

    def logits(tokens, segment_ids):
        # Positions count each row's real tokens from 0, wherever its padding is.
        positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0) * segment_ids
        return np.asarray(classify._class_logits(graphdef, params, tokens, segment_ids,
                                                 positions.astype(np.int32)))

    rng = np.random.RandomState(0)
    seqs = [rng.randint(4, 512, n) for n in (5, 9)]
    L = 12
    right, left = np.zeros((3, L), np.int32), np.zeros((3, L), np.int32)
    for i, s in enumerate(seqs + [seqs[0][:4]]):
        right[i, :len(s)], left[i, L - len(s):] = s, s
    seg_right, seg_left = (right != 0).astype(np.int32), (left != 0).astype(np.int32)
    logits_right = logits(right, seg_right)
    assert logits_right.shape == (3, 3)
    np.testing.assert_allclose(logits(left, seg_left), logits_right, atol=1e-5)
    # Pad tokens change nothing; the last real token does (row 2 is row 0 without it).
    noisy = np.where(seg_right == 0, 7, right).astype(np.int32)
    np.testing.assert_array_equal(logits(noisy, seg_right), logits_right)
    assert not np.allclose(logits_right[2], logits_right[0], atol=1e-4)


def test_objective_is_the_cross_entropy_of_the_labels():
    import optax

    cfg = config.from_dict({"model": {**SMALL, "num_labels": 3}, "data": {"seq_len": 8}}).model
    graphdef, params = nnx.split(model.init(cfg, seed=1), nnx.Param)
    params = nnx.to_pure_dict(params)
    tokens = np.random.RandomState(1).randint(4, 512, (4, 8)).astype(np.int32)
    batch = {"inputs": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (4, 8)),
             "labels": np.array([0, 2, 1, 2], np.int32),
             "weights": np.array([1, 1, 1, 0], np.float32)}  # the last row pads the batch
    total, (nll_sum, weight) = objectives.classify_sums(graphdef, params, batch)
    logits = nnx.merge(graphdef, params).classify(tokens, batch["segment_ids"], batch["positions"])
    want = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])[:3].sum()
    assert float(weight) == 3.0
    np.testing.assert_allclose(float(nll_sum), float(want), rtol=1e-6)
    assert float(total) == float(nll_sum)


def test_metrics_equal_hand_computation():
    # true x predicted; class 2 is never predicted, class 3 never present nor predicted.
    confusion = np.array([[3, 1, 0, 0], [2, 2, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    got = classify.metrics(confusion)
    precision = [3 / 6, 2 / 4, 0, 0]
    recall = [3 / 4, 2 / 4, 0, 0]
    f1 = [2 * p * r / (p + r) if p + r else 0 for p, r in zip(precision, recall, strict=True)]
    assert got["accuracy"] == pytest.approx(5 / 10)
    assert got["macro_precision"] == pytest.approx(np.mean(precision))
    assert got["macro_recall"] == pytest.approx(np.mean(recall))
    assert got["macro_f1"] == pytest.approx(np.mean(f1))


# --- a run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(source, files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = classify_cfg(source, files, tmp, checkpoint={"best_metric": "eval_accuracy",
                                                       "best_mode": "max"},
                       train={"early_stop_patience": 2})
    workdir = str(tmp / "run")
    return cfg, workdir, train.train(cfg, workdir)


def test_a_classifier_starts_from_an_lm_with_its_decoder_and_a_new_head(source, files, tmp_path):
    resolved, src = finetune.resolve(classify_cfg(source, files, tmp_path))
    assert resolved.model.num_labels == 3 and src.model["num_labels"] == 0
    mesh, tx, graphdef, abstract, shardings = train._setup(resolved)
    assert "w_score_CD" in abstract.params and "w_out_VD" not in abstract.params
    params = finetune.initial_params(src, train.with_shardings(abstract.params, shardings.params))
    state = jax.device_get(train.init_state(resolved, tx, shardings, params).params)
    lm = pure(jaxlm.load(source).params)
    for key in ("embed_VD", "blocks", "final_norm"):  # the source's decoder, bitwise
        for a, b in zip(jax.tree.leaves(state[key]), jax.tree.leaves(lm[key]), strict=True):
            np.testing.assert_array_equal(a, b)
    seed = train._seed_params(resolved)["w_score_CD"]  # (jitted there, eager here: rounding)
    np.testing.assert_allclose(state["w_score_CD"], np.asarray(seed), atol=1e-7)


def test_run_reports_metrics_keeps_the_best_and_stops_early(run):
    cfg, workdir, result = run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "eval_accuracy" in r]
    assert evals[0]["step"] == 0  # the source's decoder with the seed's head, before training
    for r in evals:
        confusion = np.array(r["eval_confusion"])
        assert confusion.shape == (3, 3) and confusion.sum() == r["eval_examples"] == 24
        assert r["eval_accuracy"] == pytest.approx(np.trace(confusion) / 24)
        assert r["eval_macro_f1"] == pytest.approx(classify.metrics(confusion)["macro_f1"])
    trained = [r for r in evals if r["step"] > 0]
    best = max(trained, key=lambda r: r["eval_accuracy"])  # the first of the best
    assert result["best_step"] == best["step"]
    assert result["best_eval_accuracy"] == pytest.approx(best["eval_accuracy"])
    assert trained[-1]["eval_accuracy"] > evals[0]["eval_accuracy"]  # it learned something
    after = [r for r in trained if r["step"] > best["step"]]
    if result["early_stopped"]:
        # (patience can run out on the last step too)
        assert len(after) == 2 and result["step"] == after[-1]["step"] <= cfg.train.steps
    else:
        assert len(after) < 2 and result["step"] == cfg.train.steps
    best_lm = jaxlm.load(os.path.join(workdir, "best"))
    assert best_lm.step == best["step"] and best_lm.labels == tuple(LABELS.split(","))


def test_lm_classify_agrees_with_the_evaluation(run, files):
    _, workdir, result = run
    lm = jaxlm.load(workdir)
    assert lm.step == result["step"]
    texts, labels = zip(*[(r["text"], r["label"]) for r in map(json.loads, open(files[1]))],
                        strict=True)
    out = lm.classify(list(texts))
    assert out.names == ("add", "mul", "sub") and out.probs.shape == (24, 3)
    np.testing.assert_allclose(out.probs.sum(-1), 1.0, rtol=1e-5)
    assert out.labels == [out.names[i] for i in out.probs.argmax(-1)]
    # Rows padded to another length pool the same token: the evaluation's accuracy.
    accuracy = np.mean([a == b for a, b in zip(out.labels, labels, strict=True)])
    assert accuracy == pytest.approx(result["eval_accuracy"])


def test_hf_export_loads_as_sequence_classification_with_our_logits(run, tmp_path):
    import torch
    import transformers

    _, workdir, _ = run
    lm = jaxlm.load(workdir)
    out = str(tmp_path / "hf")
    lm.save_hf(out)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    assert hf.config.id2label == {0: "add", 1: "mul", 2: "sub"}
    texts = ["x = 1 + 2\n", "y = 3 * 4 * 5 * 6\n", "z = 7 - 8\n"]
    ids = [lm.encode(t) + [lm.tokenizer.eos_id] for t in texts]
    width = max(map(len, ids))
    pad = hf.config.pad_token_id
    inputs = torch.tensor([r + [pad] * (width - len(r)) for r in ids])  # right-padded
    with torch.no_grad():
        theirs = hf(input_ids=inputs, attention_mask=(inputs != pad).long()).logits.numpy()
    ours = np.log(lm.classify(texts).probs)
    np.testing.assert_allclose(theirs - theirs.max(-1, keepdims=True),
                               ours - ours.max(-1, keepdims=True), atol=1e-4)
    again = jaxlm.load(out)  # and back: the same classifier
    assert again.labels == lm.labels
    np.testing.assert_allclose(again.classify(texts).probs, np.exp(ours), atol=1e-6)


# --- LoRA ----------------------------------------------------------------------------------------


def test_lora_trains_the_factors_and_the_head(source, files, tmp_path):
    cfg = classify_cfg(source, files, tmp_path, lora={"rank": 2, "targets": "q,v"},
                       train={"steps": 2, "eval_every": 2}, checkpoint={"every": 2})
    workdir = str(tmp_path / "lora")
    state, _ = train.run(cfg, workdir)
    params = jax.device_get(state.params)
    assert set(params) == {"blocks", "w_score_CD"} and "w_score_CD" not in state.frozen
    resolved, _ = finetune.resolve(cfg)
    seed_head = np.asarray(train._seed_params(resolved)["w_score_CD"])
    assert not np.allclose(params["w_score_CD"], seed_head)  # the head was trained
    lm = pure(jaxlm.load(source).params)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.frozen["blocks"])),
                    jax.tree.leaves(lm["blocks"]), strict=True):
        np.testing.assert_array_equal(a, b)  # the base was not
    # jaxlm.load merges the factors and keeps the trained head: the run's own logits.
    loaded = jaxlm.load(workdir)
    graphdef = nnx.split(model.abstract(resolved.model), nnx.Param)[0]
    tokens = np.random.RandomState(2).randint(4, 512, (2, 10)).astype(np.int32)
    adapted = train.model_params(resolved, state.params, state.frozen)
    want = nnx.merge(graphdef, adapted).classify(tokens)
    got = nnx.merge(loaded.graphdef, loaded.params).classify(tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(lora.LoraError, match="is a classifier .* --format=hf"):
        lora_runs.save_peft(workdir, str(tmp_path / "adapter"))


# --- bad input -----------------------------------------------------------------------------------


def test_bad_rows_and_labels_are_one_line_or_counted(source, files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", rows(12, 3) + [
        {"text": "x = 1\n", "label": "div"}, {"label": "add"}, "not json", {"text": 3, "label": "add"}])
    cfg = classify_cfg(source, (bad, files[1]), tmp_path)
    resolved, _ = finetune.resolve(cfg)
    tok = jaxlm.load(source).tokenizer
    with pytest.raises(classify.ClassifyError) as e:
        classify.prepare(resolved, tok)
    assert str(e.value) == (f"{bad}:13: label 'div' is not one of classify.labels (set "
                            "data.bad_rows=skip to count and skip such rows)")
    skipping = resolved.replace(data={"bad_rows": "skip"})
    summary = classify.prepare(skipping, tok)
    assert summary["rows"] == 12 + 4 + 24 and summary["splits"]["train"]["examples"] == 12
    assert {k: v["rows"] for k, v in summary["malformed"].items()} == {
        "label 'div' is not one of classify.labels": 1,
        "not an object with 'text' and 'label'": 1, "not JSON": 1, "'text' is not a string": 1}
    assert summary["splits"]["validation"]["per_label"] == {"add": 8, "mul": 8, "sub": 8}

    with pytest.raises(ConfigError, match="'classify.labels' \\('add'\\) must name at least two"):
        config.from_dict({"classify": {"labels": "add"}})
    with pytest.raises(ConfigError, match="'model.num_labels' \\(2\\) disagrees with classify.labels"):
        finetune.resolve(cfg.replace(model={"num_labels": 2}))
    with pytest.raises(ConfigError, match="needs 'data.files'"):
        config.from_dict({"data": {"dataset": "classify"}, "classify": {"labels": LABELS}})

"""Fine-tuning in the one loop: train.init_from (workdir and HF directory) and SFT data (loss
masks, packing, truncation, malformed rows, resumable iterators)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import config, data, finetune, objectives, sft, tokenizer, train
from jaxlm.config import ConfigError

SOURCE = {
    "model": {"vocab_size": 512, "d_model": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "mlp_dim": 64, "max_seq_len": 64, "tie_embeddings": False},
    "data": {"seq_len": 32},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 6, "global_batch_size": 8, "log_every": 3, "eval_every": 6, "eval_batches": 1},
    "checkpoint": {"every": 3},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory, stdlib_data_dir):
    """A short pretraining run on the embedded corpus: the model fine-tuning starts from."""
    out = str(tmp_path_factory.mktemp("source"))
    cfg = config.from_dict({**SOURCE, "data": {**SOURCE["data"], "data_dir": stdlib_data_dir}})
    train.train(cfg, out)
    return out


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def sft_cfg(source, tmp_path, files, **data_keys):
    return config.from_dict({
        "data": {"dataset": "sft", "files": files, "data_dir": str(tmp_path / "data"),
                 "seq_len": 32, **data_keys},
        "train": {"init_from": source, "steps": 4, "global_batch_size": 8, "log_every": 1,
                  "eval_every": 4, "eval_batches": 1},
        "checkpoint": {"every": 4},
    })


ROWS = [
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"prompt": "x = [1, 2]\n", "completion": "print(len(x))\n"},
    {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]},
    {"prompt": "# a comment\n", "completion": "pass\n"},
]


# --- init_from ------------------------------------------------------------------------------------


def test_init_from_workdir_starts_at_the_sources_logits(source, tmp_path):
    cfg = config.from_dict({"data": {"data_dir": os.path.dirname(source), "seq_len": 32},
                            "train": {"init_from": f"{source}:3"}})
    resolved, src = finetune.resolve(cfg)
    assert src.step == 3 and resolved.model == jaxlm.load(source).config.model
    assert resolved.data.tokenizer == os.path.join(source, "tokenizer.model")
    mesh, tx, graphdef, abstract, shardings = train._setup(resolved)
    params = finetune.initial_params(src, train.with_shardings(abstract.params, shardings.params))
    state = train.init_state(resolved, tx, shardings, params)
    want = jaxlm.load(source, step=3)
    # Exactly the source's parameters, placed on this run's mesh (8 data replicas here)...
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                    jax.tree.leaves(jax.device_get(nnx.to_pure_dict(want.params))), strict=True):
        np.testing.assert_array_equal(a, b)
    # ... so the same logits (up to the rounding of another device layout).
    tokens = np.random.RandomState(0).randint(4, 512, (2, 24))
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, state.params)(tokens)),
                               np.asarray(want.logits(tokens)), atol=1e-6)
    assert int(state.step) == 0
    # A fresh optimizer: every moment is zero.
    assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state)
               if hasattr(x, "ndim") and x.ndim > 0)


def test_init_from_hf_directory_starts_at_the_sources_logits(source, tmp_path):
    lm = jaxlm.load(source)
    hf = str(tmp_path / "hf")
    lm.save_hf(hf)
    cfg = config.from_dict({"data": {"seq_len": 32}, "train": {"init_from": hf}})
    resolved, src = finetune.resolve(cfg)
    assert src.kind == "hf" and resolved.model.d_model == 32
    _, tx, graphdef, abstract, shardings = train._setup(resolved)
    params = finetune.initial_params(src, train.with_shardings(abstract.params, shardings.params))
    tokens = np.arange(4, 28).reshape(1, 24)
    np.testing.assert_allclose(np.asarray(nnx.merge(graphdef, params)(tokens)),
                               np.asarray(lm.logits(tokens)), atol=1e-5)


def test_first_step_loss_is_the_sources_loss_on_that_batch(source, tmp_path):
    """Through the loop: step 1's reported loss is computed on the initial params, so it is the
    source model's loss on the first batch."""
    files = write_jsonl(tmp_path / "rows.jsonl", ROWS * 8)
    cfg = sft_cfg(source, tmp_path, files, eval_files=files)
    workdir = str(tmp_path / "ft")
    train.train(cfg.replace(train={"steps": 1}), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first = next(r for r in map(json.loads, f) if "loss" in r)
    resolved, _ = finetune.resolve(cfg)
    batch = next(iter(data.train_dataset(resolved, data.Shard(0, 1))))
    lm = jaxlm.load(source)
    nll, weight = objectives.lm_sums(lm.graphdef, nnx.to_pure_dict(lm.params), batch)[1]
    assert first["loss"] == pytest.approx(float(nll / weight), rel=1e-5)
    # The run is a normal workdir: its own tokenizer copy and checkpoints, loadable.
    assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
    assert jaxlm.load(workdir).step == 1


def test_init_from_errors_are_one_line(source, tmp_path):
    with pytest.raises(ConfigError, match=r"model.mlp_dim' is 96, but the model of train.init_from"):
        finetune.resolve(config.from_dict({"model": {"mlp_dim": 96}, "data": {"seq_len": 32},
                                           "train": {"init_from": source}}))
    with pytest.raises(ConfigError, match="neither a jaxlm workdir"):
        finetune.resolve(config.from_dict({"train": {"init_from": str(tmp_path)}}))
    with pytest.raises(ConfigError, match="has no checkpoint 5; it has 3, 6"):
        finetune.resolve(config.from_dict({"data": {"seq_len": 32},
                                           "train": {"init_from": f"{source}:5"}}))
    # Runtime keys are the run's own choice.
    resolved, _ = finetune.resolve(config.from_dict({
        "model": {"remat": "full", "dtype": "bfloat16"}, "data": {"seq_len": 32},
        "train": {"init_from": source}}))
    assert resolved.model.remat == "full" and resolved.model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        config.from_dict({"data": {"dataset": "sft", "files": "x.jsonl"}})


# --- SFT data -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(source):
    return tokenizer.Tokenizer(os.path.join(source, "tokenizer.model"))


def test_loss_mask_covers_completion_and_eos_only(tok):
    parts = sft.render(ROWS[0], "<|{role}|>\n{content}\n")
    tokens, loss = sft.encode(parts, tok)
    assert tokens[0] == tokenizer.BOS_ID and tokens[-1] == tokenizer.EOS_ID
    assert loss[0] == 0 and loss[-1] == 1
    assert tok.decode(tokens[loss > 0][:-1]) == ROWS[0]["completion"]
    assert tok.decode(tokens[1:-1]) == ROWS[0]["prompt"] + ROWS[0]["completion"]
    # One sequence: the tokens are those of the whole text, not of the parts apart.
    np.testing.assert_array_equal(tokens[1:-1], tok.encode(ROWS[0]["prompt"] + ROWS[0]["completion"]))

    chat = sft.render(ROWS[2], "<|{role}|>\n{content}\n")
    assert "".join(t for t, _ in chat) == "<|user|>\nsay hi\n<|assistant|>\nhi\n"
    tokens, loss = sft.encode(chat, tok)
    assert tok.decode(tokens[loss > 0][:-1]) == "hi\n"
    assert sft.generation_prompt(ROWS[2]["messages"][:1], "<|{role}|>\n{content}\n") == \
        "<|user|>\nsay hi\n<|assistant|>\n"


def test_sft_loss_is_completion_cross_entropy_and_packing_changes_nothing(source, tmp_path, tok):
    files = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cfg, _ = finetune.resolve(sft_cfg(source, tmp_path, files, eval_files=files))
    batch = next(iter(data.eval_dataset(cfg, data.Shard(0, 1), tok)))
    assert batch["segment_ids"].max() >= 2  # several examples share a row
    lm = jaxlm.load(source)
    params = nnx.to_pure_dict(lm.params)
    nll, weight = (float(x) for x in objectives.lm_sums(lm.graphdef, params, batch)[1])

    # By hand: each example alone, log-softmax at its completion targets.
    want_nll = want_count = 0.0
    for row in ROWS:
        tokens, loss = sft.encode(sft.render(row, cfg.data.chat_template), tok)
        logp = jax.nn.log_softmax(np.asarray(lm.logits(tokens[None, :-1]), np.float64)[0], axis=-1)
        picked = logp[np.arange(len(tokens) - 1), tokens[1:]]
        want_nll -= float((picked * loss[1:]).sum())
        want_count += float(loss[1:].sum())
    assert weight == want_count
    assert nll == pytest.approx(want_nll, rel=1e-5)

    # Changing a prompt token's target changes nothing; a completion token's does.
    w = batch["weights"]
    prompt_at = tuple(np.argwhere((w == 0) & (batch["segment_ids"] > 0))[1])
    loss_at = tuple(np.argwhere(w > 0)[0])
    for at, changes in ((prompt_at, False), (loss_at, True)):
        edited = {k: v.copy() for k, v in batch.items()}
        edited["targets"][at] = (edited["targets"][at] + 7) % 512
        got = float(objectives.lm_sums(lm.graphdef, params, edited)[1][0])
        assert (got != nll) == changes


def test_truncation_drop_and_counts(source, tmp_path, tok):
    long_prompt = "".join(f"line{i} = {i}\n" for i in range(40))
    rows = [{"prompt": long_prompt, "completion": "done()\n"},
            {"prompt": "q\n", "completion": long_prompt},  # the completion alone does not fit
            *ROWS]
    files = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg, _ = finetune.resolve(sft_cfg(source, tmp_path, files, eval_files=files))
    split = sft.prepare(cfg.data, tok)["splits"]["validation"]
    assert (split["examples"], split["truncated"], split["dropped_too_long"]) == (5, 1, 1)
    examples = sft.Examples(sft.prepared_dir(cfg.data, tok), "validation")
    first = examples[0]
    assert len(first["tokens"]) == 33 and first["tokens"][0] == tokenizer.BOS_ID
    assert tok.decode(first["tokens"][first["loss"] > 0][:-1]) == "done()\n"
    assert tok.decode(first["tokens"][1:-1]).endswith("line39 = 39\ndone()\n")

    dropping = cfg.replace(data={"too_long": "drop"})
    split = sft.prepare(dropping.data, tok)["splits"]["validation"]
    assert (split["examples"], split["truncated"], split["dropped_too_long"]) == (4, 0, 2)


def test_malformed_rows_name_file_and_line_or_are_counted(source, tmp_path, tok):
    files = write_jsonl(tmp_path / "bad.jsonl",
                        [ROWS[0], "{not json", {"prompt": "p"}, {"messages": [{"role": "user",
                                                                               "content": "x"}]},
                         ROWS[1]])
    cfg, _ = finetune.resolve(sft_cfg(source, tmp_path, files, eval_files=files))
    with pytest.raises(sft.SFTError, match=r"bad.jsonl:2: not JSON .*data.bad_rows=skip"):
        sft.prepare(cfg.data, tok)
    summary = sft.prepare(cfg.replace(data={"bad_rows": "skip"}).data, tok)
    assert summary["rows"] == 10  # train and validation read the same file here
    assert {k: v["rows"] for k, v in summary["malformed"].items()} == {
        "not JSON": 2, "'prompt' and 'completion' must both be strings": 2,
        "no assistant message": 2}
    assert summary["malformed"]["not JSON"]["first"].endswith("bad.jsonl:2")
    assert summary["splits"]["validation"]["examples"] == 2
    with pytest.raises(sft.SFTError, match="data.files' .* matches no file"):
        sft.prepare(sft_cfg(source, tmp_path, str(tmp_path / "none*.jsonl")).data, tok)


def test_sft_iterator_resumes_exactly(source, tmp_path, tok):
    files = write_jsonl(tmp_path / "rows.jsonl",
                        [{"prompt": f"n = {i}\n", "completion": f"print(n * {i})\n"} for i in range(40)])
    cfg, _ = finetune.resolve(sft_cfg(source, tmp_path, files))
    it = iter(data.train_dataset(cfg, data.Shard(0, 1), tok))
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(4)]
    again = iter(data.train_dataset(cfg, data.Shard(0, 1), tok))
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(4)], strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


# --- best checkpoint, early stopping ---------------------------------------------------------------


def test_best_checkpoint_and_early_stopping_act_on_the_metric(tmp_path, stdlib_data_dir):
    # best_mode=max on the validation loss, which falls as the model trains: the first
    # evaluation stays the best, so the run stops after `patience` evaluations without a better
    # one, and WORKDIR/best holds the step-2 checkpoint.
    cfg = config.from_dict({
        **SOURCE, "data": {**SOURCE["data"], "data_dir": stdlib_data_dir},
        "train": {**SOURCE["train"], "steps": 40, "eval_every": 2},
        "checkpoint": {"every": 2, "keep": 50, "best_metric": "eval_loss", "best_mode": "max"},
    })
    workdir = str(tmp_path / "run")
    result = train.train(cfg.replace(train={"early_stop_patience": 3}), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [(r["step"], r["eval_loss"]) for r in map(json.loads, f) if "eval_loss" in r]
    assert [s for s, _ in evals] == [2, 4, 6, 8]
    assert max(evals, key=lambda e: e[1])[0] == 2 and result["best_step"] == 2
    assert result["early_stopped"] and result["step"] == 8
    best = jaxlm.load(os.path.join(workdir, "best"))
    at_two = jaxlm.load(workdir, step=2)
    assert best.step == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(nnx.to_pure_dict(best.params))),
                    jax.tree.leaves(jax.device_get(nnx.to_pure_dict(at_two.params))), strict=True):
        np.testing.assert_array_equal(a, b)
    # Resuming the stopped run stops again at once: the record is rebuilt from metrics.jsonl.
    again = train.train(cfg.replace(train={"early_stop_patience": 3}), workdir)
    assert again["step"] == 8 and again["early_stopped"] and again["best_step"] == 2

    with pytest.raises(train.TrainingError, match="best_metric' \\('stdlib_mc/acc'\\) is not a metric"):
        train.train(cfg.replace(checkpoint={"best_metric": "stdlib_mc/acc"}, train={"steps": 2}),
                    str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="early_stop_patience' needs 'checkpoint.best_metric'"):
        config.from_dict({"train": {"early_stop_patience": 2}})

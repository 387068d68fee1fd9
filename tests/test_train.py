"""The training loop for real: subprocess runs of `jaxlm train`, killed, terminated and resumed;
checkpoints, metrics, eval and load from a workdir."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import checkpoint, config, train

pytestmark = pytest.mark.slow

SMALL = {
    "model.vocab_size": 512, "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 32, "data.seq_len": 32,
    "train.global_batch_size": 8, "train.log_every": 1, "train.eval_every": 1000,
    "train.eval_batches": 2, "optim.warmup_steps": 2, "optim.lr": 3e-3,
}


@pytest.fixture(scope="module")
def data_dir(stdlib_data_dir):
    return stdlib_data_dir


def flags_for(data_dir, **overrides):
    values = {**SMALL, "data.data_dir": data_dir, **overrides}
    return ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in values.items()]


def cfg_for(data_dir, **overrides):
    values = {**SMALL, "data.data_dir": data_dir, **overrides}
    return config.load("configs/tiny.py", [f"{k}={v}" for k, v in values.items()])


def env():
    # One CPU device per subprocess (the conftest's 8 fake devices are for in-process tests),
    # compiled as quickly as in process.
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ["JAXLM_TEST_COMPILE_FLAGS"])


def jaxlm_cmd(*args):
    return [sys.executable, "-m", "jaxlm.cli", *args]


def run_cli(*args, timeout=300):
    return subprocess.run(jaxlm_cmd(*args), capture_output=True, text=True, env=env(), timeout=timeout)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def params_of(workdir, step=None):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(jaxlm.load(workdir, step=step).params))


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_kill_and_resume_is_bitwise(tmp_path, data_dir):
    steps = 40
    args = flags_for(data_dir, **{"train.steps": steps, "checkpoint.every": 4})
    straight = str(tmp_path / "straight")
    out = run_cli("train", *args, f"--workdir={straight}")
    assert out.returncode == 0, out.stderr
    result = last_json(out.stdout)
    assert result["step"] == steps
    # The end-of-training line: the model's bits per byte beside gzip's and xz's on the split.
    reference = result["compression"]
    line = next(x for x in out.stdout.splitlines() if x.startswith("validation: "))
    assert f"{result['eval_bits_per_byte']:.3f} bits per byte" in line
    assert f"on the split's {reference['bytes']:,} bytes gzip -9 gives" in line
    assert f"xz -9e {reference['xz_bits_per_byte']:.3f}" in line
    assert 0 < reference["xz_bits_per_byte"] < reference["gzip_bits_per_byte"] < 8

    interrupted = str(tmp_path / "interrupted")
    proc = subprocess.Popen(jaxlm_cmd("train", *args, f"--workdir={interrupted}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    ckpts = os.path.join(interrupted, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    saved = checkpoint.Checkpointer(interrupted, keep=3, async_save=False)
    killed_at = saved.latest_step()
    saved.close()
    assert killed_at is not None and killed_at < steps

    out = run_cli("train", *args, f"--workdir={interrupted}")
    assert out.returncode == 0, out.stderr
    assert f"resumed from step {killed_at}" in out.stdout
    assert_bitwise_equal(params_of(straight), params_of(interrupted))
    assert losses(straight) == losses(interrupted)  # identical logged losses, step for step
    assert sorted(losses(straight)) == list(range(1, steps + 1))


def test_sigterm_saves_and_resume_continues(tmp_path, data_dir):
    steps = 3000
    args = flags_for(data_dir, **{"train.steps": steps, "checkpoint.every": 1000})
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(jaxlm_cmd("train", *args, f"--workdir={workdir}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    metrics_file = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics_file) and len(open(metrics_file).readlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    result = last_json(stdout)
    assert result["stopped_by_sigterm"] is True
    stopped = result["step"]
    assert 5 <= stopped < steps
    manager = checkpoint.Checkpointer(workdir, keep=3, async_save=False)
    assert manager.latest_step() == stopped
    manager.close()

    resumed = subprocess.run(jaxlm_cmd("train", *args, f"--workdir={workdir}",
                                       f"--config.train.steps={stopped + 5}"),
                             capture_output=True, text=True, env=env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped}" in resumed.stdout
    assert last_json(resumed.stdout)["step"] == stopped + 5


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    args = flags_for(data_dir, **{"train.steps": 50, "checkpoint.every": 1, "optim.lr": 1e30,
                                  "optim.warmup_steps": 0, "optim.clip_norm": 0.0})
    out = run_cli("train", *args, f"--workdir={workdir}")
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()[-1]
    assert message.startswith("jaxlm: error: non-finite loss") and "at step" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    manager = checkpoint.Checkpointer(workdir, keep=3, async_save=False)
    last = manager.latest_step()
    manager.close()
    assert last is not None and last < bad_step  # nothing saved at or after the bad step
    lm = jaxlm.load(workdir)  # and the last good one restores
    assert lm.step == last


def test_unfinished_checkpoint_is_ignored(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    cfg = cfg_for(data_dir, **{"train.steps": 4, "checkpoint.every": 2})
    train.train(cfg, workdir)
    # A save interrupted mid-write leaves orbax's temporary directory behind.
    junk = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234567")
    os.makedirs(os.path.join(junk, "params"))
    with open(os.path.join(junk, "params", "garbage"), "w") as f:
        f.write("half written")
    assert jaxlm.load(workdir).step == 4
    state, result = train.run(cfg.replace(train={"steps": 6}), workdir)
    assert result["step"] == 6 and int(state.step) == 6


def test_workdir_contents_load_eval_and_plot(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    cfg = cfg_for(data_dir, **{"train.steps": 6, "checkpoint.every": 3, "train.eval_every": 3,
                               "train.log_every": 2})
    state, result = train.run(cfg, workdir)
    for name in ("config.json", "metrics.jsonl", "tokenizer.model", "checkpoints", "tensorboard"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert config.from_dict(json.load(open(os.path.join(workdir, "config.json")))) == cfg

    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_records] == [2, 4, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tflops_per_device", "mfu"):
        assert all(np.isfinite(r[key]) for r in step_records), key
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert all(r["eval_bits_per_byte"] > 0 for r in records if "eval_loss" in r)

    # TensorBoard reads the event files (no TensorFlow involved in writing them).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(workdir, "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]

    # jaxlm.load(workdir) gives the training state's logits.
    lm = jaxlm.load(workdir)
    assert lm.step == 6
    tokens = np.random.default_rng(0).integers(0, 512, (2, 16))
    graphdef = nnx.split(jaxlm.model.init(cfg.model), nnx.Param)[0]
    expected = nnx.merge(graphdef, state.params)(tokens)
    np.testing.assert_allclose(np.asarray(lm.logits(tokens)), np.asarray(expected), atol=1e-6)
    older = jaxlm.load(workdir, step=3)
    assert older.step == 3 and not np.allclose(older.logits(tokens), lm.logits(tokens))

    out = run_cli("eval", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    evaluated = last_json(out.stdout)
    assert evaluated["step"] == 6
    np.testing.assert_allclose(evaluated["eval_loss"], result["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(evaluated["eval_bits_per_byte"], result["eval_bits_per_byte"],
                               rtol=1e-5)
    assert evaluated["eval_bytes"] == result["eval_bytes"] > evaluated["eval_tokens"]
    # bits per byte is the same nats over bytes instead of tokens
    np.testing.assert_allclose(evaluated["eval_bits_per_byte"] * evaluated["eval_bytes"] * np.log(2),
                               evaluated["eval_loss"] * evaluated["eval_tokens"], rtol=1e-6)
    assert evaluated["eval_perplexity"] == pytest.approx(np.exp(evaluated["eval_loss"]))

    out = run_cli("plot", f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    png = last_json(out.stdout)["plot"]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bench_json(data_dir):
    out = run_cli("bench", *flags_for(data_dir), "--steps=2", "--warmup=1")
    assert out.returncode == 0, out.stderr
    result = last_json(out.stdout)
    for key in ("tokens_per_sec", "step_time_ms", "tflops_per_device", "mfu", "peak_tflops",
                "num_params", "num_devices"):
        assert result[key] > 0, key
    assert result["num_devices"] == 1


def test_profile_steps_write_a_trace(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    train.train(cfg_for(data_dir, **{"train.steps": 4, "train.profile_steps": 2}), workdir)
    traces = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(workdir, "profile"))
              for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert "plugins/profile" in traces[0]  # where TensorBoard's profile plugin looks


@pytest.mark.parametrize(
    "args,named",
    [
        (["train", "--config=configs/tiny.py", "--config.model.nope=1", "--workdir=/tmp/x"],
         "model.nope"),
        (["train", "--config=configs/tiny.py", "--config.train.steps=many", "--workdir=/tmp/x"],
         "train.steps"),
        (["train", "--config=configs/tiny.py"], "--workdir"),
        (["eval", "--workdir=/nonexistent/run"], "/nonexistent/run"),
        (["eval"], "--workdir"),
        (["train", "--config=configs/tiny.py", "--config.model.attention=cudnn", "--workdir=/tmp/x"],
         "model.attention"),
        (["bench", "--config=configs/tiny.py", "--config.model.attention=splash"], "a TPU kernel"),
    ],
)
def test_cli_errors(args, named):
    out = run_cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], out.stderr


def test_commands_keep_compiled_programs_on_disk(tmp_path, data_dir):
    """Outside the suite's own cache, `jaxlm` keeps compiled programs under $XDG_CACHE_HOME
    (jaxlm/compile_cache.py): a second run reads them (no new entry, each read stamped) and
    trains to the same bits; JAXLM_COMPILE_CACHE names another directory, or turns it off."""
    suite_cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                   "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAXLM_COMPILE_CACHE")
    base = {k: v for k, v in env().items() if k not in suite_cache}

    def run(*args, **extra):
        out = subprocess.run(jaxlm_cmd(*args), capture_output=True, text=True, timeout=300,
                             env={**base, "XDG_CACHE_HOME": str(tmp_path / "xdg"), **extra})
        assert out.returncode == 0, out.stderr
        return last_json(out.stdout)

    def entries(directory):
        return {p.name: p.with_name(p.name.removesuffix("-cache") + "-atime").read_bytes()
                for p in directory.glob("*-cache")}

    flags = flags_for(data_dir, **{"train.steps": 2})
    first = run("train", *flags, f"--workdir={tmp_path / 'one'}")
    cache = tmp_path / "xdg" / "jaxlm" / "xla"
    written = entries(cache)
    assert any(name.startswith("jit_") for name in written), sorted(written)
    second = run("train", *flags, f"--workdir={tmp_path / 'two'}")
    read = entries(cache)
    assert read.keys() == written.keys()  # every program came from the cache
    assert all(read[name] != written[name] for name in written)  # and each entry was read
    assert second["eval_loss"] == first["eval_loss"]
    for a, b in zip(jax.tree.leaves(params_of(str(tmp_path / "one"))),
                    jax.tree.leaves(params_of(str(tmp_path / "two"))), strict=True):
        np.testing.assert_array_equal(a, b)

    mine = tmp_path / "mine"
    evaluated = run("eval", f"--workdir={tmp_path / 'one'}", JAXLM_COMPILE_CACHE=str(mine))
    assert evaluated["eval_loss"] == first["eval_loss"] and entries(mine)
    run("eval", f"--workdir={tmp_path / 'one'}", JAXLM_COMPILE_CACHE="off",
        XDG_CACHE_HOME=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()


def test_compile_cache_leaves_jax_own_setting_alone(monkeypatch, tmp_path):
    from jaxlm import compile_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")  # jax's way to say: no cache
    assert compile_cache.enable() is None
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "theirs"))
    assert compile_cache.enable() == str(tmp_path / "theirs")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("JAXLM_COMPILE_CACHE", "OFF")
    assert compile_cache.enable() is None
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "theirs").exists()

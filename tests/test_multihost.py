"""Multi-process runs for real: two local processes with jax.distributed (gloo on CPU)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm import checkpoint, config, distributed, tokenizer, train

pytestmark = pytest.mark.slow

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "tools", "launch_local.sh")
JAXLM = f"{sys.executable} -m jaxlm.cli"
SMALL = {
    "model.vocab_size": 512, "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 32, "data.seq_len": 32,
    "train.global_batch_size": 8, "train.log_every": 1, "train.eval_batches": 2,
    "train.steps": 4, "checkpoint.every": 4, "data.streams": 2,
}


@pytest.fixture(scope="module")
def flags(stdlib_data_dir):
    data_dir = stdlib_data_dir
    values = {**SMALL, "data.data_dir": data_dir}
    # Prepare the corpus and tokenizer once, so the timed runs below only train.
    tokenizer.for_config(config.load("configs/tiny.py", [f"{k}={v}" for k, v in values.items()]))
    return ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in values.items()]


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e = {**e, "JAX_PLATFORMS": "cpu", **extra}
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " " + os.environ["JAXLM_TEST_COMPILE_FLAGS"]).strip()
    return e


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_two_processes_train_like_one(tmp_path, flags):
    one = str(tmp_path / "one")
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *flags, f"--workdir={one}"],
                         capture_output=True, text=True, timeout=300,
                         env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert out.returncode == 0, out.stderr

    two = str(tmp_path / "two")
    out = subprocess.run(["bash", LAUNCH, "2", "train", *flags, f"--workdir={two}"],
                         capture_output=True, text=True, timeout=300,
                         env=env(JAXLM=JAXLM, LOCAL_DEVICES="4", LOG_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr + open(tmp_path / "process_1.log").read()
    assert "joining 2 processes" in out.stdout
    assert not os.path.exists(os.path.join(two, "joining"))  # join marks go once all joined
    assert len(losses(two)) == 4
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-6)

    # The checkpoint the two processes wrote together restores in one process, bitwise the same
    # whether onto one device or spread over eight.
    single = jax.tree.map(np.asarray, nnx.to_pure_dict(jaxlm.load(two).params))
    cfg = config.from_dict(json.load(open(os.path.join(two, "config.json"))))
    mesh_cfg = cfg.replace(mesh={"data": 8})
    _, _, _, abstract, shardings = train._setup(mesh_cfg)
    _, spread = checkpoint.restore_params(two, train.with_shardings(abstract.params, shardings.params))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(jax.device_get(spread)), strict=True):
        np.testing.assert_array_equal(a, b)
    reference = jax.tree.map(np.asarray, nnx.to_pure_dict(jaxlm.load(one).params))
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # A one-process run that does not join sums in XLA's own order, not gloo's: resuming the
    # two-process checkpoint there keeps the data order (the losses agree with a one-process run
    # resumed in one process; a wrong data position would be off by far more than the 1e-7 the
    # sums differ by) and says in one line that the bits will differ. Bitwise: the next test.
    def resume(workdir, copy_to):
        shutil.copytree(workdir, copy_to)
        out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *flags,
                              "--config.train.steps=6", f"--workdir={copy_to}"],
                             capture_output=True, text=True, timeout=300,
                             env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
        assert out.returncode == 0, out.stderr
        assert "resumed from step 4" in out.stdout
        return losses(copy_to), out.stdout

    reference, stdout = resume(one, str(tmp_path / "one_one"))
    assert len(reference) == 6 and "jaxlm: note" not in stdout
    got, stdout = resume(two, str(tmp_path / "two_one"))
    assert len(got) == 6, got
    np.testing.assert_allclose(got[4:], reference[4:], rtol=1e-5)
    assert ("jaxlm: note: step 4 was written by 2 processes, which sum through gloo; this process "
            "did not join") in stdout and "--num_processes=1 for the same bits" in stdout
    # Other stream orders do not hold the same data: another data.streams is one clear line.
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *flags, f"--workdir={two}",
                          "--config.train.steps=6", "--config.data.streams=4"],
                         capture_output=True, text=True, timeout=300,
                         env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxlm: error: checkpoint step 4 does not match this config") and (
        "data positions of 2 input streams" in last)


def launch(processes: int, args: list[str], log_dir) -> subprocess.Popen:
    """`processes` joined processes over 8 CPU devices in all: one process joins too, alone,
    with `--num_processes=1` and no other flag; more through the launcher."""
    if processes == 1:
        return subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", "train", *args, "--num_processes=1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    return subprocess.Popen(["bash", LAUNCH, str(processes), "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env=env(JAXLM=JAXLM, LOCAL_DEVICES=str(8 // processes),
                                    LOG_DIR=str(log_dir)))


def finish(proc: subprocess.Popen) -> str:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout


def test_elastic_resume_is_bitwise(tmp_path, flags):
    """A run of 2 processes x 4 devices killed with SIGKILL after a checkpoint and resumed as
    1 process x 8 devices, and one of 1 x 8 resumed as 2 x 4, end with the uninterrupted run's
    parameters bit for bit, with the same loss at every step and the same validation loss.
    data.streams=4, so each of two processes reads two input streams and the one process four."""
    args = [*flags, "--config.data.streams=4", "--config.train.steps=16",
            "--config.checkpoint.every=3"]
    straight = str(tmp_path / "straight")
    final = last_json(finish(launch(2, [*args, f"--workdir={straight}"], tmp_path)))
    expected = jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(jaxlm.load(straight).params)))
    for first, then in ((2, 1), (1, 2)):
        workdir = str(tmp_path / f"{first}_then_{then}")
        proc = launch(first, [*args, f"--workdir={workdir}"], tmp_path)
        try:
            while proc.poll() is None and not os.path.isdir(os.path.join(workdir, "checkpoints", "3")):
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every process it started
            proc.communicate()
        stdout = finish(launch(then, [*args, f"--workdir={workdir}"], tmp_path))
        resumed = int(stdout.split("resumed from step ")[1].split()[0])
        assert 3 <= resumed < 16 and "jaxlm: note" not in stdout, stdout
        assert f"joining {then} processes" in stdout
        assert losses(workdir) == losses(straight)
        assert last_json(stdout)["eval_loss"] == final["eval_loss"]
        got = jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(jaxlm.load(workdir).params)))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path, flags):
    """A pre-emption notice that reaches one process only: both save the same step and exit 0."""
    workdir = str(tmp_path / "run")
    args = [*flags, f"--workdir={workdir}", "--config.train.steps=3000",
            "--config.checkpoint.every=1000", "--config.train.eval_every=1000"]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", *args, f"--coordinator=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", "--distributed_timeout=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(XLA_FLAGS="--xla_force_host_platform_device_count=4")) for i in range(2)]
    try:
        metrics_file = os.path.join(workdir, "metrics.jsonl")
        deadline = time.time() + 240
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if os.path.isfile(metrics_file) and len(open(metrics_file).readlines()) >= 5:
                procs[1].send_signal(signal.SIGTERM)  # process 0 gets no signal
                break
            time.sleep(0.01)
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr
    results = [last_json(stdout) for stdout, _ in outs]
    assert all(r["stopped_by_sigterm"] for r in results)
    stopped = results[0]["step"]
    assert results[1]["step"] == stopped and 5 <= stopped < 3000
    manager = checkpoint.Checkpointer(workdir, keep=3, async_save=False)
    assert manager.latest_step() == stopped
    manager.close()

    # Both processes resume from that checkpoint.
    out = subprocess.run(["bash", LAUNCH, "2", "train", *args, f"--config.train.steps={stopped + 2}"],
                         capture_output=True, text=True, timeout=300,
                         env=env(JAXLM=JAXLM, LOCAL_DEVICES="4", LOG_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr + open(tmp_path / "process_1.log").read()
    assert f"resumed from step {stopped}" in out.stdout
    assert last_json(out.stdout)["step"] == stopped + 2


def test_missing_peer_fails_in_bounded_time(tmp_path, flags):
    """Processes 0 and 2 of 3 start, 1 never does: both end after the timeout with one jaxlm line
    naming process 1, before (instead of) jax's fatal log."""
    start = time.time()
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxlm.cli", "train", *flags, f"--workdir={tmp_path / 'run'}",
         f"--coordinator=127.0.0.1:{port}", "--num_processes=3", f"--process_id={i}",
         "--distributed_timeout=8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for i in (0, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert time.time() - start < 60
    for i, (p, (stdout, stderr)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 1, stderr
        assert "waiting up to 8 s for all of them" in stdout
        line = f"jaxlm: error: process 1 of 3 did not join the coordinator 127.0.0.1:{port} within 8 s"
        assert stderr.strip().splitlines()[-1].startswith(line), stderr
        assert f"(this is process {2 * i})" in stderr
        assert "Terminating process" not in stderr and "Check failure" not in stderr
    marks = sorted(os.listdir(tmp_path / "run" / "joining"))  # kept, for a post-mortem
    assert marks == ["process_0.json", "process_2.json"]


def test_missing_peer_line_without_a_workdir_or_with_all_started():
    assert "cannot tell which" in distributed.missing_line(2, 0, None, 5, "h:1")
    line = distributed.missing_line(2, 0, {0, 1}, 5, "h:1")
    assert "processes 1 of 2 started but did not reach the coordinator h:1" in line


def test_launcher_dry_run_and_failure(tmp_path):
    out = subprocess.run(["bash", LAUNCH, "--dry-run", "3", "train", "--config=configs/tiny.py",
                          "--workdir=runs/x"], capture_output=True, text=True, timeout=60,
                         env=env(PORT="12345", LOCAL_DEVICES="2"))
    assert out.returncode == 0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert "--xla_force_host_platform_device_count=2" in line
        assert line.endswith(f"--coordinator=127.0.0.1:12345 --num_processes=3 --process_id={i} "
                             "--distributed_timeout=120")
    # A failing process (here: a bad config key) stops the launch with its exit code.
    out = subprocess.run(["bash", LAUNCH, "2", "train", "--config=configs/tiny.py",
                          "--config.model.nope=1", f"--workdir={tmp_path / 'x'}"],
                         capture_output=True, text=True, timeout=120,
                         env=env(JAXLM=JAXLM, LOG_DIR=str(tmp_path)))
    assert out.returncode == 2
    assert "model.nope" in out.stderr


def test_multiprocess_flags_must_come_together():
    out = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", "--config=configs/tiny.py",
                          "--workdir=/tmp/x", "--num_processes=2"], capture_output=True,
                         text=True, timeout=120, env=env())
    assert out.returncode == 2 and "--coordinator" in out.stderr.strip().splitlines()[-1]


def test_two_processes_evaluate_like_one(tmp_path, flags):
    """`jaxlm evaluate` as two processes on one mesh over both (every process the same requests,
    results from process 0) gives the metrics of one process on one device."""
    from jaxlm import harness

    workdir = str(tmp_path / "run")
    # Room for a whole multiple-choice line in the context window (the training rows stay short).
    cfg = config.load("configs/tiny.py", [f.removeprefix("--config.") for f in flags[1:]]
                      + ["model.max_seq_len=128"])
    train.train(cfg, workdir)
    tasks = ["stdlib_mc", "stdlib_ppl"]
    alone = harness.main_metrics(harness.evaluate(jaxlm.load(workdir), tasks, limit=6))
    out = subprocess.run(["bash", LAUNCH, "2", "evaluate", f"--workdir={workdir}",
                          f"--tasks={','.join(tasks)}", "--limit=6", "--mesh=config"],
                         capture_output=True, text=True, timeout=300,
                         env=env(JAXLM=JAXLM, LOCAL_DEVICES="4", LOG_DIR=str(tmp_path)))
    assert out.returncode == 0, out.stderr + open(tmp_path / "process_1.log").read()
    together = last_json(out.stdout)["metrics"]
    assert together.keys() == alone.keys() and "stdlib_mc/acc" in together
    for key, value in alone.items():
        assert together[key] == pytest.approx(value, rel=1e-5), key
    assert "|stdlib_mc" in out.stdout  # process 0 printed lm-eval's table

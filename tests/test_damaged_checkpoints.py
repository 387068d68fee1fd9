"""Damaged checkpoints: a resume falls back to the newest step that restores, names the bad
step and file in one line, moves the damaged step aside (never deletes it) and ends bitwise
where the undamaged run ends; with no good step, one line and exit 1; a checkpoint that reads
but does not fit the config is refused without moving anything; jaxlm.load names the step and
file."""

import glob
import os
import resource
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm import checkpoint, config, train

pytestmark = pytest.mark.slow

SMALL = {
    "model.vocab_size": 512, "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 32, "data.seq_len": 32,
    "train.global_batch_size": 8, "train.log_every": 4, "train.eval_every": 1000,
    "train.eval_batches": 1, "optim.warmup_steps": 2, "optim.lr": 3e-3, "train.steps": 8,
    "checkpoint.every": 4,
}


def cfg_for(data_dir, **overrides):
    values = {**SMALL, "data.data_dir": data_dir, **overrides}
    return config.load("configs/tiny.py", [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def base(stdlib_data_dir, tmp_path_factory):
    """A finished 8-step run with checkpoints at steps 4 and 8, and its final params."""
    workdir = str(tmp_path_factory.mktemp("base") / "run")
    train.train(cfg_for(stdlib_data_dir), workdir)
    return workdir, jax.device_get(jaxlm.load(workdir).params)


def copy(base, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(base[0], workdir)
    return workdir


def truncate_largest(folder):
    name = max(glob.glob(os.path.join(folder, "ocdbt.process_*", "d", "*")), key=os.path.getsize)
    with open(name, "r+b") as f:
        f.truncate(64)


def test_truncated_array_data_falls_back_and_ends_bitwise_equal(base, stdlib_data_dir, tmp_path,
                                                                 capsys):
    workdir = copy(base, tmp_path)
    truncate_largest(os.path.join(workdir, "checkpoints", "8", "params"))
    train.train(cfg_for(stdlib_data_dir), workdir)
    captured = capsys.readouterr()
    out = captured.out
    assert "Traceback" not in captured.err and "Exception ignored" not in captured.err
    line = next(x for x in out.splitlines() if "damaged" in x)
    assert "checkpoint step 8 is damaged" in line and "params" in line and "step 4 instead" in line
    assert "resumed from step 4" in out
    moved = glob.glob(os.path.join(workdir, "checkpoints.damaged", "8-*"))
    assert len(moved) == 1 and os.path.isdir(os.path.join(moved[0], "params"))  # kept, not deleted
    assert checkpoint.steps(workdir) == [4, 8]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(jaxlm.load(workdir).params), base[1])


def test_no_good_checkpoint_is_one_line_and_exit_1(base, stdlib_data_dir, tmp_path):
    workdir = copy(base, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8", "opt_state"))
    with open(os.path.join(workdir, "checkpoints", "4", "params", "_METADATA"), "w") as f:
        f.write("{not json")
    args = ["--config=configs/tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in {**SMALL, "data.data_dir": stdlib_data_dir}.items()]
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [x for x in proc.stderr.splitlines() if x.startswith("jaxlm: error:")]
    assert len(error) == 1
    assert "checkpoint step 4 is damaged" in error[0] and "params/_METADATA: unreadable" in error[0]
    assert "step 8 is damaged" in proc.stdout and "opt_state: missing" in proc.stdout
    assert len(glob.glob(os.path.join(workdir, "checkpoints.damaged", "*"))) == 2


def test_a_checkpoint_of_another_optimizer_is_refused_and_left_in_place(base, stdlib_data_dir,
                                                                         tmp_path):
    workdir = copy(base, tmp_path)
    with pytest.raises(checkpoint.Mismatch, match="step 8 does not match this config"):
        train.train(cfg_for(stdlib_data_dir, **{"optim.clip_norm": 0.0}), workdir)
    assert checkpoint.steps(workdir) == [4, 8]
    assert not os.path.exists(os.path.join(workdir, "checkpoints.damaged"))


def test_load_names_the_step_and_the_file(base, tmp_path):
    workdir = copy(base, tmp_path)
    truncate_largest(os.path.join(workdir, "checkpoints", "8", "params"))
    with pytest.raises(checkpoint.Damaged, match=r"checkpoint step 8 is damaged: .*params"):
        jaxlm.load(workdir)
    assert jaxlm.load(workdir, step=4).step == 4  # the older step still loads


def _limit_file_size():
    """In the child: files may not grow past 100 kB (EFBIG, as on a full disk; root too)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_failed_save_is_one_line_and_keeps_the_earlier_steps(base, stdlib_data_dir, tmp_path):
    workdir = copy(base, tmp_path)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "8"))
    args = ["--config=configs/tiny.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in {**SMALL, "data.data_dir": stdlib_data_dir}.items()]
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "train", *args], capture_output=True,
                          text=True, timeout=300, preexec_fn=_limit_file_size,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=""))
    assert proc.returncode == 1, proc.stderr[-2000:]
    # (found anywhere in a line: a progress bar may share the line the error starts on)
    error = [x[x.index("jaxlm: error:"):] for x in proc.stderr.splitlines() if "jaxlm: error:" in x]
    assert len(error) == 1, proc.stderr[-3000:]
    assert error[0].startswith("jaxlm: error: saving checkpoint step 8 into"), error
    assert checkpoint.steps(workdir) == [4]
    assert jaxlm.load(workdir).step == 4

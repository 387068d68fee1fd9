"""Launch recipes: tools/launch_tpu_pod.sh and tools/slurm_train.sbatch, checked through --dry-run.

gcloud and srun are replaced by fakes first on PATH that record their arguments, so a dry run that
invoked them would leave a log behind, and a real run's arguments can be compared with the
printed line.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.realpath(os.path.join(os.path.dirname(__file__), ".."))
TPU = os.path.join(ROOT, "tools", "launch_tpu_pod.sh")
SLURM = os.path.join(ROOT, "tools", "slurm_train.sbatch")
TRAIN_7B = ["train", "--config=configs/llama2_7b.py", "--workdir=/mnt/shared/runs/7b"]
# Arguments a shell would split or end a string at.
AWKWARD = ["train", "--workdir=/mnt/my runs/7b", "--config.data.files=it's.txt"]
SCRUB = ("TPU_NAME", "ZONE", "PROJECT", "PYTHON", "TASKS_PER_NODE", "GPUS_PER_NODE", "CPUS_PER_TASK",
         "XLA_PYTHON_CLIENT_MEM_FRACTION")
GCLOUD = "gcloud compute tpus tpu-vm ssh my-v5p --zone=us-east5-a"


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose gcloud and srun append their arguments as a JSON line to `log`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "invoked.jsonl"
    for name in ("gcloud", "srun", "sbatch"):
        fake = bin_dir / name
        fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"with open({str(log)!r}, 'a') as f:\n"
                        "    f.write(json.dumps(sys.argv) + '\\n')\n")
        fake.chmod(0o755)

    def env(**extra):
        e = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "JAXLM_")) and k not in SCRUB}
        return {**e, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **extra}

    def invoked():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, invoked, log


def run(script, args, env):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=60, env=env)


def lines(out):
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    return out.stdout.splitlines()


# --- TPU pod slice ---------------------------------------------------------------------------------


def test_tpu_dry_run_prints_the_exact_command(fakes):
    env, invoked, log = fakes
    out = run(TPU, ["--dry-run", *TRAIN_7B], env(TPU_NAME="my-v5p", ZONE="us-east5-a"))
    assert lines(out) == [
        f"{GCLOUD} --worker=all --command='cd ~/jaxlm && .venv/bin/jaxlm train "
        "--config=configs/llama2_7b.py --workdir=/mnt/shared/runs/7b'"]
    assert not log.exists()

    out = run(TPU, ["--dry-run", *TRAIN_7B], env(TPU_NAME="my-v5p", ZONE="us-east5-a", PROJECT="p-1"))
    assert lines(out) == [
        f"{GCLOUD} --project=p-1 --worker=all --command='cd ~/jaxlm && .venv/bin/jaxlm train "
        "--config=configs/llama2_7b.py --workdir=/mnt/shared/runs/7b'"]
    assert not log.exists()


def test_tpu_quotes_arguments_for_both_shells(fakes):
    env, invoked, log = fakes
    out = run(TPU, ["--dry-run", *AWKWARD], env(TPU_NAME="my-v5p", ZONE="us-east5-a"))
    [line] = lines(out)
    assert line == (f"{GCLOUD} --worker=all --command='cd ~/jaxlm && .venv/bin/jaxlm train "
                    r"--workdir=/mnt/my\ runs/7b --config.data.files=it\'\''s.txt'")
    # The local shell gives gcloud one --command argument; the worker's shell splits it back into
    # exactly the arguments given, with ~ left for it to expand.
    argv = shlex.split(line)
    assert argv[:-1] == [*GCLOUD.split(), "--worker=all"]
    remote = argv[-1].removeprefix("--command=")
    assert shlex.split(remote) == ["cd", "~/jaxlm", "&&", ".venv/bin/jaxlm", *AWKWARD]
    assert not log.exists()


def test_tpu_checkout_dir_is_quoted_but_tilde_expands(fakes):
    env, invoked, log = fakes
    out = run(TPU, ["--dry-run", "params", "--config=configs/llama2_7b.py"],
              env(TPU_NAME="t", ZONE="z", JAXLM_DIR="~/my jaxlm"))
    [line] = lines(out)
    assert shlex.split(shlex.split(line)[-1].removeprefix("--command="))[:2] == ["cd", "~/my jaxlm"]
    assert "cd ~/'\\''my jaxlm'\\'' &&" in line  # ~/ outside the quotes, the rest inside
    out = run(TPU, ["--dry-run", "params"], env(TPU_NAME="t", ZONE="z", JAXLM_DIR="/opt/jaxlm"))
    assert lines(out)[0].endswith("--command='cd /opt/jaxlm && .venv/bin/jaxlm params'")


def test_tpu_setup_runs_the_install_first(fakes):
    env, invoked, log = fakes
    out = run(TPU, ["--dry-run", "--setup", *TRAIN_7B],
              env(TPU_NAME="my-v5p", ZONE="us-east5-a", JAXLM_REPO="https://example.com/jaxlm.git"))
    assert lines(out) == [
        f"{GCLOUD} --worker=all --command='{{ test -d ~/jaxlm/.git || git clone "
        "https://example.com/jaxlm.git ~/jaxlm; } && cd ~/jaxlm && { test -x .venv/bin/python || "
        "python3 -m venv .venv; } && .venv/bin/pip install -e \".[tpu]\" \"jax[tpu]\"'",
        f"{GCLOUD} --worker=all --command='cd ~/jaxlm && .venv/bin/jaxlm train "
        "--config=configs/llama2_7b.py --workdir=/mnt/shared/runs/7b'",
    ]
    # --setup alone only installs; PYTHON picks the interpreter that makes the venv.
    out = run(TPU, ["--dry-run", "--setup"],
              env(TPU_NAME="my-v5p", ZONE="us-east5-a", JAXLM_REPO="r", PYTHON="python3.12"))
    [line] = lines(out)
    assert "python3.12 -m venv .venv" in line and "jaxlm train" not in line
    assert not log.exists()


def test_tpu_setup_without_a_repo_url_is_one_line(fakes, tmp_path):
    env, invoked, log = fakes
    copy = tmp_path / "nogit" / "tools" / "launch_tpu_pod.sh"  # outside any git checkout
    copy.parent.mkdir(parents=True)
    shutil.copy(TPU, copy)
    out = run(str(copy), ["--dry-run", "--setup", "train"], env(TPU_NAME="t", ZONE="z"))
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "JAXLM_REPO" in out.stderr
    assert not log.exists()


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE"])
@pytest.mark.parametrize("dry_run", [True, False])
def test_tpu_missing_variable_is_one_line_and_exit_2(fakes, missing, dry_run):
    env, invoked, log = fakes
    variables = {k: v for k, v in {"TPU_NAME": "t", "ZONE": "z"}.items() if k != missing}
    out = run(TPU, [*(["--dry-run"] if dry_run else []), *TRAIN_7B], env(**variables))
    assert out.returncode == 2 and out.stdout == ""
    [error] = out.stderr.splitlines()
    assert error.startswith("launch_tpu_pod.sh: error: ") and missing in error
    assert ({"TPU_NAME", "ZONE"} - {missing}).pop() not in error.split("(")[0]
    assert not log.exists()


def test_tpu_without_arguments_is_a_usage_error(fakes):
    env, invoked, log = fakes
    out = run(TPU, ["--dry-run"], env(TPU_NAME="t", ZONE="z"))
    assert out.returncode == 2 and out.stderr.startswith("usage:")
    assert not log.exists()


def test_tpu_runs_what_the_dry_run_prints(fakes):
    env, invoked, log = fakes
    e = env(TPU_NAME="my-v5p", ZONE="us-east5-a", PROJECT="p", JAXLM_REPO="git@host:me/jaxlm.git")
    printed = lines(run(TPU, ["--dry-run", "--setup", *AWKWARD], e))
    assert not log.exists()
    out = run(TPU, ["--setup", *AWKWARD], e)
    assert out.returncode == 0, out.stderr
    assert [argv[1:] for argv in invoked()] == [shlex.split(line)[1:] for line in printed]
    assert [os.path.basename(argv[0]) for argv in invoked()] == ["gcloud", "gcloud"]


# --- SLURM ---------------------------------------------------------------------------------------

SRUN_ENV = "env JAX_LOCAL_DEVICE_IDS={ids} XLA_PYTHON_CLIENT_MEM_FRACTION=.95 /opt/jaxlm/.venv/bin/jaxlm"


def srun_line(layout, ids, args=TRAIN_7B):
    return (f"srun --kill-on-bad-exit=1 {layout} --chdir=/opt/jaxlm "
            f"{SRUN_ENV.format(ids=ids)} {' '.join(args)}")


def test_slurm_dry_run_default_layout_is_one_task_per_gpu(fakes):
    env, invoked, log = fakes
    out = run(SLURM, ["--dry-run", *TRAIN_7B], env(JAXLM_DIR="/opt/jaxlm"))
    assert lines(out) == [srun_line("--ntasks-per-node=8 --gpus-per-task=1", "0")]
    assert not log.exists()


@pytest.mark.parametrize("extra, layout, ids", [
    ({"TASKS_PER_NODE": "1"}, "--ntasks-per-node=1 --gpus-per-task=8", "0,1,2,3,4,5,6,7"),
    ({"SLURM_NTASKS_PER_NODE": "2"}, "--ntasks-per-node=2 --gpus-per-task=4", "0,1,2,3"),
    ({"SLURM_NTASKS_PER_NODE": "2", "TASKS_PER_NODE": "8"}, "--ntasks-per-node=8 --gpus-per-task=1", "0"),
    ({"GPUS_PER_NODE": "4", "TASKS_PER_NODE": "2"}, "--ntasks-per-node=2 --gpus-per-task=2", "0,1"),
])
def test_slurm_tasks_per_node_override(fakes, extra, layout, ids):
    env, invoked, log = fakes
    out = run(SLURM, ["--dry-run", *TRAIN_7B], env(JAXLM_DIR="/opt/jaxlm", **extra))
    assert lines(out) == [srun_line(layout, ids)]
    assert not log.exists()


def test_slurm_inside_a_job_names_nodes_tasks_and_cpus(fakes):
    env, invoked, log = fakes
    job = {"JAXLM_DIR": "/opt/jaxlm", "SLURM_JOB_NUM_NODES": "16", "SLURM_CPUS_ON_NODE": "96"}
    out = run(SLURM, ["--dry-run", *TRAIN_7B], env(**job))
    assert lines(out) == [srun_line(
        "--nodes=16 --ntasks=128 --ntasks-per-node=8 --gpus-per-task=1 --cpus-per-task=12", "0")]
    out = run(SLURM, ["--dry-run", *TRAIN_7B], env(**job, TASKS_PER_NODE="1"))
    assert lines(out) == [srun_line(
        "--nodes=16 --ntasks=16 --ntasks-per-node=1 --gpus-per-task=8 --cpus-per-task=96",
        "0,1,2,3,4,5,6,7")]
    assert not log.exists()


def test_slurm_checkout_dir(fakes, tmp_path):
    env, invoked, log = fakes
    # Outside sbatch: the folder above tools/, from the script's own location.
    argv = shlex.split(lines(run(SLURM, ["--dry-run", "params"], env()))[0])
    assert f"--chdir={ROOT}" in argv and argv[-2:] == [f"{ROOT}/.venv/bin/jaxlm", "params"]
    # Under sbatch the script runs from a spool copy: the submit folder is the checkout.
    spool = tmp_path / "spool" / "slurm_script"
    spool.parent.mkdir()
    shutil.copy(SLURM, spool)
    argv = shlex.split(lines(run(str(spool), ["--dry-run", "params"],
                                 env(SLURM_SUBMIT_DIR="/home/me/jaxlm")))[0])
    assert "--chdir=/home/me/jaxlm" in argv and argv[-2] == "/home/me/jaxlm/.venv/bin/jaxlm"
    argv = shlex.split(lines(run(str(spool), ["--dry-run", "params"],
                                 env(SLURM_SUBMIT_DIR="/home/me/jaxlm", JAXLM_DIR="/opt/x")))[0])
    assert "--chdir=/opt/x" in argv and argv[-2] == "/opt/x/.venv/bin/jaxlm"
    assert not log.exists()


def test_slurm_quotes_arguments(fakes):
    env, invoked, log = fakes
    out = run(SLURM, ["--dry-run", *AWKWARD], env(JAXLM_DIR="/opt/jaxlm"))
    [line] = lines(out)
    assert line == srun_line("--ntasks-per-node=8 --gpus-per-task=1", "0",
                             ["train", "'--workdir=/mnt/my runs/7b'", r"'--config.data.files=it'\''s.txt'"])
    assert shlex.split(line)[-3:] == AWKWARD


def test_slurm_bad_layout_is_one_line_and_exit_2(fakes):
    env, invoked, log = fakes
    out = run(SLURM, ["--dry-run", *TRAIN_7B], env(TASKS_PER_NODE="3"))
    assert out.returncode == 2 and out.stdout == ""
    [error] = out.stderr.splitlines()
    assert "TASKS_PER_NODE (3) must divide GPUS_PER_NODE (8)" in error
    out = run(SLURM, ["--dry-run"], env())
    assert out.returncode == 2 and out.stderr.startswith("usage:")
    assert not log.exists()


def test_slurm_runs_what_the_dry_run_prints(fakes, tmp_path):
    env, invoked, log = fakes
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "jaxlm").write_text("#!/bin/sh\nexit 0\n")
    (checkout / ".venv" / "bin" / "jaxlm").chmod(0o755)
    job = env(JAXLM_DIR=str(checkout), SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2",
              SLURM_CPUS_ON_NODE="64", SLURM_NTASKS_PER_NODE="8")
    [printed] = lines(run(SLURM, ["--dry-run", *AWKWARD], job))
    assert not log.exists()
    out = run(SLURM, AWKWARD, job)
    assert out.returncode == 0, out.stderr
    [argv] = invoked()
    assert os.path.basename(argv[0]) == "srun" and argv[1:] == shlex.split(printed)[1:]
    assert "--ntasks=16" in argv and "--cpus-per-task=8" in argv


def test_slurm_outside_a_job_refuses_to_run(fakes):
    env, invoked, log = fakes
    out = run(SLURM, TRAIN_7B, env(JAXLM_DIR="/opt/jaxlm"))
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "sbatch" in out.stderr
    assert not log.exists()


def test_slurm_header():
    text = open(SLURM).read().splitlines()
    assert text[0].startswith("#!")
    # sbatch stops reading #SBATCH lines at the first command: they must all come before it.
    first_command = next(i for i, line in enumerate(text) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in text if line.startswith("#SBATCH")]
    assert all(not line.startswith("#SBATCH") for line in text[first_command:])
    assert {"--nodes=1", "--ntasks-per-node=8", "--gpus-per-task=1", "--exclusive",
            "--output=runs/slurm-%j.out", "--signal=TERM@120"} <= set(directives)
    assert any(re.fullmatch(r"--time=\d+:\d\d:\d\d", d) for d in directives)


def test_scripts_are_executable_and_documented():
    for script in (TPU, SLURM):
        assert os.access(script, os.X_OK), script
    doc = open(os.path.join(ROOT, "docs", "launch.md")).read()
    for name in ("tools/launch_tpu_pod.sh", "tools/slurm_train.sbatch", "tools/launch_local.sh",
                 "configs/llama2_7b.py", "--dry-run"):
        assert name in doc
    assert "(docs/launch.md)" in open(os.path.join(ROOT, "README.md")).read()


def test_documented_dry_runs_match_the_scripts(fakes):
    env, invoked, log = fakes
    doc = open(os.path.join(ROOT, "docs", "launch.md")).read().splitlines()
    tpu = run(TPU, ["--dry-run", "train", "--config=configs/llama2_7b.py", "--workdir=/mnt/shared/runs/7b",
                    "--config.data.data_dir=/mnt/shared/data", "--config.optim.grad_accum_steps=16"],
              env(TPU_NAME="my-v5p", ZONE="us-east5-a"))
    slurm = run(SLURM, ["--dry-run", "train", "--config=configs/llama2_7b.py", "--workdir=/shared/runs/7b",
                        "--config.data.data_dir=/shared/data", "--config.mesh.data=-1",
                        "--config.mesh.fsdp=8", "--config.optim.grad_accum_steps=4"],
                env(JAXLM_DIR="/shared/jaxlm"))
    for out in (tpu, slurm):
        [line] = lines(out)
        assert line in doc
    assert not log.exists()

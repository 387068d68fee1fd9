"""The `jaxlm` console script: JSON on the last line, one-line errors with exit code 2."""

import json
import os
import subprocess
import sys

import pytest


def jaxlm(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], capture_output=True, text=True, env=env,
        timeout=300,
    )


def test_params_json():
    out = jaxlm("params", "--config=configs/llama2_7b.py")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "num_params": 6738415616, "formula": 6738415616}


@pytest.mark.parametrize(
    "args,named",
    [
        (["params", "--config=configs/tiny.py", "--config.model.nope=1"], "model.nope"),
        (["params", "--config=configs/tiny.py", "--config.model.d_model=x"], "model.d_model"),
        (["params", "--config=configs/tiny.py", "--config.model.remat=x"], "model.remat"),
        (["params", "--config=configs/missing.py"], "configs/missing.py"),
        (["params"], "--config"),
        (["params", "--config=configs/tiny.py", "stray"], "stray"),
        (["bench", "--config=configs/tiny.py", "--steps=0"], "steps"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_errors_are_one_line_exit_2(args, named):
    out = jaxlm(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlm: error:"), out.stderr
    assert named in lines[0]
    assert "Traceback" not in out.stderr

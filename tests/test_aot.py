"""`jaxlm aot`: the real train step compiled from abstract shapes for fake CPU devices and for a TPU
topology (libtpu from `make test`'s .venv/tpu), bytes per device, fits / does not fit, and the
remat policies' effect on memory."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jaxlm import aot, config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBTPU = os.path.join(sys.prefix, "tpu")  # the venv running the tests (make test installs it)


def jaxlm_aot(*args, libtpu=False):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if libtpu:
        assert os.path.isdir(os.path.join(LIBTPU, "libtpu")), (
            f"libtpu is missing from {LIBTPU}: run `make test` (it installs it there)")
        env["PYTHONPATH"] = LIBTPU
    proc = subprocess.run([sys.executable, "-m", "jaxlm.cli", "aot", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return proc, report


@pytest.mark.slow
def test_llama2_7b_fits_eight_h100s_with_fsdp_and_remat():
    proc, report = jaxlm_aot("--config=configs/llama2_7b.py", "--devices=8", "--device=h100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["fits"] is True
    assert report["mesh"] == {"data": 1, "stage": 1, "fsdp": 8, "tensor": 1}
    assert report["remat"] == "full" and report["num_params"] == 6_738_415_616
    b = report["bytes_per_device"]
    # Params + Adam moments in float32 (12 bytes per parameter), split 8 ways, are arguments.
    assert 12 * 6_738_415_616 / 8 <= b["arguments"] < 1.05 * 12 * 6_738_415_616 / 8
    assert b["total"] == b["arguments"] + b["outputs"] + b["temporaries"] + b["code"]
    assert b["total"] <= report["usable_bytes"] == int(0.9 * 80 * 2**30)
    # Analytic FLOPs: 6 x matmul params x tokens plus attention, not XLA's scan-once count.
    tokens = report["global_batch_size"] * report["seq_len"]
    assert report["flops_per_step"] > 6 * 6.7e9 * tokens
    assert "fits" in proc.stdout and "temporaries" in proc.stdout


@pytest.mark.slow
def test_oversized_batch_does_not_fit_and_says_what_to_change():
    # llama_125m sharded and rematerialized as far as it goes, on a 1 GiB device: only fewer rows
    # per microbatch help (the 7B preset says the same on 8 H100s, at 3x this test's time).
    proc, report = jaxlm_aot("--config=configs/llama_125m.py", "--devices=8", "--memory_gib=1",
                             "--config.train.global_batch_size=64", "--config.optim.grad_accum_steps=1",
                             "--config.model.remat=full", "--config.mesh.data=1",
                             "--config.mesh.fsdp=-1")
    assert proc.returncode == 1
    assert report["fits"] is False and report["bytes_per_device"]["total"] > report["usable_bytes"]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("jaxlm: error: does not fit:")
    assert "over by" in error and "optim.grad_accum_steps" in error


@pytest.mark.slow
def test_tpu_topology_compiles_with_libtpu_and_splash_attention():
    proc, report = jaxlm_aot("--config=configs/tiny.py", "--topology=v5e:2x2",
                             "--config.mesh.data=1", "--config.mesh.fsdp=4",
                             "--config.train.global_batch_size=8",
                             "--config.model.attention=auto", libtpu=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["fits"] is True and report["num_devices"] == 4
    assert report["target"].startswith("TPU v5e:2x2 (4 x TPU v5 lite)")
    assert report["device_memory_bytes"] == 16 * 2**30
    assert "attention: auto -> splash on tpu" in proc.stderr  # the Pallas kernel compiled for TPU


def test_command_line_errors_are_one_line(capsys, monkeypatch):
    from jaxlm import cli

    # In this process: each is refused before anything compiles (XLA_FLAGS, which `aot` edits for
    # --devices, is put back afterwards).
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    for args, says in [
        (["--config=configs/tiny.py"], "exactly one of --devices"),
        (["--config=configs/tiny.py", "--devices=2"], "needs --device"),
        (["--config=configs/tiny.py", "--devices=2", "--device=b200"], "--device='b200' is unknown"),
    ]:
        assert cli.main(["jaxlm", "aot", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxlm: error:") and says in err and len(err.splitlines()) == 1, err
    for args, says in [(["--config=configs/tiny.py", "--topology=v9:1x1"], "needs libtpu")]:
        proc, _ = jaxlm_aot(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().startswith("jaxlm: error:") and says in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_topology_is_one_line_with_libtpu():
    proc, _ = jaxlm_aot("--config=configs/tiny.py", "--topology=v9:1x1", libtpu=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxlm: error: --topology='v9:1x1' is not a TPU topology")


def test_remat_policies_trade_memory_in_order():
    """Temporaries per device, same model and batch: none keeps everything, save_dots the
    projections, save_attn q/k/v and the attention output, full only the block inputs."""
    base = config.from_dict({
        "model": {"vocab_size": 256, "d_model": 64, "num_layers": 4, "num_heads": 4,
                  "num_kv_heads": 2, "mlp_dim": 256, "max_seq_len": 256},
        "data": {"seq_len": 256},
        "train": {"global_batch_size": 16},
        "mesh": {"data": 1, "fsdp": 8},
    })
    temps = {}
    for policy in ("none", "save_dots", "save_attn", "full"):
        report = aot.check(base.replace(model={"remat": policy}), jax.devices(), 2**30)
        temps[policy] = report["bytes_per_device"]["temporaries"]
    assert temps["none"] > temps["save_dots"] > temps["full"], temps
    assert temps["none"] > temps["save_attn"] > temps["full"], temps

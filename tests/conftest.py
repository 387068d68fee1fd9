"""Test setup: 8 fake CPU devices (for sharding tests) and quick XLA:CPU compiles before jax is
first imported, and one XLA compilation cache for the whole test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite compiles hundreds of small programs and runs each a few times, so XLA:CPU's LLVM
# code generation, not running the code, is most of its time: compile without LLVM's
# optimisation passes (measured on the 2-core VM: test_objectives + test_attention_entropy 130 s
# -> 87 s, test_train 175 s -> 159 s). The HLO passes are unchanged, but the machine code is
# not, and float results can differ in the last bits (measured: a 6-step run's parameters by up
# to 1.3e-8), so two runs compared bit for bit must compile alike. Subprocesses inherit it (and
# tools/launch_local.sh passes XLA_FLAGS on); tests that start jaxlm in a subprocess with their
# own XLA_FLAGS add JAXLM_TEST_COMPILE_FLAGS.
os.environ.setdefault("JAXLM_TEST_COMPILE_FLAGS",
                      "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
if "xla_backend_optimization_level" not in flags:
    flags += " " + os.environ["JAXLM_TEST_COMPILE_FLAGS"]
os.environ["XLA_FLAGS"] = flags.strip()

# Many tests compile the same small programs, and the subprocess tests (jaxlm train, launches of
# two processes) compile them again in every process: a persistent compilation cache, shared by
# the xdist workers and the processes they start (they inherit the environment), halves their
# time. It is made fresh for each session (the controller creates it before the workers start),
# so a run measures what a clean CI machine does; cache keys include the program and the jax
# version, so a hit is the same executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
    _cache = tempfile.mkdtemp(prefix="jaxlm-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import filelock  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from jaxlm import config  # noqa: E402


@pytest.fixture
def tiny_cfg():
    """A very small model config (fast compile) with GQA: 4 heads over 2 kv heads."""
    return config.from_dict({
        "model": {
            "vocab_size": 97, "d_model": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
            "mlp_dim": 64, "max_seq_len": 64, "rope_theta": 10000.0,
        },
        "data": {"seq_len": 32},
    })


@pytest.fixture(scope="session")
def stdlib_data_dir(tmp_path_factory):
    """A data dir with the embedded corpus prepared and a 512-piece tokenizer trained, made once
    per test session and shared by every xdist worker (under a file lock), for tests that train
    on the corpus but do not test preparing it. Preparing is deterministic, so sharing changes
    no result; tests that write into it only add files (tokenizers of other sizes, tasks), each
    written atomically."""
    from jaxlm import datasets, tokenizer

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "shared-stdlib-data"
    with filelock.FileLock(str(root / "shared-stdlib-data.lock")):
        if not (path / "ready").exists():
            cfg = config.from_dict({"model": {"vocab_size": 512, "max_seq_len": 32},
                                    "data": {"data_dir": str(path), "seq_len": 32}})
            datasets.prepare(cfg.data)
            tokenizer.for_config(cfg)
            (path / "ready").touch()
    return str(path)


def pytest_configure(config):
    assert jax.device_count() == 8, "conftest must run before anything imports jax"

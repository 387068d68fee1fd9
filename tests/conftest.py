"""Test setup: 8 fake CPU devices (for sharding tests) before jax is first imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

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


def pytest_configure(config):
    assert jax.device_count() == 8, "conftest must run before anything imports jax"

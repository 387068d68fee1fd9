"""jaxlm: pretrain and adapt Llama-style decoder language models with JAX and Flax NNX."""

from jaxlm.api import LM, from_params, load

__all__ = ["LM", "from_params", "load"]
__version__ = "0.1.0"

"""A persistent XLA compilation cache for the `jaxlm` commands.

Every `jaxlm` process compiles its programs afresh: a resumed training run its train step, an
evaluation its scoring programs (one per padded shape), `jaxlm generate` its prefill and decode
loop. On the 2-core VM that is most of a short command's time (`jaxlm evaluate --tasks=stdlib_mc
--limit=200` on the tiny model: 20.3 s cold, 11.5 s with the cache warm; docs/performance.md).
JAX can keep compiled programs on disk, keyed by the program, the devices, the jax version and
the XLA flags, so a hit is the executable a fresh compile would give (a resumed run stays
bitwise); the commands turn that on:

- `JAX_COMPILATION_CACHE_DIR` set: jax uses it as it is (empty: no cache), nothing here changes;
- otherwise `JAXLM_COMPILE_CACHE=DIR` (a local path or gs://...), by default
  `$XDG_CACHE_HOME/jaxlm/xla` (`~/.cache/jaxlm/xla`); a local one is kept under 2 GiB by jax's
  own eviction of the least recently used entries; `JAXLM_COMPILE_CACHE=off` turns it off.

In a multi-process run only process 0 writes entries (jax's rule); the others read them when the
directory is shared. `jaxlm aot` and `jaxlm bench` report compile seconds, so they compile
afresh. A directory that cannot be created means no cache, and nothing else changes.

jax writes an entry in place, and never over an existing one: an entry cut short (a process
killed while writing it, a full disk) is read back as "Error reading persistent compilation
cache entry for '<program>'", a warning, and that program compiles afresh on every run until the
directory is deleted (checked: entries truncated by hand, then `jaxlm generate` warned, compiled
and gave the same tokens).
"""

from __future__ import annotations

import os

OFF = ("", "0", "off", "none", "false")
MAX_BYTES = 2 << 30
# Compiles shorter than this are not written: the tiny model's programs take 0.3-1.2 s on the
# 2-core VM, and jax's default (1 s) would skip most of them.
MIN_COMPILE_SECONDS = 0.2


def default_dir() -> str:
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "jaxlm", "xla")


def enable() -> str | None:
    """Turn the cache on for this process, before its first compile; the directory in use, or None."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # jax's own switch; empty: no cache
        return os.environ["JAX_COMPILATION_CACHE_DIR"] or None
    where = os.environ.get("JAXLM_COMPILE_CACHE")
    if where is not None and where.strip().lower() in OFF:
        return None
    where = where or default_dir()
    if "://" not in where:
        try:
            os.makedirs(where, exist_ok=True)
        except OSError:
            return None
        if not os.access(where, os.W_OK):
            return None
    import jax

    jax.config.update("jax_compilation_cache_dir", where)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ and "://" not in where:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # eviction locks locally
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return where

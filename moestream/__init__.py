"""moestream: run giant mixture-of-experts Llama 4 models on one GPU that cannot hold them.

`load` and `LLM` are imported on first use (PEP 562): they bring torch, and `moestream --help`
(which goes through this package) must not wait seconds for it.
"""

from .errors import MoestreamError

__all__ = ["LLM", "MoestreamError", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("LLM", "load"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'moestream' has no attribute {name!r}")

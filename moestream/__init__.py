"""moestream: run giant mixture-of-experts Llama 4 models on one GPU that cannot hold them."""

from .errors import MoestreamError
from .llm import LLM, load

__all__ = ["LLM", "MoestreamError", "load"]
__version__ = "0.1.0"

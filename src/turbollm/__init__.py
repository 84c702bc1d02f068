"""turbollm: local inference for Gemma GGUF models, in Python.

Public API: `Model` (load a GGUF, generate, stream), `SamplingParams` and `CacheConfig` (the KV
cache's codecs and layout).
"""

from turbollm.api import Completion, Model
from turbollm.engine.sampler import SamplingParams
from turbollm.errors import ContextLengthError, GGUFError, TurbollmError
from turbollm.kv.plan import CacheConfig

__all__ = ["CacheConfig", "Completion", "ContextLengthError", "GGUFError", "Model", "SamplingParams", "TurbollmError"]

"""turbollm: local inference for Gemma GGUF models, in Python.

Public API: `Model` (load a GGUF, generate, stream), `RunConfig` (how it runs: context, slots,
threads, device, placement), `SamplingParams` (with `Constraint`, structured output),
`CacheConfig` (the KV cache's codecs and layout) and `SpecConfig` (speculative decoding).
"""

from turbollm.api import Completion, Model
from turbollm.config import RunConfig
from turbollm.engine.grammar import Constraint
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.speculative import SpecConfig
from turbollm.errors import ContextLengthError, GGUFError, TurbollmError
from turbollm.kv.plan import CacheConfig

__all__ = ["CacheConfig", "Completion", "Constraint", "ContextLengthError", "GGUFError", "Model", "RunConfig",
           "SamplingParams", "SpecConfig", "TurbollmError"]

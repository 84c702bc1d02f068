"""turbollm: local inference for Gemma GGUF models, in Python.

Public API: `Model` (load a GGUF, generate, stream) and `SamplingParams`.
"""

from turbollm.api import Completion, Model
from turbollm.engine.sampler import SamplingParams
from turbollm.errors import ContextLengthError, GGUFError, TurbollmError

__all__ = ["Completion", "ContextLengthError", "GGUFError", "Model", "SamplingParams", "TurbollmError"]

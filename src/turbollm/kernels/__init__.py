"""Compute kernels behind one API.

`linear`, `embedding`, `moe_ffn` and `attention` take activations as torch tensors and weights as
`QTensor`s. Today every call goes to the pure-PyTorch reference (`reference.py`,
`attention.py`), which runs on any device; native CPU kernels slot in behind the same names.
Kernels know nothing of models.
"""

from turbollm.kernels.attention import attention
from turbollm.kernels.qtensor import QTensor
from turbollm.kernels.reference import embedding, linear, moe_ffn

__all__ = ["QTensor", "attention", "embedding", "linear", "moe_ffn"]

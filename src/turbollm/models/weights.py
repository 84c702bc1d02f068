"""Fetching a model's tensors from a GGUF, checked against the shapes the config implies.

Every problem is one line naming the file, the tensor, the expected and the actual shape or
type. Quantized weights stay views of the mmap (`QTensor`); small tensors (norms, scales)
are dequantized to float32 once.
"""

from __future__ import annotations

import torch

from turbollm.errors import GGUFError
from turbollm.gguf import quants
from turbollm.gguf.reader import GGUFFile, TensorInfo
from turbollm.kernels import QTensor


class TensorLoader:
    def __init__(self, gf: GGUFFile, device: torch.device | str):
        self.gf, self.device = gf, torch.device(device)

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def _info(self, name: str, shape: tuple[int, ...]) -> TensorInfo:
        info = self.gf.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.gf.path}: missing tensor '{name}' (expected shape {shape})")
        if info.shape != shape:
            raise GGUFError(f"{self.gf.path}: tensor '{name}' has shape {info.shape}, expected {shape}")
        if not quants.is_supported(info.qtype):
            raise GGUFError(f"{self.gf.path}: tensor '{name}' has quantization type {info.qtype.name}, which turbollm cannot compute")
        return info

    def check_leading_dim(self, name: str, expected: int, key: str) -> None:
        """A count the metadata states (e.g. experts) must match the tensor that holds them."""
        info = self.gf.tensors.get(name)
        if info is not None and info.shape[0] != expected:
            raise GGUFError(f"{self.gf.path}: tensor '{name}' holds {info.shape[0]} along its first dimension, "
                            f"but metadata '{key}' says {expected}")

    def quantized(self, name: str, shape: tuple[int, ...]) -> QTensor:
        """A weight kept in its block format."""
        info = self._info(name, shape)
        return QTensor(self.gf.tensor_bytes(name), info.qtype, info.shape, name).to(self.device)

    def dense(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A small tensor (norm weights, scales) as float32 on the device."""
        return self.quantized(name, shape).dequantize().to(self.device)

    def optional_quantized(self, name: str, shape: tuple[int, ...]) -> QTensor | None:
        return self.quantized(name, shape) if self.has(name) else None

    def optional_dense(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.dense(name, shape) if self.has(name) else None

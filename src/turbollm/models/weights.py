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
    def __init__(self, gf: GGUFFile, device: torch.device | str, placement: dict[str, str] | None = None):
        """`placement`: tensor name -> device, the planner's (turbollm.planner); others go to `device`."""
        self.gf, self.device, self.placement = gf, torch.device(device), placement or {}

    def device_of(self, name: str) -> torch.device:
        return torch.device(self.placement.get(name, self.device))

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

    def quantized(self, name: str, shape: tuple[int, ...], device: torch.device | None = None) -> QTensor:
        """A weight kept in its block format, on `device` (default: its placement)."""
        info = self._info(name, shape)
        return QTensor(self.gf.tensor_bytes(name), info.qtype, info.shape, name).to(device or self.device_of(name))

    def dense(self, name: str, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        """A small tensor (norm weights, scales) as float32 on `device` (default: its placement)."""
        target = device or self.device_of(name)
        return self.quantized(name, shape, torch.device("cpu")).dequantize().to(target)

    def optional_quantized(self, name: str, shape: tuple[int, ...], device: torch.device | None = None) -> QTensor | None:
        return self.quantized(name, shape, device) if self.has(name) else None

    def optional_dense(self, name: str, shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor | None:
        return self.dense(name, shape, device) if self.has(name) else None

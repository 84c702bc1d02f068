"""QTensor: a weight kept in its GGUF block format, on whatever device holds its bytes.

Kernels take QTensors; nothing above the kernels dequantizes a whole weight. The bytes are
usually a view of the mmapped file, so holding a QTensor costs no RAM beyond the page cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType as QType

from turbollm.gguf import quants


@dataclass(frozen=True, eq=False)
class QTensor:
    data: torch.Tensor  # uint8 [*shape[:-1], row_bytes]
    qtype: QType
    shape: tuple[int, ...]  # logical shape, outermost first; a linear weight is (n_out, n_in)
    name: str = ""

    def __post_init__(self) -> None:
        if self.data.dtype != torch.uint8:
            raise ValueError(f"QTensor '{self.name}': data must be uint8 bytes, got {self.data.dtype}")
        expected = (*self.shape[:-1], quants.row_bytes(self.qtype, self.shape[-1]))
        if tuple(self.data.shape) != expected:
            raise ValueError(f"QTensor '{self.name}': byte shape {tuple(self.data.shape)} does not match {expected} for {self.qtype.name} {self.shape}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """The whole tensor as float32. For small tensors (norms, scales) and for tests."""
        return quants.dequantize(self.data, self.qtype, self.shape)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a 2-D tensor as float32 [len(ids), n_cols]: an embedding lookup."""
        return quants.dequantize(self.data[ids], self.qtype, (ids.numel(), self.shape[-1]))

    def select(self, index: int) -> "QTensor":
        """Slice `index` of the outermost dimension (one expert of a stacked 3-D tensor)."""
        return QTensor(self.data[index], self.qtype, self.shape[1:], f"{self.name}[{index}]")

    def to(self, device: torch.device | str) -> "QTensor":
        return QTensor(self.data.to(device), self.qtype, self.shape, self.name)

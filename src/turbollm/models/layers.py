"""Building blocks shared by the Gemma models: rotary embeddings, in float32.

(RMSNorm is a kernel, `ops.rms_norm`. Norm weights are used as stored in the GGUF: for Gemma 3
llama.cpp's converter has already folded the `1 + w` convention into them; Gemma 4 uses `x * w`.)
"""

from __future__ import annotations

import torch


class Rope:
    """Rotary position embedding, NeoX layout (the two halves of a head are the pairs).

    cos/sin are computed as transformers does: inv_freq = 1 / base^(2i/d) in float32, angles =
    position * inv_freq. Linear scaling multiplies inv_freq by `freq_scale` (llama.cpp's
    freq_scale); `freq_factors` divide it per pair (GGUF `rope_freqs.weight`: Gemma 4's
    proportional RoPE sets 1e30 on the pairs that do not rotate, i.e. angle 0).
    """

    def __init__(self, head_dim: int, base: float, freq_scale: float = 1.0,
                 freq_factors: torch.Tensor | None = None, device: torch.device | str = "cpu"):
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv_freq = 1.0 / (base ** exponents) * freq_scale
        if freq_factors is not None:
            if freq_factors.shape != inv_freq.shape:
                raise ValueError(f"rope frequency factors have shape {tuple(freq_factors.shape)}, expected {tuple(inv_freq.shape)}")
            inv_freq = inv_freq / freq_factors.to(inv_freq.device)
        self.inv_freq = inv_freq.to(device)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, d] for `positions` [T]: computed once per forward, used by every
        layer of this type (kernels.blocks.apply_rope)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, d/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()

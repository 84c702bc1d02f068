"""TurboQuant's MSE quantizer for KV vectors (Zandieh et al., arXiv 2504.19874), in PyTorch.

A vector x of a block of `block` coordinates is stored as its norm and, per coordinate, the
index of the nearest codebook value of the rotated unit vector:

    u = H D x / |x|            D: fixed random signs, H: normalised Walsh-Hadamard (O(d log d))
    code_i = argmin_c |u_i - codebook[c]|
    x^ = |x| D H^T codebook[code]   (H is symmetric and orthonormal: H^T = H)

After a random rotation every coordinate of a unit vector in d dimensions follows the same
law, with density proportional to (1 - t^2)^((d - 3) / 2) on [-1, 1] (about N(0, 1/d)), nearly
independently of the others; so one scalar codebook per (bits, d) is optimal for all of them.
It is the Lloyd-Max quantizer of that density, computed here, not copied: start from the
quantiles, then alternate "boundaries = midpoints of neighbouring values" and "values =
conditional means of their cells" on a fine grid until nothing moves (`lloyd_max_codebook`).

This module computes the codebooks and is the quantizer's definition (one byte per code);
kv/codecs.py packs the codes into cache rows, and the native attention (kernels/native/csrc/kv.c)
reads them directly: the query is rotated once instead of unrotating every key.
"""

from __future__ import annotations

import functools
import math

import torch

GRID_POINTS = 1 << 16  # samples of the density on [-1, 1] for the Lloyd-Max iteration


def _coordinate_law(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid points inside (-1, 1) and the probability of each under (1 - t^2)^((dim - 3) / 2)."""
    t = torch.linspace(-1.0, 1.0, GRID_POINTS + 2, dtype=torch.float64)[1:-1]
    density = (1.0 - t * t).pow((dim - 3) / 2.0)
    return t, density / density.sum()


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(bits: int, dim: int, tol: float = 1e-9, max_iter: int = 10_000) -> torch.Tensor:
    """The 2**bits values (ascending, float64) minimising E[(t - q(t))^2] for one coordinate of
    a random unit vector in `dim` dimensions."""
    if not 1 <= bits <= 8:
        raise ValueError(f"TurboQuant codebooks have 1 to 8 bits, not {bits}")
    if dim < 3:
        raise ValueError(f"the coordinate law needs at least 3 dimensions, not {dim}")
    t, density = _coordinate_law(dim)
    cdf = torch.cumsum(density, 0)
    levels = 1 << bits
    quantiles = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    values = t[torch.searchsorted(cdf, quantiles).clamp(max=len(t) - 1)]
    weighted = torch.cumsum(density * t, 0)
    for _ in range(max_iter):
        bounds = (values[1:] + values[:-1]) / 2
        edges = torch.searchsorted(t, bounds)  # cell k covers grid points [edges[k-1], edges[k])
        cuts = torch.cat([torch.tensor([0]), edges, torch.tensor([len(t)])])
        mass = _range_sum(cdf, cuts)
        first = _range_sum(weighted, cuts)
        new = torch.where(mass > 0, first / mass.clamp(min=1e-300), values)
        moved = (new - values).abs().max().item()
        values = new
        if moved < tol:
            break
    return values


def _range_sum(cumulative: torch.Tensor, cuts: torch.Tensor) -> torch.Tensor:
    """Sums of the underlying array over [cuts[k], cuts[k + 1]) from its cumulative sum."""
    padded = torch.cat([torch.zeros(1, dtype=cumulative.dtype), cumulative])
    return padded[cuts[1:]] - padded[cuts[:-1]]


def expected_distortion(bits: int, dim: int) -> float:
    """E[(t - q(t))^2] of the codebook for one coordinate; times dim, the expected squared
    error of a whole unit vector (what the paper bounds by sqrt(3) pi / 2 * 4**-bits)."""
    values = lloyd_max_codebook(bits, dim)
    t, density = _coordinate_law(dim)
    nearest = values[(t[:, None] - values[None, :]).abs().argmin(1)]
    return float((density * (t - nearest) ** 2).sum())


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform over the last dimension (a power of two); its own
    inverse."""
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two size, not {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(*lead, d) / math.sqrt(d)).to(x.dtype)


class TurboQuantMSE:
    """Encode / decode vectors in blocks of `block` coordinates at `bits` bits each."""

    def __init__(self, bits: int, block: int = 128, seed: int = 0):
        if block & (block - 1) or block < 4:
            raise ValueError(f"TurboQuant block size must be a power of two >= 4, not {block}")
        self.bits, self.block = bits, block
        generator = torch.Generator().manual_seed(seed)
        self.signs = torch.randint(0, 2, (block,), generator=generator).to(torch.float32) * 2 - 1
        self.codebook = lloyd_max_codebook(bits, block).to(torch.float32)
        self._bounds = (self.codebook[1:] + self.codebook[:-1]) / 2

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return hadamard(x * self.signs)

    def unrotate(self, u: torch.Tensor) -> torch.Tensor:
        return hadamard(u) * self.signs

    def encode(self, x: torch.Tensor, keep_length: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., n * block] -> (codes uint8 [..., n * block], norms float32 [..., n]).

        The stored norm is |x|: the decoded vector is |x| times the codeword, which is on
        average shorter than x (each coordinate's cell mean lies inside its cell: by the
        distortion, 3.4% in squared length at 3 bits). `keep_length` stores |x| / |codeword|
        instead, so the decoded vector has x's length: keys want that (a shrunk key scales its
        attention scores down, which flattens the softmax; see kv/codecs.py for the measure)."""
        blocks = self._blocks(x)
        norms = blocks.norm(dim=-1)
        unit = blocks / norms.clamp(min=torch.finfo(torch.float32).tiny)[..., None]
        codes = torch.bucketize(self.rotate(unit), self._bounds)
        if keep_length:
            length = self.codebook[codes].norm(dim=-1)
            norms = norms / length.clamp(min=torch.finfo(torch.float32).tiny)
        return codes.to(torch.uint8).reshape(x.shape), norms

    def decode(self, codes: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        values = self.codebook[codes.long()].view(*codes.shape[:-1], -1, self.block)
        return (self.unrotate(values) * norms[..., None]).reshape(codes.shape)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.block:
            raise ValueError(f"vectors of {x.shape[-1]} values do not split into blocks of {self.block}")
        return x.to(torch.float32).reshape(*x.shape[:-1], -1, self.block)

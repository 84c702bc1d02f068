"""TurboQuant's MSE quantizer: its codebooks against Lloyd-Max theory, its rotation, and the
error it makes against the error its codebook predicts."""

from __future__ import annotations

import math

import pytest
import torch

from turbollm.kv.turboquant import TurboQuantMSE, expected_distortion, hadamard, lloyd_max_codebook

# Max (1960): the optimal quantizers of N(0, 1), positive half; the coordinate law of a random
# unit vector tends to N(0, 1/d)
GAUSSIAN_LLOYD_MAX = {1: [0.7979], 2: [0.4528, 1.5104], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
# the paper's distortions of unit vectors (TurboQuant, Theorem 1: 0.36, 0.117, 0.03, 0.009)
PAPER_DISTORTION = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_codebook_tends_to_gaussian_lloyd_max(bits):
    values = lloyd_max_codebook(bits, 1024) * math.sqrt(1024)
    assert torch.allclose(values, -values.flip(0), atol=1e-9)  # symmetric
    positive = values[len(values) // 2:].tolist()
    assert positive == pytest.approx(GAUSSIAN_LLOYD_MAX[bits], abs=0.01)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_distortion_matches_the_paper_and_its_bound(bits):
    d = 128
    per_vector = expected_distortion(bits, d) * d
    assert per_vector < math.sqrt(3) * math.pi / 2 * 4.0 ** -bits  # the paper's upper bound
    assert per_vector == pytest.approx(PAPER_DISTORTION[bits], rel=0.16)


def test_hadamard_is_orthonormal_and_its_own_inverse():
    x = torch.randn(5, 64, dtype=torch.float64)
    y = hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(hadamard(y), x)
    h = hadamard(torch.eye(8, dtype=torch.float64))
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.zeros(3, 48))


@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_reconstruction_error_is_the_predicted_one(bits, block):
    codec = TurboQuantMSE(bits, block, seed=1)
    x = torch.randn(4000, 256, generator=torch.Generator().manual_seed(2)) * 3.0
    codes, norms = codec.encode(x)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    assert norms.shape == (4000, 256 // block)
    error = ((codec.decode(codes, norms) - x) ** 2).sum() / (x ** 2).sum()
    assert error.item() == pytest.approx(expected_distortion(bits, block) * block, rel=0.05)


def test_zero_vectors_and_bad_shapes():
    codec = TurboQuantMSE(3, 32)
    codes, norms = codec.encode(torch.zeros(2, 64))
    assert torch.equal(codec.decode(codes, norms), torch.zeros(2, 64))
    with pytest.raises(ValueError, match="blocks of 32"):
        codec.encode(torch.zeros(2, 48))
    with pytest.raises(ValueError, match="power of two"):
        TurboQuantMSE(3, 48)
    with pytest.raises(ValueError, match="1 to 8 bits"):
        lloyd_max_codebook(0, 128)

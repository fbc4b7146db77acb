"""The shared linear algebra against plain dense products."""

from __future__ import annotations

import pytest
import torch

from msif.core.linalg import gram, low_rank, rotate_output, rotate_rows


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 5), (40, 300), (3, 33, 517)])
def test_gram_equals_the_plain_product(shape):
    x = _randn(*shape)
    got = gram(x, leaf=64)  # 300 and 517 recurse three levels down
    torch.testing.assert_close(got, x.mT @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks", [1, 3])
def test_block_rotations_equal_the_dense_block_diagonal(blocks):
    q = _randn(blocks, 4, 4, seed=2)
    dense = torch.block_diag(*q)
    g = _randn(2, 5, 4 * blocks, seed=3)
    torch.testing.assert_close(rotate_output(g, q), g @ dense, rtol=1e-12, atol=1e-12)
    x = _randn(2, 4 * blocks, 6, seed=4)
    torch.testing.assert_close(rotate_rows(q, x), dense @ x, rtol=1e-12, atol=1e-12)


def test_low_rank_keeps_the_leading_singular_directions():
    w = _randn(3, 6, 4, seed=5)
    u, s, v = low_rank(w, 10)  # rank capped at min(out, in')
    assert (u.shape, s.shape, v.shape) == ((3, 6, 4), (3, 4), (3, 4, 4))
    torch.testing.assert_close(torch.einsum("qor,qr,qir->qoi", u, s, v), w)
    u1, s1, v1 = low_rank(w, 1)
    torch.testing.assert_close(s1, s[:, :1])
    assert u1.is_contiguous() and v1.is_contiguous()

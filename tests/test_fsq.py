"""FSQ: the 64,000-entry codebook, exact codes <-> ids both ways, straight-through rounding."""

from __future__ import annotations

import pytest
import torch

from flextok.fsq import FSQ


@pytest.fixture(scope="module")
def fsq() -> FSQ:
    return FSQ((8, 8, 8, 5, 5, 5))


def test_codebook_size_is_product_of_levels(fsq):
    assert fsq.codebook_size == 64000


def test_every_id_round_trips_through_its_code(fsq):
    ids = torch.arange(fsq.codebook_size)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(ids)), ids)


def test_codes_are_distinct_and_on_the_documented_grid(fsq):
    codes = fsq.indices_to_codes(torch.arange(fsq.codebook_size))
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size
    even = torch.tensor([-1, -0.75, -0.5, -0.25, 0, 0.25, 0.5, 0.75])
    odd = torch.tensor([-1, -0.5, 0, 0.5, 1])
    for dim in range(3):
        assert torch.equal(torch.unique(codes[:, dim]), even)
    for dim in range(3, 6):
        assert torch.equal(torch.unique(codes[:, dim]), odd)


def test_mixed_radix_is_little_endian(fsq):
    # id 1 moves only dimension 0 by one level; id 8 moves only dimension 1; id 12800 only dimension 5
    base = fsq.indices_to_codes(torch.tensor(0))
    for idx, dim, step in [(1, 0, 0.25), (8, 1, 0.25), (512, 3, 0.5), (12800, 5, 0.5)]:
        delta = fsq.indices_to_codes(torch.tensor(idx)) - base
        expected = torch.zeros(6)
        expected[dim] = step
        assert torch.allclose(delta, expected)


def test_quantize_lands_on_codes_and_passes_gradients_straight_through(fsq):
    z = torch.randn(64, 6, requires_grad=True)
    codes = fsq.quantize(z)
    ids = fsq.codes_to_indices(codes)
    assert torch.equal(fsq.indices_to_codes(ids), codes.detach())
    codes.sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (fsq.bound(z2) / fsq._half_width).sum().backward()  # the same map without rounding
    assert torch.allclose(z.grad, z2.grad)
    assert (z.grad > 0).all()


@pytest.mark.parametrize("bad", [[-1], [64000], [5, 70000]])
def test_out_of_range_ids_are_rejected(fsq, bad):
    with pytest.raises(ValueError, match="0..63999"):
        fsq.indices_to_codes(torch.tensor(bad))


def test_float_ids_are_rejected(fsq):
    with pytest.raises(TypeError, match="integer"):
        fsq.indices_to_codes(torch.tensor([1.0]))

import pytest
import torch
import torch.nn.functional as F

from feedbackcam.augment import flip_rotate, random_flip_rotate, sample_flip_rotate


def blocky(n: int, h: int, w: int, block: int = 4, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant images: bilinear resampling inside a block returns the block value."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, h // block, w // block, generator=g)
    coarse[:, 0] = (coarse[:, 0] > 0.5).float()
    return F.interpolate(coarse, size=(h, w), mode="nearest")


def params(*pairs):
    flips = torch.tensor([f for f, _ in pairs], dtype=torch.bool)
    angles = torch.tensor([float(a) for _, a in pairs])
    return flips, angles


def test_no_flip_and_full_turns_are_exact_identities():
    x = torch.rand(3, 3, 17, 17)
    m = torch.rand(3, 17, 17) > 0.5
    y, n = flip_rotate(x, m, *params((False, 0), (False, 360), (False, -720)))
    assert torch.equal(y, x) and torch.equal(n, m)


def test_flip_equals_torch_flip():
    x = torch.rand(2, 3, 16, 20)
    m = torch.rand(2, 16, 20) > 0.5
    y, n = flip_rotate(x, m, *params((True, 0), (True, 0)))
    torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)
    assert torch.equal(n, m.flip(-1))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_quarter_turns_equal_rot90_on_square_inputs(k, flip):
    x = torch.rand(2, 3, 15, 15)
    m = torch.rand(2, 15, 15) > 0.5
    y, n = flip_rotate(x, m, *params((flip, 90 * k), (flip, 90 * k - 360)))
    xf, mf = (x.flip(-1), m.flip(-1)) if flip else (x, m)
    torch.testing.assert_close(y, torch.rot90(xf, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(n, torch.rot90(mf, k, dims=(-2, -1)))


def test_same_transform_on_image_and_mask_and_masks_stay_binary():
    x = blocky(6, 32, 32)
    m = x[:, 0] > 0.5  # the mask is the image's thresholded first channel
    flips, angles = params(
        (False, 15), (True, 45), (False, 105), (True, 210), (False, 330), (True, 75)
    )
    y, n = flip_rotate(x, m.float(), flips, angles)
    assert set(n.unique().tolist()) <= {0.0, 1.0}
    agree = ((y[:, 0] > 0.5) == n.bool()).float().mean()
    # only pixels whose bilinear footprint straddles a block border may disagree
    assert agree > 0.95
    # the check has teeth: the mask rotated the other way is clearly misaligned
    _, wrong = flip_rotate(x, m.float(), flips, -angles)
    assert ((y[:, 0] > 0.5) == wrong.bool()).float().mean() < agree - 0.1


def test_mask_dtype_is_kept():
    x = torch.rand(2, 3, 8, 8)
    for m in (torch.rand(2, 8, 8) > 0.5, torch.randint(0, 2, (2, 8, 8), dtype=torch.uint8)):
        _, n = flip_rotate(x, m, *params((True, 30), (False, 90)))
        assert n.dtype == m.dtype


def test_rotation_is_rigid_on_a_non_square_input():
    h, w = 11, 21  # centre at row 5, column 10
    x = torch.rand(1, 3, h, w)
    m = torch.zeros(1, h, w)
    m[0, 5, 13] = 1  # three pixels right of the centre
    y, n = flip_rotate(x, m, *params((False, 90)))
    assert y.shape == x.shape
    # counter-clockwise by 90 degrees: three pixels above the centre, not stretched by W/H
    assert n[0].nonzero().tolist() == [[2, 10]]
    y180, n180 = flip_rotate(x, m, *params((False, 180)))
    torch.testing.assert_close(y180, x.flip(-2, -1), atol=1e-5, rtol=0)
    assert torch.equal(n180, m.flip(-2, -1))


def test_zero_fill_and_reflection_fill():
    x = 0.2 + 0.8 * torch.rand(1, 3, 20, 20)
    m = torch.ones(1, 20, 20)
    y, n = flip_rotate(x, m, *params((False, 45)))
    assert y[0, :, 0, 0].abs().max() == 0 and n[0, 0, 0] == 0  # corners come from outside
    y, n = flip_rotate(x, m, *params((False, 45)), padding_mode="reflection")
    assert y.min() > 0.1 and n.min() == 1


def test_batched_equals_per_sample_and_inputs_are_not_mutated():
    x = torch.rand(4, 3, 12, 12)
    m = torch.rand(4, 12, 12) > 0.5
    x0, m0 = x.clone(), m.clone()
    flips, angles = params((False, 15), (True, 60), (True, 0), (False, 270))
    y, n = flip_rotate(x, m, flips, angles)
    for i in range(4):
        yi, ni = flip_rotate(x[i : i + 1], m[i : i + 1], flips[i : i + 1], angles[i : i + 1])
        torch.testing.assert_close(y[i : i + 1], yi)
        assert torch.equal(n[i : i + 1], ni)
    assert torch.equal(x, x0) and torch.equal(m, m0)


def test_random_params_differ_within_a_batch_and_are_reproducible():
    x = blocky(1, 16, 16).expand(32, -1, -1, -1).contiguous()
    m = x[:, 0] > 0.5
    y1, n1 = random_flip_rotate(x, m, torch.Generator().manual_seed(3))
    y2, n2 = random_flip_rotate(x, m, torch.Generator().manual_seed(3))
    y3, _ = random_flip_rotate(x, m, torch.Generator().manual_seed(4))
    assert torch.equal(y1, y2) and torch.equal(n1, n2)
    assert not torch.equal(y1, y3)
    distinct = {tuple(v.flatten().tolist()) for v in n1}
    assert len(distinct) >= 8  # identical inputs, per-sample transforms


def test_sampled_params_cover_the_thesis_grid():
    flips, angles = sample_flip_rotate(5000, torch.Generator().manual_seed(0))
    assert flips.dtype == torch.bool and 0.45 < flips.float().mean() < 0.55
    assert set(angles.unique().tolist()) == {15.0 * k for k in range(24)}
    _, angles = sample_flip_rotate(100, torch.Generator().manual_seed(0), steps=1, p_flip=0.0)
    assert angles.eq(0).all()


@pytest.mark.parametrize(
    "call",
    [
        lambda x, m: flip_rotate(x[0], m, *params((False, 0), (False, 0))),
        lambda x, m: flip_rotate(x.long(), m, *params((False, 0), (False, 0))),
        lambda x, m: flip_rotate(x, m[:, :-1], *params((False, 0), (False, 0))),
        lambda x, m: flip_rotate(x, m, torch.zeros(2), torch.zeros(2)),
        lambda x, m: flip_rotate(x, m, torch.zeros(3, dtype=torch.bool), torch.zeros(3)),
        lambda x, m: flip_rotate(x, m, torch.zeros(2, dtype=torch.bool), torch.zeros(2, 1)),
        lambda x, m: flip_rotate(x, m, *params((False, 0), (False, 0)), padding_mode="wrap"),
        lambda x, m: random_flip_rotate(x, m, p_flip=1.5),
        lambda x, m: random_flip_rotate(x, m, steps=0),
        lambda x, m: sample_flip_rotate(-1),
    ],
)
def test_bad_inputs_raise_value_error(call):
    with pytest.raises(ValueError):
        call(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_draws_on_the_device():
    x = torch.rand(8, 3, 64, 64)
    m = torch.rand(8, 64, 64) > 0.5
    flips, angles = sample_flip_rotate(8, torch.Generator().manual_seed(0))
    y, n = flip_rotate(x, m, flips, angles)
    yc, nc = flip_rotate(x.cuda(), m.cuda(), flips.cuda(), angles.cuda())
    torch.testing.assert_close(yc.cpu(), y, atol=1e-4, rtol=0)
    assert (nc.cpu() != n).float().mean() < 1e-3  # nearest ties may round differently
    g = torch.Generator(device="cuda").manual_seed(0)
    yb, nb = random_flip_rotate(x.cuda().half(), m.cuda(), g)
    assert yb.dtype == torch.float16 and yb.is_cuda and nb.is_cuda

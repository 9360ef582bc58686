import pytest
import torch
import torch.nn.functional as F

from fedhet.data.transforms import RandomCropFlip


def _reference(x, generator, padding, flip_prob, fill):
    """One image at a time, with the documented draw order (row offsets, column offsets, flips)."""
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < flip_prob
    out = []
    for b in range(n):
        padded = torch.stack([F.pad(x[b, ch], (padding,) * 4, value=fill[ch]) for ch in range(c)])
        crop = padded[:, oy[b] : oy[b] + h, ox[b] : ox[b] + w]
        out.append(crop.flip(-1) if flip[b] else crop)
    return torch.stack(out)


def test_flip_of_a_hand_made_tensor_is_its_mirror():
    x = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])
    flipped = RandomCropFlip(padding=0, flip_prob=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, torch.tensor([[[[3.0, 2.0, 1.0], [6.0, 5.0, 4.0]]]]))
    kept = RandomCropFlip(padding=0, flip_prob=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(kept, x)


def test_crop_of_a_hand_made_tensor_is_a_window_of_the_zero_padded_image():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]).repeat(200, 1, 1, 1)
    out = RandomCropFlip(padding=1, flip_prob=0.0)(x, torch.Generator().manual_seed(1))
    padded = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 0], [0, 3, 4, 0], [0, 0, 0, 0]], dtype=torch.float32)
    windows = {(i, j): padded[i : i + 2, j : j + 2] for i in range(3) for j in range(3)}
    seen = set()
    for img in out[:, 0]:
        matches = [k for k, win in windows.items() if torch.equal(img, win)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(windows)  # 200 draws reach all nine offsets


def test_vectorized_batch_matches_a_per_image_reference():
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    fill = (-1.0, 0.5, 2.0)
    out = RandomCropFlip(padding=4, flip_prob=0.5, fill=fill)(x, torch.Generator().manual_seed(9))
    expected = _reference(x, torch.Generator().manual_seed(9), 4, 0.5, fill)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, expected)


def test_deterministic_under_the_generator():
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = RandomCropFlip()
    a = t(x, torch.Generator().manual_seed(7))
    b = t(x, torch.Generator().manual_seed(7))
    c = t(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_not_touched():
    x = torch.randn(4, 1, 4, 4)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    RandomCropFlip()(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), expected)


def test_bad_settings():
    with pytest.raises(ValueError, match="RandomCropFlip.padding: got -1"):
        RandomCropFlip(padding=-1)
    with pytest.raises(ValueError, match="RandomCropFlip.flip_prob: got 1.5"):
        RandomCropFlip(flip_prob=1.5)
    with pytest.raises(ValueError, match=r"expects an \(N, C, H, W\) batch"):
        RandomCropFlip()(torch.zeros(3, 4, 4), torch.Generator())
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        RandomCropFlip(fill=(0.0, 1.0))(torch.zeros(1, 3, 4, 4), torch.Generator())

"""Training-time batch augmentations: ``(x, generator) -> x`` on an (N, C, H, W) float tensor.

Each transform draws only from the generator it is given, so a client's augmentation depends on its
derived generator and not on execution order. Transforms are frozen dataclasses, so they pickle and
can travel to worker processes with the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RandomCropFlip:
    """Random crop back to the input size after padding every side by ``padding`` pixels, then a
    horizontal flip with probability ``flip_prob`` (the usual CIFAR recipe with ``padding=4``).

    The padded border holds ``fill``: one value for every channel, or one value per channel. A batch
    already normalized with ``(x - mean) / std`` needs ``fill = -mean / std`` per channel for the
    border to be black pixels, as when padding raw images.

    The whole batch is done with one gather: per image the draws are a row offset and a column offset
    in ``[0, 2 * padding]`` and a flip decision, taken from the generator in that order.
    """

    padding: int = 4
    flip_prob: float = 0.5
    fill: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ValueError(f"RandomCropFlip.padding: got {self.padding!r}, allowed: an integer >= 0")
        if not 0.0 <= float(self.flip_prob) <= 1.0:
            raise ValueError(f"RandomCropFlip.flip_prob: got {self.flip_prob!r}, allowed: 0 <= p <= 1")
        if isinstance(self.fill, list):
            object.__setattr__(self, "fill", tuple(float(v) for v in self.fill))

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomCropFlip expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.padding
        offset_y = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        offset_x = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < self.flip_prob
        if n == 0:
            return x

        padded = x.new_empty((n, c, h + 2 * p, w + 2 * p))
        if isinstance(self.fill, tuple):
            if len(self.fill) != c:
                raise ValueError(f"RandomCropFlip.fill has {len(self.fill)} values for {c} channels")
            padded.copy_(torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).expand_as(padded))
        else:
            padded.fill_(float(self.fill))
        padded[:, :, p : p + h, p : p + w] = x

        # Output pixel (i, j) of image b reads padded row offset_y[b] + i and padded column
        # offset_x[b] + j, or offset_x[b] + (w - 1 - j) when the image is flipped.
        rows = offset_y[:, None] + torch.arange(h)[None, :]  # (n, h)
        cols = torch.arange(w)[None, :].expand(n, w)
        cols = torch.where(flip[:, None], (w - 1) - cols, cols) + offset_x[:, None]  # (n, w)
        batch = torch.arange(n)[:, None, None]
        dev = x.device
        # The indexed dimensions come first in the result: (n, h, w, c).
        out = padded[batch.to(dev), :, rows[:, :, None].to(dev), cols[:, None, :].to(dev)]
        return out.permute(0, 3, 1, 2).contiguous()

"""Adaptive average pooling of each unit's token grid to its own output side (M3, TokenFLEX)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from ..tokens import VisualTokens

__all__ = ["pool_to_sides", "window_starts", "as_list", "per_unit", "square_side"]


def as_list(value) -> list:
    """A setting given once or per sample, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def per_unit(name: str, key: str, value, owner: torch.Tensor) -> list:
    """The setting ``value`` (one, or a list with one per sample of the batch) for each unit (image)."""
    per, rows = as_list(value), owner.tolist()
    if len(per) == 1:
        return per * len(rows)
    if len(per) <= max(rows, default=0):
        raise ValueError(f"{name}: {key} has {len(per)} entries but the batch has {max(rows) + 1} samples")
    return [per[o] for o in rows]


def square_side(name: str, grid) -> int:
    """The side of a square token grid (what the tower produced), or a clear error."""
    if grid is None or grid[0] != grid[1]:
        raise ValueError(f"{name} needs a square patch grid per image; these tokens come in {grid}")
    return grid[0]


def window_starts(n: int, out: int) -> list[int]:
    """First index of each of PyTorch's adaptive-pooling windows along an axis (``floor(i * n / out)``)."""
    return [(i * n) // out for i in range(out)]


def _window_sizes(n: int, out: int) -> list[int]:
    return [-((-(i + 1) * n) // out) - (i * n) // out for i in range(out)]


def pool_to_sides(tokens: VisualTokens, sides: list[int]) -> VisualTokens:
    """Pool unit ``u``'s square ``tokens.grid`` to ``sides[u] x sides[u]`` with ``F.adaptive_avg_pool2d``
    (overlapping windows on a non-divisible grid, exactly as PyTorch), in fp32, cast back. Units of one
    side are pooled together. Output: raster order of the pooled grid, ``positions`` the raster index of
    each window's first patch, ``sizes`` the window's patch count, ``mask`` ragged when sides differ."""
    if tokens.grid is None:
        raise ValueError("pooling needs each image's 2-D token grid, which the adapter did not provide")
    h, w = tokens.grid
    u, n, d = tokens.features.shape
    if n != h * w or not bool(tokens.mask.all()):
        raise ValueError(f"pooling expects every image's full {h}x{w} grid, got {n} token slots")
    k = max(sides, default=0) ** 2
    dev = tokens.features.device
    feats = tokens.features.new_zeros(u, k, d)
    positions = torch.zeros(u, k, dtype=torch.long, device=dev)
    sizes = torch.zeros(u, k, dtype=torch.float32, device=dev)
    mask = torch.zeros(u, k, dtype=torch.bool, device=dev)
    for s in sorted(set(sides)):
        rows = [i for i, v in enumerate(sides) if v == s]
        idx = torch.tensor(rows, device=dev)
        x = tokens.features[idx].float().transpose(1, 2).reshape(len(rows), d, h, w)
        pooled = F.adaptive_avg_pool2d(x, (s, s)).reshape(len(rows), d, s * s).transpose(1, 2)
        first = torch.tensor([r * w + c for r in window_starts(h, s) for c in window_starts(w, s)], device=dev)
        area = torch.tensor([a * b for a in _window_sizes(h, s) for b in _window_sizes(w, s)], dtype=torch.float32)
        feats[idx, : s * s] = pooled.to(feats.dtype)
        positions[idx, : s * s] = first
        sizes[idx, : s * s] = area.to(dev)
        mask[idx, : s * s] = True
    return replace(tokens, features=feats, mask=mask, positions=positions, sizes=sizes, frames=None, extra={})

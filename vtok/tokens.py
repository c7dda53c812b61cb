"""`VisualTokens`: the visual tokens of a batch, with the bookkeeping every method needs.

A *unit* is one image (or one frame group, one crop) whose tokens a method reduces together.
Several units may belong to one batch row (``owner``). Tensors are padded on the right inside
``VisualTokens``; ``mask`` says which slots hold a real token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

__all__ = ["VisualTokens", "gather_tokens", "seeded_generator"]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[u, idx[u, j]]`` for x of shape [U, N, ...] and idx [U, K]."""
    if x.dim() == 2:
        return x.gather(1, idx)
    shape = idx.shape + x.shape[2:]
    flat = idx.reshape(idx.shape[0], idx.shape[1], *([1] * (x.dim() - 2))).expand(shape)
    return x.gather(1, flat)


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for one draw, seeded from ``seed`` and the keys that name it (image index within
    its sample, crop...), so the draw does not depend on how samples were batched."""
    value = seed
    for k in keys:
        value = value * 1_000_003 + k
    return torch.Generator().manual_seed(value)


@dataclass
class VisualTokens:
    """Visual tokens of the units of a batch.

    Attributes:
        features: [U, N, D] token features.
        mask: [U, N] bool, True where a real token sits (ragged units are right-padded).
        positions: [U, N] long, index of each token in its unit's original token layout
            (raster index in the patch grid; merged tokens carry their destination's index).
        sizes: [U, N] float, how many original patches each token stands for.
        owner: [U] long, the batch row each unit belongs to.
        grid: (H, W) of the original patch grid of every unit, or None if unknown.
        frames: [U, N] long frame index of each token (video), or None.
        extra: adapter-specific per-token data (crop id, row...), [U, N] tensors keyed by name.
        grids: per unit, the 2-D grids its original tokens were laid out in, one after another
            (raster order inside each), e.g. ``[(h, w), (rows, cols)]`` for an AnyRes image (base image,
            then the unpadded high-resolution grid) or ``[(h, w)] * T`` for a video; None when every
            unit is one ``grid`` (one per frame when ``frames`` is set). See ``unit_grids``.
        layout: how a before_llm method's output goes into the prompt, per unit (a list) or for all
            (one value). None (default): each token at the placeholder of its ``position`` (unique
            positions; else in output order), layout tokens (LLaVA-NeXT's image newlines) kept after every
            row that keeps a token -- at most one token per placeholder. ``"sequence"``: the tokens in
            output order, as many as the method returns (more than came in too), no layout tokens. A list
            of ``(h, w)`` grids: the tokens in output order laid out as those grids, a newline token after
            every row where the model family has newlines. A unit that returns more tokens than it had
            placeholders is laid out as ``"sequence"`` unless it declares grids.
    """

    features: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    sizes: torch.Tensor
    owner: torch.Tensor
    grid: tuple[int, int] | None = None
    frames: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    grids: list | None = None
    layout: object = None

    @classmethod
    def from_features(cls, features: torch.Tensor, owner: torch.Tensor, grid=None, frames=None):
        u, n, _ = features.shape
        dev = features.device
        return cls(
            features=features,
            mask=torch.ones(u, n, dtype=torch.bool, device=dev),
            positions=torch.arange(n, device=dev).expand(u, n).clone(),
            sizes=torch.ones(u, n, dtype=torch.float32, device=dev),
            owner=owner,
            grid=grid,
            frames=frames,
        )

    @property
    def num_units(self) -> int:
        return self.features.shape[0]

    def counts(self) -> torch.Tensor:
        """Number of real tokens per unit, [U]."""
        return self.mask.sum(1)

    def image_index(self) -> list[int]:
        """Per unit, its index among the units of its batch row (the j-th image of a sample): seeded
        draws key on it, so batching does not change them."""
        seen: dict = {}
        out = []
        for o in self.owner.tolist():
            out.append(seen.get(o, 0))
            seen[o] = out[-1] + 1
        return out

    def unit_layout(self, u: int):
        """The declared ``layout`` of unit ``u`` (None, "sequence" or a list of (h, w) grids)."""
        lay = self.layout
        if isinstance(lay, list) and lay and not isinstance(lay[0], tuple):  # one entry per unit
            return lay[u]
        return lay

    def unit_grids(self) -> list[list[tuple[int, int]]]:
        """Per unit, the list of (h, w) grids of its original token layout (see ``grids``)."""
        if self.grids is not None:
            return [[tuple(g) for g in gs] for gs in self.grids]
        if self.grid is None:
            raise ValueError("these visual tokens carry no 2-D grid (the adapter did not provide one)")
        h, w = self.grid
        if self.frames is None:
            return [[(h, w)] for _ in range(self.num_units)]
        n_frames = [int(f[m].max()) + 1 if bool(m.any()) else 0 for f, m in zip(self.frames, self.mask)]
        return [[(h, w)] * t for t in n_frames]

    def _gather_all(self, idx: torch.Tensor, valid: torch.Tensor, features=None, sizes=None) -> "VisualTokens":
        g = lambda t: None if t is None else gather_tokens(t, idx)  # noqa: E731
        feats = gather_tokens(self.features if features is None else features, idx)
        feats = feats * valid.unsqueeze(-1).to(feats.dtype)
        return replace(
            self,
            features=feats,
            mask=valid,
            positions=g(self.positions),
            sizes=g(self.sizes if sizes is None else sizes) * valid.to(self.sizes.dtype),
            frames=g(self.frames),
            extra={k: g(v) for k, v in self.extra.items()},
        )

    def select(self, keep: torch.Tensor, *, features=None, sizes=None) -> "VisualTokens":
        """Keep the tokens where ``keep`` [U, N] is True, in their current order.

        ``features``/``sizes`` optionally replace the current ones before gathering (merges).
        """
        if keep.shape != self.mask.shape:
            raise ValueError(f"keep mask has shape {tuple(keep.shape)}, expected {tuple(self.mask.shape)}")
        keep = keep & self.mask
        counts = keep.sum(1)
        k = int(counts.max()) if counts.numel() else 0
        # stable order-preserving compaction: kept slots first, in index order
        n = keep.shape[1]
        order = torch.argsort((~keep).long() * n + torch.arange(n, device=keep.device), dim=1)
        idx = order[:, :k]
        valid = torch.arange(k, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)
        return self._gather_all(idx, valid, features, sizes)

    def select_indices(self, idx: list[torch.Tensor]) -> "VisualTokens":
        """Keep the given token indices per unit (any order in, original order out)."""
        keep = torch.zeros_like(self.mask)
        for u, ix in enumerate(idx):
            keep[u, ix.to(keep.device)] = True
        return self.select(keep)

    def merge(self, src: torch.Tensor, dst: torch.Tensor) -> "VisualTokens":
        """Size-weighted merge of ``src`` tokens into ``dst`` tokens ([U, r] each); sources are dropped."""
        from vtok.kernels import merge_weighted

        sizes = torch.where(self.mask, self.sizes, torch.ones_like(self.sizes))  # pad slots: no 0/0
        feats, sizes, kept = merge_weighted(self.features, sizes, src, dst)
        valid = self.mask.gather(1, kept)
        g = lambda t: None if t is None else gather_tokens(t, kept)  # noqa: E731
        return replace(
            self,
            features=feats * valid.unsqueeze(-1).to(feats.dtype),
            mask=valid,
            positions=g(self.positions),
            sizes=sizes * valid.to(sizes.dtype),
            frames=g(self.frames),
            extra={k: g(v) for k, v in self.extra.items()},
        )

"""AnyRes token layouts (LLaVA-NeXT, LLaVA-OneVision): where each token of an image or video sits.

``VisualLayout`` describes one image or video; ``parse_image`` reads it from the model's own packing of
a coordinate tensor, ``video_layout`` builds a video's; ``LayoutStore`` finds the layout of a feature
tensor the tower produced earlier (``generate``'s pre-computed features) by the tensor's identity.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["VisualLayout", "LayoutStore", "ramp", "parse_image", "video_layout", "pack_units"]


@dataclass
class VisualLayout:
    """Where the tokens of one unit (image or video) sit among its placeholders.

    n tokens, ``length`` placeholders (tokens + newlines). token_slot [n]: placeholder offset of each
    token; newline_slot [R]: placeholder offsets of the newlines; line [n]: which newline closes the
    token's row (-1: none); block/row/col/crop/patch [n] per-token bookkeeping (see
    ``LlavaNextAdapter``); frame [n] for videos; src [n]: index of the tower patch a token comes from
    (for ViT probes); vit: ViT probe statistics per token, by probe.
    """

    n: int
    length: int
    token_slot: torch.Tensor
    newline_slot: torch.Tensor
    line: torch.Tensor
    block: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    crop: torch.Tensor
    patch: torch.Tensor
    grids: list
    frame: torch.Tensor | None = None
    src: torch.Tensor | None = None
    vit: dict = field(default_factory=dict)
    #: native grids (``anyres_stages``): the image's per-crop / the video's per-frame grids before the model's
    #: packing ([crops or frames, n, D]; the projector's input for the projector stage), the model's own
    #: packing of such grids (a callable), the image size (H, W) and OneVision's ``vision_aspect_ratio``
    #: of the call; None unless a stage needs them
    native: torch.Tensor | None = None
    repack: object = None
    size: object = None
    aspect: str | None = None


class LayoutStore:
    """Layouts of feature tensors, looked up by the tensor object itself (identity, never its values).

    ``generate`` runs the vision tower before its prefill and hands the features back to the forward
    (``mm_encoder_outputs``), where the image sizes are no longer given: the adapter records each
    feature tensor's layout when the tower produces it and finds it here. Nothing is written onto the
    tensors; an entry goes when its tensor is freed (a weak reference), so a recycled ``id()`` never
    finds an old layout.
    """

    def __init__(self):
        self._items: dict[int, tuple[weakref.ref, object]] = {}

    def put(self, tensor: torch.Tensor, layout) -> None:
        key = id(tensor)
        self._items[key] = (weakref.ref(tensor, functools.partial(self._drop, key)), layout)

    def get(self, tensor):
        """The layout recorded for this very tensor, or None."""
        item = self._items.get(id(tensor))
        return item[1] if item is not None and item[0]() is tensor else None

    def _drop(self, key: int, ref: weakref.ref) -> None:
        item = self._items.get(key)
        if item is not None and item[0] is ref:
            del self._items[key]


def ramp(g: int):
    """y and x of each raster index of a g x g grid (float32)."""
    ar = torch.arange(g, dtype=torch.float32)
    return ar.repeat_interleave(g), ar.repeat(g)


def parse_image(t: torch.Tensor, n_patches: int, npw: int, g: int) -> VisualLayout:
    """The layout of one image from the model's packing of its coordinate tensor.

    ``t`` [length, 3]: what ``pack_image_features`` made of per-patch channels (real-token marker, y, x
    in the stitched crop grid), newlines marked 0; ``n_patches``: tower inputs (base + crops); ``npw``:
    crops per row; ``g``: the tower's patch grid.
    """
    length = t.shape[0]
    is_nl = t[:, 0] < 0.5
    base = g * g
    ar = torch.arange(base)
    if bool(is_nl[:base].any()):
        raise RuntimeError("unexpected image layout: a newline inside the base image grid")
    if n_patches == 1 or length == base:  # base image only (+ one closing newline), or nothing left of
        # the crops after unpadding (an extreme aspect ratio on a small patch grid)
        nl = is_nl[base:].nonzero().squeeze(1) + base
        line = torch.full((base,), 0 if nl.numel() else -1, dtype=torch.long)
        zero = torch.zeros(base, dtype=torch.long)
        return VisualLayout(
            base, length, ar, nl, line, zero, ar // g, ar % g, zero, ar.clone(), [(g, g)], src=ar.clone()
        )
    hi = t[base:]
    nl_hi = is_nl[base:].nonzero().squeeze(1)
    rows = nl_hi.numel()
    cols = (hi.shape[0] - rows) // max(rows, 1)
    expect = torch.arange(rows) * (cols + 1) + cols
    if rows == 0 or hi.shape[0] != rows * (cols + 1) or not torch.equal(nl_hi, expect):
        raise RuntimeError("unexpected image layout: the high-resolution grid is not rows of tokens + newline")
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    hi_slot = base + r * (cols + 1) + c
    tok = hi[(r * (cols + 1) + c)]
    y = tok[:, 1].round().long().clamp_min(0)
    x = tok[:, 2].round().long().clamp_min(0)
    crop = 1 + (y // g) * npw + (x // g)
    crop = crop.clamp(1, n_patches - 1)
    patch = (y % g) * g + (x % g)
    src_hi = crop * base + patch
    n = base + rows * cols
    return VisualLayout(
        n=n,
        length=length,
        token_slot=torch.cat([ar, hi_slot]),
        newline_slot=base + expect,
        line=torch.cat([torch.full((base,), -1, dtype=torch.long), r]),
        block=torch.cat([torch.zeros(base, dtype=torch.long), torch.ones(rows * cols, dtype=torch.long)]),
        row=torch.cat([ar // g, r]),
        col=torch.cat([ar % g, c]),
        crop=torch.cat([torch.zeros(base, dtype=torch.long), crop]),
        patch=torch.cat([ar, patch]),
        grids=[(g, g), (rows, cols)],
        src=torch.cat([ar, src_hi]),
    )


def video_layout(frames: int, h: int, w: int) -> VisualLayout:
    """A video of ``frames`` pooled ``h x w`` frames, frame after frame, closed by one newline."""
    per = h * w
    n = frames * per
    ar = torch.arange(n)
    frame = ar // per
    within = ar % per
    return VisualLayout(
        n=n,
        length=n + 1,
        token_slot=ar,
        newline_slot=torch.tensor([n]),
        line=torch.zeros(n, dtype=torch.long),
        block=frame,
        row=within // w,
        col=within % w,
        crop=torch.full((n,), -1, dtype=torch.long),
        patch=torch.full((n,), -1, dtype=torch.long),
        grids=[(h, w)] * frames,
        frame=frame,
        src=ar,
    )


#: the per-token fields every AnyRes / video unit carries in ``VisualTokens.extra``
UNIT_FIELDS = ("crop", "block", "row", "col", "patch")


def pack_units(like: torch.Tensor, rows, owner, grids):
    """``VisualTokens`` with one unit per entry of ``rows``, padded to the longest: each entry is (features
    [k, D], {field: LongTensor[k]} for every ``UNIT_FIELDS``, frame LongTensor[k] or None for an image).
    ``like`` gives the dtype and device, ``owner`` the sample of each unit, ``grids`` each unit's grids."""
    from vtok.tokens import VisualTokens

    dev = like.device
    u, n = len(rows), max(f.shape[0] for f, _, _ in rows)
    feats = like.new_zeros(u, n, like.shape[-1])
    mask = torch.zeros(u, n, dtype=torch.bool, device=dev)
    longs = {k: torch.zeros(u, n, dtype=torch.long, device=dev) for k in UNIT_FIELDS + ("frame",)}
    for i, (f, fields, frame) in enumerate(rows):
        k = f.shape[0]
        feats[i, :k] = f.to(dev, like.dtype)
        mask[i, :k] = True
        for name in UNIT_FIELDS:
            longs[name][i, :k] = fields[name].to(dev)
        if frame is not None:
            longs["frame"][i, :k] = frame.to(dev)
    flat = {tuple(gr) for gs in grids for gr in gs}
    return VisualTokens(
        features=feats,
        mask=mask,
        positions=torch.arange(n, device=dev).expand(u, n) * mask,
        sizes=mask.float(),
        owner=torch.tensor(list(owner), dtype=torch.long, device=dev),
        grid=next(iter(flat)) if len(flat) == 1 else None,
        frames=longs["frame"] if any(fr is not None for _, _, fr in rows) else None,
        extra={k: longs[k] for k in UNIT_FIELDS},
        grids=grids,
    )

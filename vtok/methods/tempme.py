"""`tempme`: TempMe (ICLR 2025, arXiv 2409.01156) -- progressive temporal token merging inside a CLIP-style
ViT for text-video retrieval: merges within each frame, then across neighbouring frames grouped into clips;
only the frames' class tokens are read out. Trainable: LoRA on every block's q/k/v and the clip position
tables (PEFT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..method import Method, hparam, register
from ..vit import ViTMerge, regroup_index
from .tome import bipartite_soft_matching, tome_order

__all__ = ["TempMe", "video_embeddings", "info_nce"]


class _LoRA(nn.Module):
    """Rank-r update of a packed q|k|v projection: ``x A^T B^T`` (A Kaiming-uniform, B zero: no change untrained)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, width))
        self.B = nn.Parameter(torch.zeros(3 * width, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))


def _match(metric: torch.Tensor, r: int, protected: int) -> ViTMerge | None:
    """ToMe's bipartite matching with the prefix protected; TempMe's output order [prefix, unmerged A, B]."""
    src, dst, unm = bipartite_soft_matching(metric, r, protected)
    if src.shape[1] == 0:
        return None
    return ViTMerge(src, dst, order=tome_order(unm, metric.shape[1], protected))


@register
@dataclass
class TempMe(Method):
    """TempMe (Shen et al., ICLR 2025): progressive temporal merging of neighbouring frames in the vision tower.

    Written from the paper and the method spec. Frames of a video are consecutive batch rows (the OneVision
    adapter knows its videos; for a standalone encoder: ``with handle.context(frames=[12, 12]):``). Blocks:

    * ImgMe (every block before the clip blocks): after attention, ``img_r`` tokens of each frame merge (ToMe's
      bipartite matching on the head-averaged keys, prefix tokens protected, output [prefix, unmerged A, B]).
    * ClipMe (the ``len(merge_frames)`` blocks before the last one: 8, 9, 10 of 12): at the block's input every
      ``f`` neighbouring clips (``merge_frames``: 2, 2, 3) become one row with all class tokens first; a learned
      temporal position table (one row per clip entering the block: 12, 6, 3; zero-initialised) is added to
      every token of a clip, class tokens included (the paper says "added to the tokens"; vtok adds it to all of
      a clip's tokens), then ``min(int(clip_ratio * f * n), f * (n - prefix) // 2)`` tokens merge across the
      clips, matched on the block's input states (before the position add); after attention
      ``min(int(intra_ratio * N), (N - prefix) // 2)`` more merge within the new clip (keys).
    * the last block: ``int(last_ratio * N)`` tokens merge (keys).

    Sizes are tracked and proportional attention adds ``log(size)`` to every key's logit. With 12 frames of
    ViT-B/32 (50 tokens) this gives 34 tokens per frame after ImgMe and 97 per video at the end (of 600).
    Only the class tokens matter at the output: :func:`video_embeddings` normalises every frame's (through the
    tower's own head), averages them over the video and normalises again; :func:`info_nce` is the symmetric
    contrastive loss.

    Choices where the paper is silent or the tower differs: a video longer than ``frames`` is cut into windows
    of ``frames`` frames (TempMe resamples every video to 12); its frame count must be a multiple of
    ``frames``. A single image (a batch row of its own) is a one-frame video: ImgMe, then each ClipMe block's
    merges within the image (no position table). A tower shallower than ``len(merge_frames) + 1`` blocks keeps
    the first ClipMe blocks that fit. LoRA (rank ``lora_rank``) goes on the packed q|k|v of every vision block
    reaching the output, and, attached to a whole open_clip CLIP model, of every text block too (the paper's
    PEFT: 0.50 M at ViT-B shapes); a bare vision tower gets the vision side only. On ``nn.MultiheadAttention`` blocks the keys that matching reads come from the frozen
    projection (vtok computes them itself); elsewhere they include the update.
    """

    name = "tempme"
    stages = ("in_vit",)
    noop = None  # a merge of fixed fractions at every block; img_r=0 alone still merges in the clip blocks
    example = {"frames": 4, "merge_frames": (2, 2), "img_r": 1}
    paper = "ViT-B/32, 12 frames: r=2 in blocks 0-7, clips of 2, 2, 3 frames in blocks 8-10 (30% / 10%), 10% in 11"
    prop_attn = True
    protect_cls = True

    frames: int = hparam(12, "frames per video (window) the clip position tables are sized for", type=int, range="[1, inf)")
    img_r: int = hparam(2, "tokens merged per frame in each ImgMe block", type=int, range="[0, inf)")
    merge_frames: tuple = hparam((2, 2, 3), "clips concatenated at the input of each ClipMe block", type=tuple)
    clip_ratio: float = hparam(0.30, "share of a concatenated row merged across clips", type=float, range="[0, 1)")
    intra_ratio: float = hparam(0.10, "share merged within the new clip after attention", type=float, range="[0, 1)")
    last_ratio: float = hparam(0.10, "share merged in the last block", type=float, range="[0, 1)")
    frame_pos: bool = hparam(True, "learned clip position tables added before the cross-clip merge", type=bool)
    lora_rank: int = hparam(8, "rank of the q/k/v LoRA of every block (0: none)", type=int, range="[0, inf)")

    nearest_budget = True

    # budgets (comparisons on images: a single image is a one-frame video) --------------------------
    @classmethod
    def single_image_tokens(cls, patches: int, blocks: int, prefix: int = 1, **settings) -> int:
        """Patches (prefix excluded) that leave a ``blocks``-block tower for one image of ``patches`` patches and
        ``prefix`` class tokens, at ``settings`` (the defaults otherwise): the merges of ``in_vit_pre`` and
        ``in_vit`` counted as they run (every merge at most half of the unprotected tokens)."""
        m = cls(**settings)
        clip, _ = m._blocks(blocks)
        n, p = patches + prefix, prefix
        for b in range(blocks):
            if b in clip:
                n -= min(int(m.clip_ratio * n), (n - p) // 2)
                n -= min(int(m.intra_ratio * n), (n - p) // 2)
            elif b == blocks - 1:
                n -= min(int(m.last_ratio * n), (n - p) // 2)
            else:
                n -= min(m.img_r, (n - p) // 2)
        return n - p

    @classmethod
    def _budget_setting(cls, budget: float, context) -> tuple[dict, int]:
        """The ``clip_ratio`` (and, only if that cannot reach it, a smaller ``img_r``) whose single-image count is
        nearest ``budget``, the other shares at the paper's."""
        target = round(budget * context.visual_tokens)
        best = None
        for img_r in (2, 1, 0):
            for c in range(100):
                hp = {"clip_ratio": c / 100} | ({} if img_r == 2 else {"img_r": img_r})
                got = cls.single_image_tokens(context.visual_tokens, context.vit_blocks, context.prefix_tokens, **hp)
                key = (abs(got - target), 2 - img_r, abs(c - 30))
                if best is None or key < best[0]:
                    best = (key, hp, got)
        return best[1], best[2]

    @classmethod
    def settings_for_budget(cls, budget: float, context) -> dict:
        """On images: the setting of ``_budget_setting`` (TempMe's fixed shares reach a few counts only)."""
        return cls._budget_setting(budget, context)[0]

    @classmethod
    def snap_budget(cls, budget: float, context) -> float:
        return cls._budget_setting(budget, context)[1] / context.visual_tokens

    def validate(self) -> None:
        fs = tuple(int(f) for f in self.merge_frames)
        if any(f < 1 for f in fs):
            raise ValueError(f"tempme: merge_frames={self.merge_frames} must be positive clip counts")
        if self.frames % math.prod(fs):
            raise ValueError(
                f"tempme: frames={self.frames} must be divisible by the product of merge_frames={fs} (the clips of "
                "every ClipMe block must pair up)"
            )

    # where things happen ------------------------------------------------------------------
    def _blocks(self, num_blocks: int) -> tuple[list[int], list[int]]:
        """(ClipMe blocks, their clip counts) for a tower of ``num_blocks`` blocks reaching the output."""
        k = len(self.merge_frames)
        first = max(0, num_blocks - 1 - k)
        clip = list(range(first, num_blocks - 1))
        return clip, [int(f) for f in self.merge_frames[: len(clip)]]

    def bind(self, dims: dict) -> None:
        super().bind(dims)
        blocks = dims.get("vit_feature_block")
        n = dims.get("vit_blocks") if blocks is None else blocks + 1
        self._n_blocks = int(n) if n else None

    def vit_schedule(self, num_blocks: int) -> list[int]:
        self._n_blocks = num_blocks
        clip, _ = self._blocks(num_blocks)
        # clip and last blocks merge a share of what reaches them (computed in in_vit); 1 marks them as merging
        return [1 if (i in clip or i == num_blocks - 1) else self.img_r for i in range(num_blocks)]

    # modules ------------------------------------------------------------------------------
    def build(self, dims: dict, parts: dict) -> dict | None:
        width, blocks = dims.get("vision_hidden"), dims.get("vit_blocks")
        if not width or not blocks:
            return None
        n = blocks if dims.get("vit_feature_block") is None else dims["vit_feature_block"] + 1
        mods: dict = {}
        if self.lora_rank:
            mods["lora"] = nn.ModuleList(_LoRA(width, self.lora_rank) for _ in range(n))
            if dims.get("text_hidden"):  # a whole CLIP model: its text tower's blocks too (the paper's PEFT)
                mods["text_lora"] = nn.ModuleList(
                    _LoRA(int(dims["text_hidden"]), self.lora_rank) for _ in range(int(dims["text_blocks"]))
                )
        if self.frame_pos:
            _, fs = self._blocks(n)
            sizes, clips = [], self.frames
            for f in fs:
                sizes.append(clips)
                clips //= f
            mods["pos"] = nn.ParameterList(nn.Parameter(torch.zeros(c, width)) for c in sizes)
        return mods or None

    def _lora(self, key: str, block: int):
        mods = getattr(self, "modules", None)
        if mods is None or key not in mods or block >= len(mods[key]):
            return None
        return mods[key][block].A, mods[key][block].B

    def qkv_lora(self, block: int):
        """(A, B) of the vision tower's block ``block`` (None: no update there)."""
        return self._lora("lora", block)

    def text_qkv_lora(self, block: int):
        """(A, B) of the text tower's block ``block`` (a whole open_clip CLIP model)."""
        return self._lora("text_lora", block)

    # windows ------------------------------------------------------------------------------
    def _windows(self, view) -> torch.Tensor:
        """[rows] the window of each row (a video's frames cut into windows of ``frames`` frames), or None when
        every row is an image of its own."""
        g = view.groups.cpu()
        fpr = view.frames_per_row.cpu()
        sizes = torch.zeros(int(g.max()) + 1, dtype=torch.long).index_add_(0, g, fpr)
        if bool((sizes == 1).all()):
            return None
        if bool((sizes == 1).any()):
            raise ValueError("tempme: a batch mixes single images and videos; run them in separate calls")
        if bool((sizes % self.frames).any()):
            raise ValueError(
                f"tempme: videos of {sizes.tolist()} frames, but its clip position tables are for windows of "
                f"{self.frames} frames; sample a multiple of {self.frames} frames (vtok.video.load(path, "
                f"num_frames={self.frames})) or set frames="
            )
        start = torch.cumsum(fpr, 0) - fpr  # first frame of each row, counted over the batch
        first = torch.zeros_like(sizes)
        first[1:] = torch.cumsum(sizes, 0)[:-1]
        frame_in_video = start - first[g]
        return g * (int(sizes.max()) // self.frames + 1) + frame_in_video // self.frames

    # the merges ---------------------------------------------------------------------------
    def in_vit_pre(self, view):
        clip, fs = self._blocks(self._n_blocks)
        if view.block not in clip:
            return None
        k = clip.index(view.block)
        f = fs[k]
        windows = self._windows(view)
        if windows is None:  # single images: the block's cross-clip merge within each image
            f = 1
        if windows is not None:  # clips never span two windows
            view = replace(view, groups=windows)
        v = view.regrouped(f)
        n = view.x.shape[1]
        m0 = min(int(self.clip_ratio * f * n), f * (n - view.protected) // 2)
        plan = _match(v.metric, m0, v.protected)
        add = self._positions(view, v, k, f) if windows is not None and self.frame_pos else None
        if plan is None:
            plan = ViTMerge(torch.zeros(v.x.shape[0], 0, dtype=torch.long, device=v.x.device),
                            torch.zeros(v.x.shape[0], 0, dtype=torch.long, device=v.x.device))
        plan.regroup, plan.add = f, add
        return plan

    def _positions(self, view, v, k: int, f: int) -> torch.Tensor | None:
        mods = getattr(self, "modules", None)
        if mods is None or "pos" not in mods:
            return None
        table = mods["pos"][k]
        b, n = view.x.shape[:2]
        g = view.groups.cpu()
        rank = torch.arange(b) - torch.searchsorted(g, g)  # row within its window (windows are contiguous)
        if int(rank.max()) >= table.shape[0]:
            raise ValueError(f"tempme: {int(rank.max()) + 1} clips enter block {view.block}, its table has {table.shape[0]}")
        slot = torch.empty(f * n, dtype=torch.long)  # which of the f clips each token of a new row came from
        slot[regroup_index(n, f, view.protected)] = torch.arange(f).unsqueeze(1).expand(f, n)
        clip_of = rank[::f].unsqueeze(1) + slot.unsqueeze(0)  # [rows', f*n] clip index within the window
        return table[clip_of.to(table.device)].to(v.x.dtype)

    def in_vit(self, view):
        clip, _ = self._blocks(self._n_blocks)
        n, p = view.x.shape[1], view.protected
        if view.block in clip:
            r = min(int(self.intra_ratio * n), (n - p) // 2)
        elif view.block == self._n_blocks - 1:
            r = int(self.last_ratio * n)
        else:
            r = view.budget
        return _match(view.metric, r, p)

    def overhead_flops(self, event, spec, units=None) -> int:
        """The matching scores (|A| x |B| dot products on the metric: the hidden states at a block's input, the
        head-averaged keys before the MLP) and the key projection vtok computes for nn.MultiheadAttention."""
        v = spec.vision
        t = 0
        for n, _ in units or []:
            width = v.stack.hidden if event.point == "attn" else v.stack.head_dim
            t += 2 * (n // 2) * (n // 2) * width
            if event.point == "mlp" and v.mha_keys:
                t += 2 * n * v.stack.hidden * v.stack.hidden
        return t


    def tower_flops(self, spec, blocks) -> int:
        """The LoRA of every block: ``x A^T`` once per token and ``(A x) B^T`` for q, k and v; on
        ``nn.MultiheadAttention`` the packed update ``B A`` once per block instead (its projection then runs on
        the updated weight at the cost the model already has). ``blocks``: per block, (attention, MLP) tokens
        of every tower row."""
        if not self.lora_rank:
            return 0
        v = spec.vision
        c, r = v.stack.hidden, self.lora_rank
        active = getattr(self, "_n_blocks", None)
        n = len(blocks) if active is None else min(len(blocks), active)
        if v.mha_keys:
            return n * 2 * 3 * c * r * c
        return sum(na * (2 * c * r + 2 * r * 3 * c) for blk in blocks[:n] for na, _ in blk)

def video_embeddings(handle) -> torch.Tensor:
    """[videos, D]: TempMe's video vector from the encoder call that just ran under ``handle`` (this thread):
    every frame's class token through the tower's own head (``handle.adapter.class_head``), L2-normalised,
    averaged over the video's frames, normalised again. Videos as given to ``handle.context(frames=...)``."""
    adapter = handle.adapter
    cls = adapter.frame_class_tokens()  # list per video: [frames, C]
    return F.normalize(torch.stack([F.normalize(adapter.class_head(c), dim=-1).mean(0) for c in cls]), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of two normalised embedding sets (CLIP's loss)."""
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

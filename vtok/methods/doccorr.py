"""`doccorr`: token-level correlation-guided compression of document images, per AnyRes crop (before the LLM).

Per crop: pattern repetitiveness from key correlation (``ViTKeyCorrelation``) -> information density
(``crop_density``) -> its share of the budget (``allocate``); inside it, CLS-attention outliers (``iqr_outliers``),
then sampling by attention (``gumbel_top``); dropped tokens fold into their nearest kept one (``fold_into_kept``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..method import POSITION_POLICIES, Method, ViTAttention, ViTKeyCorrelation, allocate, hparam, keep_count, register
from ..tokens import VisualTokens, seeded_generator


# ----------------------------------------------------------------------------------- the math


def crop_density(dup_share: torch.Tensor, max_share: float) -> float:
    """Information density of one crop: 1 - the share of its tokens that are redundant (more than
    ``max_share`` of the crop's other patches are near-duplicates of them by key cosine)."""
    if dup_share.numel() == 0:
        return 0.0
    return 1.0 - float((dup_share > max_share).float().mean())


def iqr_outliers(score: torch.Tensor, mult: float) -> torch.Tensor:
    """Indices of the upper IQR outliers ``score > Q3 + mult * (Q3 - Q1)`` (the PruMerge rule),
    highest score first (ties: lower index)."""
    if score.numel() < 4:
        return score.new_zeros(0, dtype=torch.long)
    s = score.float()
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype, device=s.device))
    idx = (s > q3 + mult * (q3 - q1)).nonzero().squeeze(1)
    return idx[_order_desc(s[idx])]


def _order_desc(values: torch.Tensor) -> torch.Tensor:
    """Order of ``values`` from the highest, ties by position (a stable sort)."""
    return torch.sort(-values.double(), stable=True).indices


def gumbel_top(weights: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """``k`` indices drawn without replacement with probability proportional to ``weights`` (Gumbel-top-k:
    the same law as sequential draws); ``generator`` None: the ``k`` largest weights (deterministic)."""
    if k <= 0:
        return weights.new_zeros(0, dtype=torch.long)
    logw = torch.log(weights.double().clamp_min(1e-30)).cpu()
    if generator is not None:
        u = torch.rand(logw.shape, generator=generator, dtype=torch.float64).clamp(1e-300, 1.0 - 1e-16)
        logw = logw - torch.log(-torch.log(u))
    return _order_desc(logw)[:k].to(weights.device)


def fold_into_kept(x: torch.Tensor, sizes: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor):
    """Each dropped token joins its most cosine-similar kept token; kept tokens become the size-weighted
    mean of themselves and their members. x [n, D], sizes [n]; returns the kept rows' features and sizes."""
    xk, sk = x[kept].float(), sizes[kept].float()
    if dropped.numel() == 0 or kept.numel() == 0:
        return xk, sk
    xd, sd = x[dropped].float(), sizes[dropped].float()
    sim = torch.nn.functional.normalize(xd, dim=-1) @ torch.nn.functional.normalize(xk, dim=-1).T
    dst = sim.argmax(1)  # ties: the first kept token
    acc = (xk * sk[:, None]).index_add(0, dst, xd * sd[:, None])
    tot = sk.index_add(0, dst, sd)
    return acc / tot[:, None], tot


# ----------------------------------------------------------------------------------- the method


@register
@dataclass
class DocCorr(Method):
    """Per-crop budgets from pattern repetitiveness (key correlation); CLS outliers + attention sampling inside a crop; dropped tokens folded in.

    For each crop of an image (an AnyRes crop or the base image, i.e. each value of
    ``extra["crop"]``; a video frame; the whole image for LLaVA-1.5), in its tower's block ``key_layer``:
    a patch is redundant when more than ``dup_share`` of its crop's other patches have key cosine >
    ``sim_threshold`` with it; the crop's density is 1 - its redundant share. Budget: ``retain`` of the
    image's visual tokens (newlines not counted) split over its crops in proportion to density x crop
    size (each crop keeps >= 1 token, none more than it has); ``budget="density"``: each crop keeps
    ceil(density x its size) instead (the paper's own rule, a variable total). Inside a crop: the upper IQR
    outliers (``iqr_mult``) of the CLS attention at block ``cls_layer`` ("global" tokens, highest first
    if there are more than the budget), then the rest of the budget drawn without replacement with
    probability proportional to the CLS attention at block ``sample_layer`` ("local" tokens; seeded
    Gumbel-top-k, batch independent; ``sample=False``: the top scores). Dropped tokens go to their most
    cosine-similar kept token of the same crop (projected features) and kept tokens become the
    size-weighted mean (``merge=False``: plain drop). Kept tokens stay in the model's order.

    Choices where the paper (no code released) is silent: keys are all heads concatenated; the CLS layer
    defaults to the block that produces the features the LLM takes, the key layer to half and the sampling
    layer to a quarter of that depth. Key layer and ``dup_share`` were set on real pages (offline DINOv2-S
    in LLaVA-NeXT, 3 x 2 crops of an A4 page): there, deep keys share one dominant direction (cosine > 0.9
    between most patches of any crop, text or blank), so the spec's suggestion (penultimate block, > 5%
    near-duplicates) marks every patch redundant; at half depth with > 30% near-duplicates blank crops
    are 80-88% redundant and text crops 0-47%; the base image of an AnyRes image is compressed like a crop
    (not left intact), so ``retain`` is a share of all the image's tokens; towers without CLS (SigLIP)
    use the attention each token receives, averaged over all queries (``ViTAttention(kind="colmean")``)
    instead of the CLS row, at both layers; redundancy counts a crop's full tower grid (before
    LLaVA-NeXT's unpadding); the fold uses the projected features, not the keys.
    """

    name = "doccorr"
    stages = ("before_llm",)
    noop = {"retain": 1.0}
    example = {"retain": 0.5}
    needs_scores = True
    paper = "no published values: budget ceil(density x crop tokens), key similarity 0.9, IQR 1.5, deep layer = penultimate (spec suggestions)"

    retain: float = hparam(
        0.25, "fraction of each image's visual tokens kept, split over its crops by density x size", type=float,
        range="(0, 1]",
    )
    budget: str = hparam(
        "retain", "'retain': the image keeps `retain` of its tokens; 'density': each crop keeps ceil(density x its "
        "tokens), the paper's variable total (retain is ignored)", choices=("retain", "density"),
    )  # fmt: skip
    sim_threshold: float = hparam(0.9, "key cosine above which two patches count as near-duplicates", type=float, range="[-1, 1)")
    dup_share: float = hparam(
        0.3, "a patch is redundant when more than this share of its crop's other patches are its near-duplicates",
        type=float, range="[0, 1)",
    )  # fmt: skip
    iqr_mult: float = hparam(1.5, "CLS-attention outliers: score > Q3 + iqr_mult * (Q3 - Q1)", type=float, range="[0, inf)")
    key_layer: int | None = hparam(None, "tower block of the keys (None: half the depth of the feature block)", type=int)
    cls_layer: int | None = hparam(None, "tower block of the global (CLS) scores (None: the block producing the "
                                   "LLM's features)", type=int)
    sample_layer: int | None = hparam(
        None, "tower block of the sampling scores (None: a quarter of the feature block's depth)", type=int
    )
    sample: bool = hparam(True, "draw the local tokens at random (seeded); False: take the top scores", type=bool)
    merge: bool = hparam(True, "fold dropped tokens into their most similar kept token (size-weighted)", type=bool)
    seed: int = hparam(0, "seed of the sampling; image j of a sample, crop c draws from (seed, j, c)", type=int, range="[0, 9e12]")
    position_policy: str = hparam(
        "compact", "'compact' renumbers RoPE positions, 'keep' keeps the original ones", choices=POSITION_POLICIES
    )

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        if self.budget == "density":
            raise ValueError("doccorr with budget='density' keeps a content-dependent number of tokens; pass reductions=")
        return super().token_schedule(visual_tokens, units)

    # layers and probes ---------------------------------------------------------------------
    def _layers(self) -> tuple[int, int, int]:
        d = self.dims
        fb = d.get("vit_feature_block")
        if fb is None:
            fb = max(0, int(d.get("vit_blocks", 2)) - 2) if d else -2
        key = (fb + 1) // 2 if self.key_layer is None else self.key_layer
        cls_ = fb if self.cls_layer is None else self.cls_layer
        samp = (fb // 4 if fb >= 0 else 0) if self.sample_layer is None else self.sample_layer
        return key, cls_, samp

    def _score_kind(self) -> str:
        return "cls" if self.dims.get("vision_cls", True) else "colmean"

    def probes(self):
        key, cls_, samp = self._layers()
        kind = self._score_kind()
        return [
            ViTKeyCorrelation(layer=key, threshold=self.sim_threshold),
            ViTAttention(layer=cls_, kind=kind),
            ViTAttention(layer=samp, kind=kind),
        ]

    # the stage -------------------------------------------------------------------------------
    def _groups(self, tokens: VisualTokens, u: int, valid: torch.Tensor) -> list[torch.Tensor]:
        """Slot indices of each crop (or frame) of unit ``u``, in order of first appearance."""
        gid = torch.zeros_like(valid)
        crop = tokens.extra.get("crop")
        if crop is not None:
            gid = crop[u, valid].clone()
        if tokens.frames is not None:
            gid = gid * (int(tokens.frames[u, valid].max()) + 1) + tokens.frames[u, valid]
        uniq, inv = torch.unique(gid, return_inverse=True)
        first = torch.full((uniq.numel(),), valid.numel(), dtype=torch.long, device=valid.device)
        first.scatter_reduce_(0, inv, torch.arange(valid.numel(), device=valid.device), "amin")
        return [valid[inv == g] for g in torch.argsort(first).tolist()]

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        if self.budget == "retain" and self.retain >= 1.0:
            return tokens
        p_key, p_cls, p_samp = self.probes()
        dup, gscore, lscore = probes[p_key], probes[p_cls], probes[p_samp]
        keep = torch.zeros_like(tokens.mask)
        feats = tokens.features.clone() if self.merge else None
        sizes = tokens.sizes.clone() if self.merge else None
        for u, j in enumerate(tokens.image_index()):
            valid = tokens.mask[u].nonzero().squeeze(1)
            if valid.numel() == 0:
                continue
            groups = self._groups(tokens, u, valid)
            dens = [crop_density(dup[u, g].float(), self.dup_share) for g in groups]
            n = [int(g.numel()) for g in groups]
            if self.budget == "density":
                budget = [max(1, math.ceil(d * m - 1e-9)) for d, m in zip(dens, n)]
            else:
                budget = allocate(keep_count(valid.numel(), self.retain), n, [d * m for d, m in zip(dens, n)])
            for c, (g, k) in enumerate(zip(groups, budget)):
                if k >= g.numel():
                    keep[u, g] = True
                    continue
                glob = iqr_outliers(gscore[u, g], self.iqr_mult)[:k]
                rest = torch.ones(g.numel(), dtype=torch.bool, device=g.device)
                rest[glob] = False
                cand = rest.nonzero().squeeze(1)
                gen = seeded_generator(self.seed, j, c) if self.sample else None
                local = cand[gumbel_top(lscore[u, g[cand]].float(), k - glob.numel(), gen)]
                chosen = torch.cat([glob, local])
                keep[u, g[chosen]] = True
                if self.merge:
                    kept = torch.sort(g[chosen]).values
                    dropped = g[~torch.isin(g, kept)]
                    f, s = fold_into_kept(tokens.features[u], tokens.sizes[u], kept, dropped)
                    feats[u, kept] = f.to(feats.dtype)
                    sizes[u, kept] = s.to(sizes.dtype)
        return tokens.select(keep, features=feats, sizes=sizes)

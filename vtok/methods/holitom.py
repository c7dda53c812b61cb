"""`holitom`: HoliTom (NeurIPS 2025, arXiv 2505.21334) -- holistic token merging for video LLMs.

Outside the LLM: global temporal segmentation of the video by dynamic programming over adjacent-frame
similarity, one token per static position of a segment (merged by DPC-kNN), attention top-k of the dynamic
tokens per frame. Inside the LLM at layer K: half of the visual tokens merge into their most similar kept
token. Pure functions (``adjacent_similarity``, ``window_gain``, ``segment_frames``, ``dpc_knn_merge``,
``halving_merge``) and the method (``HoliTom``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..method import (
    LLMAttention,
    LLMStep,
    LLMView,
    Method,
    ViTAttention,
    hparam,
    keep_count,
    per_thread,
    register,
)
from ..tokens import VisualTokens
from .clips import Clip, Piece, assemble, clips

__all__ = [
    "HoliTom",
    "adjacent_similarity",
    "best_partition_brute_force",
    "dpc_knn_merge",
    "halving_merge",
    "halving_merge_loop",
    "segment_frames",
    "window_gain",
]  # fmt: skip

#: the paper's inner layer: 18 of LLaVA-OneVision-7B's 28 decoder layers
PAPER_INNER_LAYER, PAPER_DEPTH = 18, 28


# ------------------------------------------------------------------ temporal segmentation


def adjacent_similarity(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, N, D] -> [T-1, N] fp32 cosine similarity of each position between frames t and t+1."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return (x[:-1] * x[1:]).sum(-1).clamp(-1.0, 1.0)


def window_gain(static: torch.Tensor) -> torch.Tensor:
    """``static`` [T-1, N] bool (position p unchanged from frame t to t+1) -> ``G`` [T, T] fp32 with
    ``G[i, j] = (j - i) * #positions static over every pair of [i, j]`` for i < j, else 0: the tokens a
    segment [i, j] saves by keeping one copy per static position. From run lengths, no T x T x N tensor."""
    t = static.shape[0] + 1
    run = torch.zeros(t, static.shape[1], dtype=torch.long, device=static.device)  # run[i, p]: static pairs from i
    for i in range(t - 2, -1, -1):
        run[i] = static[i].long() * (run[i + 1] + 1)
    hist = torch.zeros(t, t + 1, dtype=torch.float32, device=static.device)
    hist.scatter_add_(1, run, torch.ones_like(run, dtype=torch.float32))
    at_least = hist.flip(1).cumsum(1).flip(1)  # at_least[i, L] = #p with run[i, p] >= L
    ar = torch.arange(t, device=static.device)
    span = (ar.unsqueeze(0) - ar.unsqueeze(1)).clamp_min(0)  # j - i
    return torch.where(span > 0, span * at_least.gather(1, span), torch.zeros((), device=static.device))


def segment_frames(gain: torch.Tensor, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """The partition of frames 0..T-1 into segments (at most ``max_window`` frames each) that maximises the
    summed ``gain`` (``window_gain``): dynamic programming on the CPU over the T x T table (one transfer).
    Returns the segments [(first, last)] in order and the tokens they save. Ties keep the shorter segment."""
    g = gain.detach().cpu().double()
    t = g.shape[0]
    best = [0.0] * (t + 1)  # best[j + 1]: frames 0..j
    start = [0] * t
    for j in range(t):
        best[j + 1], start[j] = best[j], j  # frame j alone
        for length in range(2, min(j + 1, max_window) + 1):
            i = j - length + 1
            v = best[i] + float(g[i, j])
            if v > best[j + 1]:
                best[j + 1], start[j] = v, i
    segs, j = [], t - 1
    while j >= 0:
        segs.append((start[j], j))
        j = start[j] - 1
    return segs[::-1], best[t]


def best_partition_brute_force(gain: torch.Tensor, max_window: int) -> float:
    """The best summed gain over every partition into segments of at most ``max_window`` frames, by
    enumeration (2^(T-1) partitions; for checking ``segment_frames`` on small T)."""
    t = gain.shape[0]
    best = 0.0
    for cuts in range(1 << max(t - 1, 0)):
        total, i, ok = 0.0, 0, True
        for j in range(t):
            if j == t - 1 or cuts >> j & 1:
                ok &= j - i + 1 <= max_window
                total += float(gain[i, j]) if j > i else 0.0
                i = j + 1
        if ok:
            best = max(best, total)
    return best


# ------------------------------------------------------------------ merging


def _rank_desc(score: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties to the lower index."""
    return torch.sort(-score, stable=True).indices


def dpc_knn_merge(x: torch.Tensor, c: int, knn: int, beta: float):
    """DPC-kNN clustering of ``x`` [n, D] into ``c`` centres and the merge of every other token into its
    nearest centre. Returns (centre indices [c] ascending, merged [c, D] fp32, members per centre [c]).

    fp32 distances ``d = |xi - xj| / sqrt(D)``; density ``exp(-mean d^2 over the k = min(knn, c, n)
    nearest, self included)``; ``delta`` = distance to the nearest denser token (density ties: the lower
    index counts as denser, instead of the official random jitter), the densest gets the largest distance;
    centres = top-c of density x delta. A centre with members becomes ``beta * centre + (1 - beta) *
    mean(members)``, one without stays as it is."""
    n, d = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(d)
    k = max(1, min(knn, c, n))
    rho = torch.exp(-dist.topk(k, dim=1, largest=False).values.square().mean(1))
    ar = torch.arange(n, device=x.device)
    denser = (rho.unsqueeze(0) > rho.unsqueeze(1)) | ((rho.unsqueeze(0) == rho.unsqueeze(1)) & (ar.unsqueeze(0) < ar.unsqueeze(1)))
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).min(1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = _rank_desc(rho * delta)[:c].sort().values
    assign = dist[:, centres].argmin(1)  # ties: the lower centre
    is_centre = torch.zeros(n, dtype=torch.bool, device=x.device)
    is_centre[centres] = True
    assign = torch.where(is_centre, -1, assign)
    members = torch.zeros(c, device=x.device).index_add_(0, assign[~is_centre], torch.ones(int((~is_centre).sum()), device=x.device))
    total = torch.zeros(c, d, device=x.device).index_add_(0, assign[~is_centre], xf[~is_centre])
    centre_x = xf[centres]
    mean = total / members.clamp_min(1).unsqueeze(1)
    merged = torch.where(members.unsqueeze(1) > 0, beta * centre_x + (1 - beta) * mean, centre_x)
    return centres, merged, members


def halving_merge(h: torch.Tensor, kept: torch.Tensor, dest: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """HoliTom's inner merge in closed form: dropped tokens (``dropped`` ascending, each into ``kept[dest]``)
    are averaged one after another into their destination (``h[t] <- (h[t] + h[n]) / 2``). A kept token with
    members n_1..n_m ends as ``2^-m h_t + sum_j 2^-(m-j+1) h_{n_j}``: one scatter-add. ``h`` [L, D]."""
    hf = h.float()
    one = torch.nn.functional.one_hot(dest, kept.numel()).float()  # [n_drop, K]
    rank = (one.cumsum(0) * one).sum(1)  # j: the member's place among its destination's members (1-based)
    m = one.sum(0)  # members per kept token
    w = torch.pow(2.0, -(m[dest] - rank + 1))
    out = hf[kept] * torch.pow(2.0, -m).unsqueeze(1)
    return out.index_add(0, dest, hf[dropped] * w.unsqueeze(1))


def halving_merge_loop(h: torch.Tensor, kept: torch.Tensor, dest: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The official sequential form of ``halving_merge`` (for checking it)."""
    out = h.float().clone()
    for n, t in zip(dropped.tolist(), dest.tolist()):
        out[kept[t]] = (out[kept[t]] + out[n]) / 2
    return out[kept]


# ------------------------------------------------------------------ the method


@register
@dataclass
class HoliTom(Method):
    """HoliTom: temporal segments, static tokens merged once per segment, dynamic tokens by ViT attention, and a merge inside the LLM.

    ``retain`` is the share of a video's tokens that enters the LLM (all frames together); the stage
    rescales it to ``retain / (share left after removing static copies)`` for what is left. The inner merge
    at layer K then halves the visual tokens (``inner_drop``). Images (and an AnyRes image's grids) have no
    time: attention top-k at ``retain``. With ``images_as_frames`` the images of one prompt are a video
    (LLaVA-1.5 and the demo VLM take a video as one image per frame). Choices where the paper is silent:
    ties by index instead of random jitter; a segment's static region keeps >= 1 token; the ViT probe is the
    received attention of the tower's feature layer; on OneVision a video's tokens are laid out as
    the official non-grid mode (per segment: static tokens, then each frame's dynamic ones; one newline).
    """

    name = "holitom"
    last_split = per_thread()  # per clip of this thread's last call (see before_llm)
    stages = ("before_llm", "in_llm")
    noop = {"retain": 1.0, "tau": 1.0, "inner_drop": 0.0}
    example = {"retain": 0.5, "tau": 0.3, "inner_layer": 2}  # tiny random videos: cosines ~0-0.7
    stage_off = {"before_llm": {"retain": 1.0, "tau": 1.0}, "in_llm": {"inner_drop": 0.0}}
    needs_scores = True
    needs_full_grids = True
    in_llm_merges = True
    paper = "retain 0.10 (sweeps to 0.25), tau 0.80, beta 0.6, kNN 7, D_ctx 0, inner merge at layer 18 of 28, r_in 0.5"

    retain: float = hparam(0.10, "share of each video's tokens entering the LLM (all frames together)", type=float, range="(0, 1]")
    tau: float = hparam(0.80, "cosine above which a position counts as unchanged between adjacent frames (1.0: no static tokens)", type=float, range="[-1, 1]")
    beta: float = hparam(0.6, "weight of a DPC centre against the mean of its members", type=float, range="[0, 1]")
    knn: int = hparam(7, "neighbours of the DPC-kNN density", type=int, range="[1, inf)")
    max_window: int = hparam(1024, "longest segment in frames", type=int, range="[2, inf)")
    context_share: float = hparam(0.0, "D_ctx: share of each frame's dynamic budget from DPC-kNN centres instead of attention", type=float, range="[0, 1]")
    inner_layer: int | None = hparam(None, "decoder layer K of the inner merge (None: 18 of 28 scaled to the depth)", type=int, range="[1, inf)")
    inner_drop: float = hparam(0.5, "share of the visual tokens merged away at layer K (0: no inner merge, 'w/o M')", type=float, range="[0, 1)")
    images_as_frames: bool = hparam(True, "the images of one prompt are the frames of one video", type=bool)
    position_policy: str = hparam("keep", "inner merge: 'keep' the survivors' RoPE positions (official)", choices=("keep", "compact"))

    def position_policy_at(self, stage: str) -> str:
        return "compact" if stage == "before_llm" else self.position_policy

    def bind(self, dims: dict) -> None:
        super().bind(dims)
        n = dims.get("llm_layers")
        if n is not None and self.inner_drop > 0 and not 1 <= self.layer() <= n - 1:
            raise ValueError(f"holitom: inner_layer={self.inner_layer} must be in 1..{n - 1} for this {n}-layer language model")

    def layer(self) -> int:
        """The inner merge layer K on the bound model (the paper's 18 of 28 scaled, round half up)."""
        if self.inner_layer is not None:
            return self.inner_layer
        n = self.dims.get("llm_layers", PAPER_DEPTH)
        return min(max(1, int(PAPER_INNER_LAYER * n / PAPER_DEPTH + 0.5)), max(1, n - 1))

    def _vit_probe(self) -> ViTAttention:
        return ViTAttention(layer=self.dims.get("vit_feature_block", -1), kind="colmean")

    def probes(self):
        out = [self._vit_probe()]
        return out + ([LLMAttention(layer=self.layer() - 1, query="last")] if self.inner_drop > 0 else [])

    def llm_layers(self):
        return [self.layer()] if self.inner_drop > 0 else []

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        """Before the LLM ``retain`` of all tokens (what the rescaled budget aims at), then ``1 - inner_drop``."""
        from ..stats import Reduction

        out = keep_count(visual_tokens, self.retain)
        events = [Reduction(self.name, "before_llm", None, [visual_tokens], [out], None)]
        if self.inner_drop > 0:
            inner = max(1, round(out * (1 - self.inner_drop)))
            events.append(Reduction(self.name, "in_llm", self.layer(), [out], [inner], None))
        return events

    def overhead_flops(self, event, spec, units=None) -> int:
        """The inner merge's similarity product (dropped x kept hidden states, per sample); the outer stage's
        elementwise similarities and DPC distances are not counted (no matrix product)."""
        if event.stage != "in_llm" or spec.llm is None:
            return 0
        return sum(2 * (a - o) * spec.llm.hidden * o for a, o in zip(event.tokens_in, event.tokens_out))

    # before the LLM ------------------------------------------------------------------------------
    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        attn = probes[self._vit_probe()]
        found = clips(tokens, self.images_as_frames, self.name)
        pieces, splits = [], []
        for c in found:
            p, split = self._clip(tokens, c, attn) if c.temporal else (self._still(tokens, c, attn), None)
            pieces.append(p)
            splits.append(split)
        #: per clip of the last call: frames, segments, share of its tokens in static regions, static tokens kept,
        #: rescaled retain (None: a clip without time)
        self.last_split = splits
        own = {i for i, c in enumerate(found) if c.temporal and c.one_unit}
        return assemble(tokens, found, pieces, own_order=own)

    def _still(self, tokens, clip: Clip, attn) -> list[Piece]:
        """No time: each grid keeps its ``retain`` most attended tokens."""
        out = []
        for t, (h, w) in enumerate(clip.grids):
            x, a = clip.frame(tokens.features, t), clip.frame(attn, t)
            keep = _rank_desc(a.float())[: keep_count(h * w, self.retain)].sort().values
            out.append(Piece(t, keep, x[keep], torch.ones(keep.numel())))
        return out

    def _clip(self, tokens, clip: Clip, attn) -> tuple[list[Piece], dict]:
        x, a = clip.stack(tokens.features), clip.stack(attn).float()  # [T, N, D], [T, N]
        t, n = x.shape[:2]
        static = adjacent_similarity(x) > self.tau
        segs, saved = segment_frames(window_gain(static), self.max_window)
        r = min(1.0, self.retain / ((t * n - saved) / (t * n)))
        out, n_static, covered = [], 0, 0
        for i, j in segs:
            s_mask = static[i:j].all(0) if j > i else torch.zeros(n, dtype=torch.bool, device=x.device)
            if bool(s_mask.any()):
                pos = s_mask.nonzero().squeeze(1)
                c = max(1, round(pos.numel() * r))
                centres, merged, members = dpc_knn_merge(x[i : j + 1, pos].float().mean(0), c, self.knn, self.beta)
                out.append(Piece(i, pos[centres], merged, (members + 1) * (j - i + 1)))
                n_static += c
                covered += pos.numel() * (j - i + 1)
            for f in range(i, j + 1):
                out.append(self._dynamic(f, x[f], a[f], ~s_mask, r))
        split = {"frames": t, "segments": segs, "static_share": covered / (t * n), "static_tokens": n_static}
        return out, {**split, "rescaled_retain": r}

    def _dynamic(self, f: int, x: torch.Tensor, a: torch.Tensor, dyn: torch.Tensor, r: float) -> Piece:
        """Frame ``f``'s dynamic tokens: ceil(|dyn| r) kept, the dominant share by attention, the contextual
        rest as DPC-kNN centres of the other dynamic tokens (merged into them)."""
        pos = dyn.nonzero().squeeze(1)
        k = math.ceil(pos.numel() * r - 1e-9)
        dominant = round(k * (1 - self.context_share))
        order = _rank_desc(a[pos])
        top = order[:dominant].sort().values
        idx, feats, sizes = pos[top], x[pos[top]].float(), torch.ones(top.numel(), device=x.device)
        rest = order[dominant:].sort().values
        if k - dominant > 0 and rest.numel():
            centres, merged, members = dpc_knn_merge(x[pos[rest]], min(k - dominant, rest.numel()), self.knn, self.beta)
            idx, feats = torch.cat([idx, pos[rest[centres]]]), torch.cat([feats, merged])
            sizes = torch.cat([sizes, members + 1])
        order = idx.argsort()
        return Piece(f, idx[order], feats[order], sizes[order])

    # inside the LLM -----------------------------------------------------------------------------
    def in_llm(self, view: LLMView) -> LLMStep:
        attn = view.probes[LLMAttention(layer=self.layer() - 1, query="last")].at(view)
        kept_all, hidden = [], []
        for b, idx in enumerate(view.visual_index):
            n = idx.numel()
            k = max(1, round(n * (1 - self.inner_drop))) if n else 0
            kept = _rank_desc(attn[b, idx].float())[:k].sort().values
            drop = torch.ones(n, dtype=torch.bool, device=kept.device)
            drop[kept] = False
            dropped = drop.nonzero().squeeze(1)
            h = view.hidden[b, idx.to(view.hidden.device)]
            hn = torch.nn.functional.normalize(h.float(), dim=-1)
            dest = (hn[dropped] @ hn[kept].T).argmax(1) if dropped.numel() else dropped
            merged = halving_merge(h, kept, dest, dropped) if dropped.numel() else h[kept].float()
            kept_all.append(kept)
            hidden.append(merged.to(h.dtype))
        return LLMStep(kept_all, hidden)

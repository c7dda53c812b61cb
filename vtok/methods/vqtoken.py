"""`vqtoken`: VQToken (NeurIPS 2025, arXiv 2503.16980) -- a video's tokens vector-quantised into a small
adaptive codebook before the LLM, with the index map (token hash) that keeps where each code was.

Pure functions (``kmeans``, ``elbow_k``, ``codebook``) and the method (``VQToken``); the optional VQ-attention
module (``VQAttention``) is trainable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import threading

import torch
from torch import nn

from ..method import Method, hparam, per_thread, register
from ..tokens import VisualTokens, seeded_generator
from .clips import Piece, assemble, clips

__all__ = ["VQToken", "VQAttention", "kmeans", "elbow_k", "codebook", "tokdense"]

_STEP = threading.local()  # per thread: the FLOPs each method instance counted in its step in flight


def _init_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Euclidean D^2 sampling, +1e-6 so a set of duplicates still samples), fp32 [k, D]."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).square().sum(1)
    for _ in range(1, k):
        p = (d2 + 1e-6).cpu()
        nxt = int(torch.multinomial(p / p.sum(), 1, generator=gen))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, (x - x[nxt]).square().sum(1))
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, gen: torch.Generator, iters: int = 100, tol: float = 1e-4):
    """k-means of ``x`` [n, D] (fp32, no grad): k-means++ init, assignment by cosine distance, update to the
    Euclidean mean of the members (an empty cluster keeps its centre), until ``iters`` or a centre shift below
    ``tol``. Returns (centres [k, D], labels [n], distortion sum |x - c_label|^2 as a float, the number of
    [n, D] x [D, k] assignment products it ran)."""
    with torch.no_grad():
        x = x.float()
        c = _init_plus_plus(x, k, gen)
        xn = nn.functional.normalize(x, dim=1)
        products = 1
        for _ in range(iters):
            products += 1
            labels = (xn @ nn.functional.normalize(c, dim=1).T).argmax(1)  # max cosine = min 1 - cos; ties: lower
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            counts = torch.zeros(k, device=x.device).index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
            new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), c)
            shift = float((new - c).norm())
            c = new
            if shift < tol:
                break
        labels = (xn @ nn.functional.normalize(c, dim=1).T).argmax(1)
        return c, labels, float((x - c[labels]).square().sum()), products


def elbow_k(distortions: list[float], k_min: int) -> int:
    """The elbow of distortion over K = k_min, k_min + 1, ...: the K with the largest discrete second difference
    (``D[K-1] - 2 D[K] + D[K+1]``). The official code adds the offset wrongly (K only lands in 12..22 of 12..32);
    vtok takes the K the second difference points at."""
    if len(distortions) < 3:
        return k_min
    d = torch.tensor(distortions, dtype=torch.float64)
    second = d[:-2] - 2 * d[1:-1] + d[2:]
    return k_min + 1 + int(torch.argmax(second))


def codebook(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code vectors: the mean of each cluster's L2-normalised members (sums and counts in fp32), and the counts."""
    xn = nn.functional.normalize(x.float(), dim=1)
    counts = torch.zeros(k, device=x.device).index_add_(0, labels, torch.ones(labels.numel(), device=x.device))
    sums = torch.zeros(k, x.shape[1], device=x.device).index_add_(0, labels, xn)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def tokdense(accuracy: float, visual_tokens: float) -> float:
    """TokDense (token information density): accuracy (in %) per visual token the LLM reads. The paper names the
    metric without a formula vtok could check; this is its plain reading."""
    return float(accuracy) / max(float(visual_tokens), 1e-9)


class VQAttention(nn.Module):
    """The VQ-attention module: the codebook (queries) attends to each frame's index-map row embedded to the LLM
    width (memory), one decoder layer; its output is added to the codebook, so the count stays K."""

    def __init__(self, positions: int, width: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(positions, width)
        self.layer = nn.TransformerDecoderLayer(width, heads, dim_feedforward=2 * width, batch_first=True, norm_first=True)
        for lin in (self.layer.self_attn.out_proj, self.layer.multihead_attn.out_proj, self.layer.linear2):
            nn.init.zeros_(lin.weight)  # every residual branch starts at zero: the module starts as the identity
            nn.init.zeros_(lin.bias)

    def forward(self, codes: torch.Tensor, index_map: torch.Tensor, k: int) -> torch.Tensor:
        """codes [K, D]; index_map [T, N] labels -> [K, D]."""
        rows = index_map.float() / max(k - 1, 1)
        memory = self.embed(rows.to(self.embed.weight.dtype)).unsqueeze(0)
        q = codes.to(self.embed.weight.dtype).unsqueeze(0)
        return self.layer(q, memory)[0]


@register
@dataclass
class VQToken(Method):
    """VQToken: a video's tokens become a codebook of K codes (k-means, K by the elbow of the distortion), one token each.

    Per video (a OneVision video, or a sample's images as its frames with ``images_as_frames``; an image alone
    is clustered on its own): k-means on all T x N tokens (k-means++ seeded from ``seed``, cosine assignment,
    fp32); K from ``k`` or, adaptive, from the elbow over ``k_min..k_max`` (the search's own run for that K is
    kept: no random re-fit). Each code is the mean of its L2-normalised members; it enters the LLM at the place
    of its member nearest the code (so codes are in time and raster order; the official order is the
    cluster index). ``last_index_map``: per video the [T, N] labels (the token hash). ``attn=True`` adds the
    trainable VQ-attention module (``vtok train`` / ``weights=``). The paper fine-tunes the whole VLM to
    read unit-norm codes; vtok does not.
    """

    name = "vqtoken"
    last_index_map = per_thread()  # per video of this thread's last call: the token hash
    stages = ("before_llm",)
    example = {"k": 3}
    kept_meaningful = False
    needs_full_grids = True
    paper = "adaptive K (elbow over 12..32; 12..22 as shipped), codebook only, 32 frames, full VLM fine-tune"

    k: int | None = hparam(None, "codes per video (None: adaptive, by the elbow over k_min..k_max)", type=int, range="[1, inf)")
    k_min: int = hparam(12, "smallest K of the adaptive search", type=int, range="[1, inf)")
    k_max: int = hparam(32, "largest K of the adaptive search", type=int, range="[1, inf)")
    iters: int = hparam(100, "k-means iterations at most", type=int, range="[1, inf)")
    seed: int = hparam(0, "seed of the k-means++ draws (per video, independent of batching)", type=int)
    attn: bool = hparam(False, "add the trainable VQ-attention module (needs trained weights)", type=bool)
    frame_tokens: int | None = hparam(
        None, "tokens per frame the VQ-attention module is built for (None: the tower's configured size; a tower "
        "run at another input size, e.g. the demo VLM's DINOv2 at 224 px = 256, needs it)", type=int, range="[1, inf)",
    )
    rescale: bool = hparam(False, "scale each unit-norm code to its members' mean norm (for a VLM not fine-tuned on codes)", type=bool)
    images_as_frames: bool = hparam(True, "the images of one prompt are the frames of one video", type=bool)
    native: bool = hparam(
        False, "cluster each frame's native grid, before the model's own pooling (LLaVA-NeXT / OneVision: the paper's "
        "T x 729 tokens); the codes then go to the LLM as a sequence", type=bool,
    )
    position_policy: str = hparam("compact", "positions: renumbered (codes stand for no single patch)", choices=("compact",))

    @property
    def native_grids(self) -> bool:
        """Native grids when ``native`` is set."""
        return self.native

    def validate(self) -> None:
        if self.k_min > self.k_max:
            raise ValueError(f"vqtoken: k_min={self.k_min} is larger than k_max={self.k_max}")
        object.__setattr__(self, "needs_weights", self.attn)  # the module means nothing untrained

    @classmethod
    def settings_for_budget(cls, budget, context):
        """A fixed K of ``budget`` times one image's visual tokens (at least 1), for comparisons on images (a
        prompt's image is a video of one frame; K is a count per video, so on videos give ``k`` itself), and
        ``rescale``: comparisons run models not fine-tuned on unit-norm codes (on the demo VLM, 16 easy-VQA
        questions at K=64: 43.8% without, 100% with)."""
        return {"k": max(1, round(budget * context.visual_tokens)), "rescale": True}

    @classmethod
    def snap_budget(cls, budget, context):
        """Any budget whose count is at least 1 is reached as it is (K = its rounded count)."""
        return budget if round(budget * context.visual_tokens) >= 1 else 1 / context.visual_tokens

    def token_schedule(self, visual_tokens: int, units: list[int]) -> list:
        from ..stats import Reduction

        if self.k is None:
            raise ValueError("vqtoken chooses K per video (adaptive); pass reductions= or a fixed k")
        return [Reduction(self.name, "before_llm", None, [visual_tokens], [min(self.k, visual_tokens)], None)]

    def build(self, dims: dict, parts: dict):
        if not self.attn:
            return None
        width = int(dims["llm_hidden"])
        heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
        n = int(self.frame_tokens or dims.get("vit_tokens") or 1)
        return {"vq_attention": VQAttention(n, width, heads)}

    def _choose(self, x: torch.Tensor, gen_seed: list):
        """(centres, labels, K) for one video's tokens x [M, D]."""
        m = x.shape[0]
        ks = [self.k] if self.k is not None else list(range(self.k_min, self.k_max + 1))
        ks = sorted({min(k, m) for k in ks})
        runs = {k: kmeans(x, k, seeded_generator(self.seed, *gen_seed, k), self.iters) for k in ks}
        k = ks[0] if len(ks) == 1 else min(elbow_k([runs[k][2] for k in ks], ks[0]), ks[-1])
        self._count(sum(2 * m * x.shape[1] * kk * runs[kk][3] for kk in ks) + 2 * m * x.shape[1] * k)  # + placement
        return runs[k][0], runs[k][1], k

    def step_flops(self) -> int | None:
        return _STEP.__dict__.get("flops", {}).get(id(self))

    def overhead_flops(self, event, spec, units=None) -> int:
        """The k-means products of the search and the placement, as counted while it ran (``Reduction.flops``);
        without a record (an estimate): one 100-iteration run at ``k`` per sample."""
        if event.flops is not None:
            return int(event.flops)
        d = spec.llm.hidden if spec.llm is not None else 0
        return sum(2 * n * d * (self.k or self.k_max) * (self.iters + 2) for n in event.tokens_in)

    def _count(self, flops: int | None = None, reset: bool = False) -> None:
        """Add to (or reset) this method's FLOP count of the step in flight in this thread."""
        per = _STEP.__dict__.setdefault("flops", {})
        per[id(self)] = (0 if reset else per.get(id(self), 0)) + (flops or 0)

    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        self._count(reset=True)
        found = clips(tokens, self.images_as_frames, self.name)
        index = tokens.image_index()
        pieces, maps = [], []
        for clip in found:
            frames = [clip.frame(tokens.features, t) for t in range(clip.frames)]
            x = torch.cat(frames)
            _, labels, k = self._choose(x, [index[clip.units[0]]])  # keyed within the sample: batching-independent
            codes, counts = codebook(x, labels, k)
            if self.rescale:
                norms = torch.zeros(k, device=x.device).index_add_(0, labels, x.float().norm(dim=1))
                codes = nn.functional.normalize(codes, dim=1) * (norms / counts.clamp_min(1)).unsqueeze(1)
            if self.attn:
                n = frames[0].shape[0]
                same = all(f.shape[0] == n for f in frames)
                if not same or n != self.modules["vq_attention"].embed.in_features:
                    raise ValueError(f"vqtoken: the VQ-attention module was built for frames of "
                                     f"{self.modules['vq_attention'].embed.in_features} tokens; these have "
                                     f"{[f.shape[0] for f in frames]} (set frame_tokens= to the frames' count)")
                codes = self.modules["vq_attention"](codes, labels.view(len(frames), n), k).float()
            maps.append(labels)
            pieces.append(self._place(clip, frames, x, labels, codes, counts))
        #: per video of the last call: the [T*N] code of every token (the token hash), frame after frame
        self.last_index_map = maps
        out = assemble(tokens, found, pieces)
        if self.native:  # the codes replace the native grids: laid out as a sequence, not the model's pooled grid
            out = replace(out, layout=["sequence"] * out.num_units)
        return out

    @staticmethod
    def _place(clip, frames, x, labels, codes, counts) -> list[Piece]:
        """Each code at its member nearest to it (cosine), as a piece of that member's frame."""
        xn = nn.functional.normalize(x.float(), dim=1)
        sim = (xn @ nn.functional.normalize(codes, dim=1).T).masked_fill(
            labels.unsqueeze(1) != torch.arange(codes.shape[0], device=x.device), -2.0
        )
        rep = sim.argmax(0)  # per code: its nearest member (every used code has one)
        used = counts > 0
        starts = torch.tensor([0] + [f.shape[0] for f in frames], device=x.device).cumsum(0)
        frame = torch.searchsorted(starts, rep, right=True) - 1
        out = []
        for f in range(len(frames)):
            sel = (frame == f) & used
            if bool(sel.any()):
                idx = rep[sel] - starts[f]
                out.append(Piece(f, idx, codes[sel].to(x.dtype), counts[sel]))
        return out

"""Small test methods that exercise each capability of the in-LLM stage (registered, so the invariant
suite, the FLOPs check and every other registry-driven test run them on every VLM adapter):

* ``t_staged``: stages at several layers with state carried across them (TransPrune's shape): a
  transition-variation score from the ``Transition`` probe accumulated in ``view.state``, the
  instruction's attention at the stage layer (``view.attention``) and a declared text-query probe;
  each stage keeps a fraction of the *original* visual count.
* ``t_merge``: one stage that keeps evenly spaced visual tokens and averages every dropped token
  into its most similar kept one (``LLMStep.hidden``), reporting its own matmul in ``overhead_flops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vtok.vit import ViTMerge
from vtok.method import (
    POSITION_POLICIES,
    LLMAttention,
    LLMStep,
    Method,
    Transition,
    hparam,
    keep_count,
    register,
)


def transition_variation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TransPrune's per-token variation of a sub-block: ||y||/||x|| * softmax(1 - cos(x, y))."""
    mag = y.float().norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-6)
    return mag * torch.softmax(1 - F.cosine_similarity(x.float(), y.float(), dim=-1), dim=0)


@register
@dataclass
class StagedPrune(Method):
    """Test method: in_llm stages at several layers, state carried across them."""

    name = "t_staged"
    stages = ("in_llm",)
    noop = {"ratios": (1.0, 1.0)}
    example = {"layers": (1, 3), "ratios": (0.75, 0.5)}
    needs_scores = True

    layers: tuple = hparam((1, 3), "stage layers (0-based)", type=tuple)
    ratios: tuple = hparam((0.75, 0.5), "fraction of the original visual tokens left after each stage", type=tuple)
    probe_layer: int = hparam(0, "layer of the Transition and text-attention probes", type=int, range="[0, inf)")
    position_policy: str = hparam("compact", "positions after pruning", choices=POSITION_POLICIES)

    def validate(self):
        if len(self.layers) != len(self.ratios):
            raise ValueError("t_staged: give one ratio per layer")

    def probes(self):
        return [Transition(self.probe_layer), LLMAttention(self.probe_layer, "text")]

    def llm_layers(self):
        return list(self.layers)

    def in_llm(self, view):
        st = view.state
        if "n0" not in st:  # the first stage of this prefill
            st["n0"] = [int(i.numel()) for i in view.visual_index]
            st["stage"] = 0
        ratio = self.ratios[st["stage"]]
        st["stage"] += 1
        tr = view.probes[Transition(self.probe_layer)]
        rows = tr.rows_for(view)
        inst = view.attention("instruction").at(view)
        text = view.probes[LLMAttention(self.probe_layer, "text")].at(view)
        kept = []
        for b, idx in enumerate(view.visual_index):
            r = rows[b]
            ttv = transition_variation(tr.attn_in[b][r], tr.attn_out[b][r]) + transition_variation(
                tr.mlp_in[b][r], tr.mlp_out[b][r]
            )
            score = ttv / ttv.sum().clamp_min(1e-8)
            for a in (inst[b, idx], text[b, idx]):
                score = score + a / a.sum().clamp_min(1e-8)
            k = min(idx.numel(), keep_count(st["n0"][b], ratio))
            kept.append(torch.sort(-score, stable=True).indices[:k].sort().values)
        return kept


@register
@dataclass
class NearestMerge(Method):
    """Test method: keep evenly spaced visual tokens, merge each dropped one into its most similar kept one."""

    name = "t_merge"
    stages = ("in_llm",)
    noop = {"retain": 1.0}
    example = {"layer": 2, "retain": 0.5}
    in_llm_merges = True

    layer: int = hparam(2, "the stage layer", type=int, range="[1, inf)")
    retain: float = hparam(0.5, "fraction of the visual tokens kept", type=float, range="(0, 1]")
    position_policy: str = hparam("keep", "positions after pruning", choices=POSITION_POLICIES)

    def llm_layers(self):
        return [self.layer]

    def in_llm(self, view):
        kept, hidden = [], []
        for b, idx in enumerate(view.visual_index):
            n = idx.numel()
            k = keep_count(n, self.retain)
            keep = torch.linspace(0, n - 1, k).round().long().unique()
            drop = torch.ones(n, dtype=torch.bool)
            drop[keep] = False
            h = view.hidden[b, idx].float()
            merged = h[keep].clone()
            if bool(drop.any()):
                sim = F.normalize(h[drop], dim=-1) @ F.normalize(h[keep], dim=-1).T  # the method's own matmul
                dst = sim.argmax(1)
                merged.index_add_(0, dst, h[drop])
                count = torch.ones(keep.numel()).index_add_(0, dst, torch.ones(dst.numel()))
                merged = merged / count[:, None]
            kept.append(keep)
            hidden.append(merged)
        return LLMStep(kept, hidden)

    def overhead_flops(self, event, spec, units=None):
        d = spec.llm.hidden
        return sum(2 * (a - o) * o * d for a, o in zip(event.tokens_in, event.tokens_out) if a > o)


def _bipartite(metric: torch.Tensor, a: torch.Tensor, b: torch.Tensor, r: int):
    """Every token of ``a`` [k] picks its most cosine-similar token of ``b`` [m]; the ``r`` best pairs merge
    (ties by index): (src, dst) [B, r] each."""
    m = F.normalize(metric.float(), dim=-1)
    score = m[:, a] @ m[:, b].transpose(1, 2)
    best, arg = score.max(-1)
    top = best.argsort(dim=1, descending=True, stable=True)[:, :r]
    return a[top], b[arg.gather(1, top)]


@register
@dataclass
class FramePairMerge(Method):
    """Test method for cross-frame in_vit merges: at the input of block ``block`` (before attention) every two
    neighbouring frames of a video become one row (``ViTMerge.regroup``) and ``k`` patch tokens of the first
    frame merge into their most similar token of the second (cosine of the block's input states). Rows that
    are not frames of a video with an even frame count merge ``k`` tokens within the row instead (even
    positions into odd ones). At the block's MLP ``k`` more tokens merge within each row (keys as metric)."""

    name = "t_frames"
    stages = ("in_vit",)
    noop = {"k": 0}
    example = {"k": 2}

    k: int = hparam(2, "tokens merged at each merge point (not `r`: a ToMe schedule means other things)", type=int, range="[0, inf)")
    block: int = hparam(0, "the block whose input concatenates frame pairs", type=int, range="[0, inf)")
    prop_attn: bool = hparam(True, "proportional attention after the merges", type=bool)
    protect_cls: bool = True

    def vit_schedule(self, num_blocks):
        return [self.k if i == self.block else 0 for i in range(num_blocks)]

    def _pairs(self, view) -> bool:
        g = view.groups
        if g is None or g.shape[0] % 2:
            return False
        g = g.view(-1, 2)
        return bool((g[:, 0] == g[:, 1]).all())

    def in_vit_pre(self, view):
        if view.block != self.block or self.k == 0:
            return None
        p = view.protected
        if self._pairs(view):
            v = view.regrouped(2)
            n = (v.x.shape[1] - v.protected) // 2  # patches per frame
            first = torch.arange(v.protected, v.protected + n)
            second = torch.arange(v.protected + n, v.x.shape[1])
            src, dst = _bipartite(v.metric, first, second, self.k)
            return ViTMerge(src, dst, regroup=2)
        n = view.x.shape[1]
        src, dst = _bipartite(view.metric, torch.arange(p, n, 2), torch.arange(p + 1, n, 2), self.k)
        return ViTMerge(src, dst)

    def in_vit(self, view):
        n, p = view.x.shape[1], view.protected
        src, dst = _bipartite(view.metric, torch.arange(p, n, 2), torch.arange(p + 1, n, 2), view.budget)
        return ViTMerge(src, dst)

    def overhead_flops(self, event, spec, units=None) -> int:
        """The matching scores (first frame x second, or even x odd positions; metric width: the hidden size at
        a block's input, the head dimension of the keys before the MLP), and the key projection the adapter
        computes for ``nn.MultiheadAttention`` blocks."""
        v = spec.vision
        t = 0
        for n, out in units or []:
            r = n - out
            p = v.prefix * (2 if event.point == "attn" and n > v.tokens() else 1)
            a = b = (n - p) // 2
            width = v.stack.hidden if event.point == "attn" else v.stack.head_dim
            t += 2 * a * b * width if r else 0
            if event.point == "mlp" and v.mha_keys:
                t += 2 * n * v.stack.hidden * v.stack.hidden
        return t

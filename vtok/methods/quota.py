"""`quota`: QuoTA (arXiv 2503.08689) -- query-oriented token assignment: each video frame gets a token
budget in proportion to its relevance to the question (score to the power 2), realised by resizing the
frame's token grid (bilinear), before the LLM."""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..method import POSITION_POLICIES, AskModel, Method, Question, allocate, hparam, keep_count, register
from ..tokens import VisualTokens
from .clips import Clip, Piece, assemble, clips

__all__ = ["DECOUPLE_PROMPT", "DEFAULT_PROMPT", "OBJECTS_PROMPT", "QuoTA", "centre_index", "frame_budgets",
           "frame_weights", "parse_objects", "resize_grid", "scaled_grid", "v1_grid"]  # fmt: skip

DEFAULT_PROMPT = (
    "Question: {question}\nDoes this frame show something that helps to answer the question? Answer Yes or No."
)
OBJECTS_PROMPT = "Does this frame contain any of the following: {objects}? Answer Yes or No."
DECOUPLE_PROMPT = (
    "Question: {question}\nWhich physical objects must one look for in a video to answer this question? "
    "Answer only with a Python list of short names, e.g. ['dog', 'red car'], or [] if none."
)
#: the probes quota reads: served as None without a processor (then only clips without time can run)
ASK, QUESTION = AskModel(optional=True), Question(optional=True)
#: scores at or below this (all frames of a clip) carry no preference: the frames share the budget equally
ZERO = 1e-12


# ---------------------------------------------------------------- budgets and grids (pure functions)


def frame_weights(scores, power: float = 2.0) -> list[float]:
    """Weights ``s ** power`` normalised to sum 1 (fp64); uniform when every score is ~0 (<= ``ZERO``).
    Scores must be finite and >= 0."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() and (not bool(torch.isfinite(s).all()) or bool((s < 0).any())):
        raise ValueError(f"quota: frame scores must be finite and >= 0 (probabilities, similarities), got {s.tolist()}")
    if not s.numel() or float(s.max()) <= ZERO:
        return [1.0 / max(s.numel(), 1)] * s.numel()
    w = (s / s.max()) ** power  # scaled first: no underflow for tiny probabilities
    return (w / w.sum()).tolist()


def frame_budgets(total: int, sizes: list[int], weights: list[float]) -> list[int]:
    """Tokens per frame: ``total`` split in proportion to ``weights``, each frame capped at its ``sizes``
    (native grid) with the excess passed on (water-filling), summing to ``min(total, sum(sizes))``; what the
    frames of weight > 0 cannot hold goes to the others in equal shares."""
    pos = [i for i, w in enumerate(weights) if w > 0] or list(range(len(sizes)))
    rest = [i for i in range(len(sizes)) if i not in pos]
    out = [0] * len(sizes)
    for i, k in zip(pos, allocate(total, [sizes[i] for i in pos], [weights[i] for i in pos], floor=0)):
        out[i] = k
    left = min(int(total), sum(sizes)) - sum(out)
    for i, k in zip(rest, allocate(left, [sizes[i] for i in rest], [1.0] * len(rest), floor=0) if left > 0 else []):
        out[i] = k
    return out


def v1_grid(count: int, h: int, w: int) -> tuple[int, int]:
    """The paper's v1 grid for ``count`` tokens: side ``floor(sqrt(count))``, one more row when it fits;
    the native (h, w) from ``count >= h * w`` on, and never more rows or columns than the native grid."""
    if count <= 0 or h * w == 0:
        return 0, 0
    if count >= h * w:
        return h, w
    a = b = math.isqrt(count)
    if a * b < count and (a + 1) * b <= count:
        a += 1
    return min(a, h), min(b, w)


def scaled_grid(h: int, w: int, retain: float) -> tuple[int, int]:
    """Both sides scaled by ``sqrt(retain)`` (rounded, at least 1, at most native): a grid of a clip
    without time (an image, an AnyRes base or high-resolution grid)."""
    if h * w == 0:
        return 0, 0
    s = math.sqrt(retain)
    return max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))


def centre_index(h: int, w: int, oh: int, ow: int, device=None) -> torch.Tensor:
    """For each cell of an ``oh x ow`` resize of an ``h x w`` grid (raster order): the raster index of
    the original patch holding the cell's centre (distinct cells get distinct patches when downsizing)."""
    rows = torch.tensor([min(h - 1, (2 * i + 1) * h // (2 * oh)) for i in range(oh)], dtype=torch.long)
    cols = torch.tensor([min(w - 1, (2 * j + 1) * w // (2 * ow)) for j in range(ow)], dtype=torch.long)
    return (rows[:, None] * w + cols[None, :]).flatten().to(device)


def resize_grid(x: torch.Tensor, h: int, w: int, oh: int, ow: int) -> torch.Tensor:
    """``x`` [M, h*w, D] (raster) resized to [M, oh*ow, D]: bilinear, ``align_corners=False``, in fp32."""
    if (oh, ow) == (h, w):
        return x.float()
    m, _, d = x.shape
    g = x.float().transpose(1, 2).reshape(m, d, h, w)
    out = F.interpolate(g, size=(oh, ow), mode="bilinear", align_corners=False)
    return out.reshape(m, d, oh * ow).transpose(1, 2)


def parse_objects(text: str) -> list[str]:
    """The object names of a decoupling answer: the last ``[...]`` list in it (Python or JSON literal, else
    comma-separated words); [] when there is none."""
    found = re.findall(r"\[[^\[\]]*\]", text or "")
    if not found:
        return []
    body = found[-1]
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError):
        value = [v.strip(" '\"\n\t") for v in body[1:-1].split(",")]
    items = value if isinstance(value, (list, tuple)) else []
    return list(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))


# ---------------------------------------------------------------- the method


@register
@dataclass
class QuoTA(Method):
    """Query-oriented token assignment (QuoTA): frames relevant to the question keep more tokens.

    Each temporal clip (a video; with ``images_as_frames`` a sample's images) gets ``retain`` of its tokens,
    split over its frames in proportion to score ** ``power`` (``vtok.method.allocate``: water-filling,
    each frame capped at its native grid, the excess passed on); a frame's count c becomes a grid as in the
    paper's v1 (side floor(sqrt(c)), one more row when it fits; at most the native grid) and the frame's
    tokens are resized to it (bilinear, align_corners=False, fp32). Frames with c = 0 are dropped; a clip
    keeps at least one token. A clip without time (an image, an AnyRes image) is scored by no one: each of
    its grids is scaled by sqrt(retain). A resized token takes as position the original patch nearest to
    its cell centre and stands for h*w / (h'*w') patches; the tokens of a frame stay in raster order.

    Scores (default): the attached model itself (probe ``AskModel``) gives, per frame, the probability that
    it answers ``answer`` to ``prompt`` (the question filled in) after that frame's tokens, as the paper's
    scorer VLM does with "A". ``decouple``: first the same model lists the objects the question needs
    (greedy, text only; parsed leniently), and frames are asked whether they contain any of them (the plain
    prompt when the list is empty). The paper's scorer is a separate Qwen2-VL-2B on raw frames and its
    budget is the vanilla model's token count with upsampling allowed; here frames never exceed their native
    grid, so retain=1.0 is the no-op whatever the scores. A frame's grid is the one the LLM gets: on OneVision
    after the model's 2-D pooling, unless ``native=True``: then (LLaVA-NeXT / OneVision) QuoTA reads the
    native grids before the model's pooling and unpadding (``Method.native_grids``), as the paper resizes
    each unpooled 27 x 27 frame: ``retain`` is then a share of the native tokens (the paper's budget, the
    vanilla model's T x 196 pooled tokens, is ``retain=196/729``), each frame / AnyRes crop is resized on its
    native grid and QuoTA lays the result out itself (per frame / crop its resized grid, a newline after each
    row); retain=1.0 still hands every native token back, which the model then pools as usual. ``native``
    is off by default so that ``retain`` keeps its meaning (a share of the tokens the LLM gets) on every
    model. Custom ``scorer(frames, questions, ask)``:
    ``frames`` one [T, n, D] tensor per temporal clip of the batch (LLM width), ``questions`` the question
    of each clip's sample, ``ask`` the ``AskModel`` callable (both None without a processor); returns one
    sequence of T scores (finite, >= 0) per clip. The default scorer needs
    ``vtok.apply(model, "quota", processor=processor)``; without it, a call with a video is refused (images
    need no scores).
    """

    name = "quota"
    stages = ("before_llm",)
    noop = {"retain": 1.0}
    example = {"retain": 0.25}
    paper = ("frames scored by Qwen2-VL-2B (P('A')), weights score^2, budget = the vanilla model's 64 x 196 tokens, "
             "v1 bilinear resize of each 27x27 frame")  # fmt: skip
    needs_scores = False  # reads no attention
    kept_meaningful = False  # resized tokens are new tokens
    needs_full_grids = True

    retain: float = hparam(
        0.25, "tokens kept per clip, as a share of its tokens (1.0: no-op, as frames never grow past their grid)",
        type=float, range="(0, 1]",
    )  # fmt: skip
    power: float = hparam(2.0, "exponent on the frame scores before they are normalised into weights",
                          type=float, range="[0, inf)")  # fmt: skip
    images_as_frames: bool = hparam(True, "a sample's images (LLaVA-1.5) are the frames of one video", type=bool)
    scorer: object = hparam(None, "None: ask the attached model; or a callable scorer(frames, questions, ask)")
    prompt: str = hparam(DEFAULT_PROMPT, "the relevance question asked per frame; {question} is filled in", type=str)
    answer: str = hparam("Yes", "the answer whose first token's probability is a frame's score", type=str)
    decouple: bool = hparam(False, "first ask the model which objects the question needs (query decoupling)", type=bool)
    native: bool = hparam(
        False, "resize each frame's / crop's native grid before the model's own pooling and unpadding (LLaVA-NeXT, "
        "OneVision; the paper's 27x27 frames); retain is then a share of the native tokens", type=bool,
    )  # fmt: skip
    position_policy: str = hparam(
        "compact", "'compact' renumbers RoPE positions, 'keep' gives a token its patch's index", choices=POSITION_POLICIES
    )

    def validate(self) -> None:
        if self.scorer is not None and not callable(self.scorer):
            raise ValueError(f"quota: scorer={self.scorer!r} must be None (ask the model) or a callable scorer(frames, questions, ask)")
        try:
            self.prompt.format(question="q")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"quota: prompt={self.prompt!r} must be a str.format template with only {{question}} ({e})") from None
        if not self.answer.strip():
            raise ValueError(f"quota: answer={self.answer!r} is empty; give the word whose probability is a frame's score, e.g. 'Yes'")

    @property
    def native_grids(self) -> bool:
        """Native grids when ``native`` is set (see the class docstring)."""
        return self.native

    def probes(self):
        """Optional: without a processor, images still work (nothing to score); videos need the scorer."""
        return [ASK, QUESTION]

    def overhead_flops(self, event, spec, units=None) -> int:
        """The scorer's own forwards through the language model, as the adapter recorded them
        (``Reduction.nested``: rows, query length, key length, LM-head rows per forward)."""
        if event.stage != "before_llm" or spec.llm is None or not event.nested:
            return 0
        s, head = spec.llm, 2 * spec.llm.hidden * spec.vocab
        return sum(b * (s.layers * (s.linear(q) + s.attention(q, kv)) + rows * head) for b, q, kv, rows in event.nested)

    # scores ----------------------------------------------------------------------------------------
    def ask_scores(self, frames: list, questions: list, ask) -> list:
        """The default scorer: the attached model's P(``answer``) per frame (all frames in batched calls)."""
        if ask is None:
            raise ValueError(
                "quota scores the frames of a video by asking the attached model whether each frame helps to answer "
                "the question, which needs the model's tokenizer; pass vtok.apply(model, 'quota', "
                "processor=processor) (the processor or tokenizer you prepare inputs with), or a scorer="
            )
        prompts = self._prompts(questions, ask)
        visual = [f[t] for f in frames for t in range(f.shape[0])]
        texts = [p for p, f in zip(prompts, frames) for _ in range(f.shape[0])]
        flat = ask(visual, texts, answer=self.answer)
        return list(torch.split(flat, [f.shape[0] for f in frames]))

    def _prompts(self, questions: list, ask) -> list[str]:
        if not self.decouple:
            return [self.prompt.format(question=q) for q in questions]
        uniq = list(dict.fromkeys(questions))
        answers = ask.generate([DECOUPLE_PROMPT.format(question=q) for q in uniq], max_new_tokens=48)
        objects = dict(zip(uniq, (parse_objects(a) for a in answers)))
        return [OBJECTS_PROMPT.format(objects=", ".join(objects[q])) if objects[q] else self.prompt.format(question=q)
                for q in questions]  # fmt: skip

    def _scores(self, frames: list, questions: list, ask) -> list[list[float]]:
        out = (self.scorer if self.scorer is not None else self.ask_scores)(frames, questions, ask)
        out = list(out) if out is not None else []
        lens = [f.shape[0] for f in frames]
        got = [len(s) if hasattr(s, "__len__") else None for s in out]
        if got != lens:
            raise ValueError(f"quota: the scorer must return one sequence of T scores per clip (T = {lens}), got lengths {got}")
        return [torch.as_tensor(s, dtype=torch.float64).cpu().flatten().tolist() for s in out]

    # the stage -------------------------------------------------------------------------------------
    def before_llm(self, tokens: VisualTokens, probes: dict) -> VisualTokens:
        if self.at_noop():
            return tokens
        clip_list = clips(tokens, self.images_as_frames, self.name)
        temporal = [c for c in clip_list if c.temporal]
        scores = {}
        if temporal:
            frames = [c.stack(tokens.features) for c in temporal]
            asked = probes.get(QUESTION) or [None] * (int(tokens.owner.max()) + 1)
            questions = [asked[int(tokens.owner[c.units[0]])] for c in temporal]
            scores = dict(zip(map(id, temporal), self._scores(frames, questions, probes.get(ASK))))
        targets = [self._clip_grids(c, scores.get(id(c))) for c in clip_list]
        pieces = [self._clip_pieces(tokens, c, g) for c, g in zip(clip_list, targets)]
        out = assemble(tokens, clip_list, pieces)
        if not self.native:
            return out
        # native grids: QuoTA lays the resized grids out itself, frame after frame (crop after crop)
        layout = [None] * tokens.num_units
        for clip, grids in zip(clip_list, targets):
            kept = [(oh, ow) for oh, ow in grids if oh * ow]
            if clip.one_unit:
                layout[clip.units[0]] = kept
            else:
                for u, g in zip(clip.units, grids):
                    layout[u] = [g] if g[0] * g[1] else []
        return replace(out, layout=layout)

    def _clip_grids(self, clip: Clip, scores) -> list[tuple[int, int]]:
        """The target grid of each frame of one clip: budgets from ``scores`` (temporal), else one ratio for all."""
        if scores is None:
            return [scaled_grid(h, w, self.retain) for h, w in clip.grids]
        sizes = [h * w for h, w in clip.grids]
        budgets = frame_budgets(keep_count(sum(sizes), self.retain), sizes, frame_weights(scores, self.power))
        return [v1_grid(c, h, w) for c, (h, w) in zip(budgets, clip.grids)]

    def _clip_pieces(self, tokens: VisualTokens, clip: Clip, grids: list) -> list[Piece]:
        """The frames of one clip resized to ``grids``."""
        by_shape: dict = {}  # frames of one (grid, target) resized together
        for t, ((h, w), (oh, ow)) in enumerate(zip(clip.grids, grids)):
            if oh * ow:
                by_shape.setdefault((h, w, oh, ow), []).append(t)
        pieces = []
        for (h, w, oh, ow), ts in by_shape.items():
            x = torch.stack([clip.frame(tokens.features, t) for t in ts])
            out = resize_grid(x, h, w, oh, ow)
            index = centre_index(h, w, oh, ow, x.device)
            size = torch.full((oh * ow,), h * w / (oh * ow), dtype=torch.float32)
            pieces += [Piece(t, index, out[i], size) for i, t in enumerate(ts)]
        return sorted(pieces, key=lambda p: p.frame)

"""The analytic FLOPs model: shapes of a model's parts (``Stack``, ``VisionSpec``, ``ModelSpec``), the token
counts of one forward (``ForwardShapes``) and ``analyse``, which turns both into a ``FlopsReport``.

Pure arithmetic: nothing here runs a model. ``vtok.eval.flops`` records the shapes and re-exports all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "PARTS",
    "CONVENTIONS",
    "UnsupportedModel",
    "Stack",
    "VisionSpec",
    "ModelSpec",
    "ForwardShapes",
    "FlopsReport",
    "analyse",
]

PARTS = ("vision", "projector", "method", "prefill", "lm_head", "decode")
CONVENTIONS = ("exact", "fastv")


class UnsupportedModel(ValueError):
    """vtok.eval.flops has no formula for this model family."""


# ----------------------------------------------------------------------------- shapes of the parts


@dataclass(frozen=True)
class Stack:
    """Shapes of a stack of transformer blocks (attention + MLP).

    ``attn_w`` / ``mlp_w``: multiply-accumulates per token of the block's attention linears (q, k, v, o)
    and MLP linears; 0 derives them from the dims (GQA q/o at ``heads``, k/v at ``kv_heads``;
    ``ffn_mats`` matrices of width ``ffn``).
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    ffn_mats: int = 2  # 2: fc1/fc2; 3: SwiGLU gate/up/down
    causal: bool = False
    attn_w: int = 0
    mlp_w: int = 0

    @property
    def attn_macs(self) -> int:
        if self.attn_w:
            return self.attn_w
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return d * q + 2 * d * kv + q * d

    @property
    def mlp_macs(self) -> int:
        return self.mlp_w or self.ffn_mats * self.hidden * self.ffn

    @property
    def weights_per_layer(self) -> int:
        """Multiply-accumulates per token per block in its linear layers (its weight count, no biases)."""
        return self.attn_macs + self.mlp_macs

    def linear(self, rows: int) -> int:
        return 2 * rows * self.weights_per_layer

    def attention(self, q: int, kv: int) -> int:
        """QK^T and AV for q query rows over kv keys, all query heads (the full rectangle)."""
        return 4 * self.heads * q * kv * self.head_dim

    def attention_causal(self, q: int) -> int:
        """QK^T and AV over the causal triangle of a q x q prefill."""
        return 4 * self.heads * (q * (q + 1) // 2) * self.head_dim

    def block(self, n: int, n_mlp: int | None = None, causal_skip: bool = False) -> int:
        """One block on one sequence: attention (and its linears) on n tokens, the MLP on n_mlp (default n)."""
        n_mlp = n if n_mlp is None else n_mlp
        att = self.attention_causal(n) if (causal_skip and self.causal) else self.attention(n, n)
        return 2 * n * self.attn_macs + att + 2 * n_mlp * self.mlp_macs

    def fastv_layer(self, n: int) -> int:
        d, m = self.hidden, self.ffn
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


@dataclass(frozen=True)
class VisionSpec:
    """A ViT: patch embedding, blocks, prefix tokens (CLS, registers), what runs after the blocks.

    head: "map" (SigLIP attention-pooling head), or None; pooled_linears: (in, out) of linears applied
    to one pooled row per image (timm classifier, open_clip projection). probe: how the adapters compute
    ViT attention probes -- "qk" (q and k projections of the needed rows), "qkv" (a fused qkv projection
    of every token). mha_keys: ToMe's keys cost an extra key projection (``nn.MultiheadAttention``).
    """

    stack: Stack
    channels: int
    patch: int
    image_size: int
    prefix: int
    head: str | None = None
    pooled_linears: tuple[tuple[int, int], ...] = ()
    probe: str = "qk"
    mha_keys: bool = False

    def grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self.patch, w // self.patch

    def tokens(self, h: int | None = None, w: int | None = None) -> int:
        gh, gw = self.grid(h or self.image_size, w or self.image_size)
        return gh * gw + self.prefix

    def patch_embed(self, images: int, h: int, w: int) -> int:
        gh, gw = self.grid(h, w)
        return 2 * images * gh * gw * self.channels * self.patch * self.patch * self.stack.hidden

    def after_blocks(self, n: int) -> int:
        """FLOPs after the blocks for one image whose last block left n tokens."""
        s, d = self.stack, self.stack.hidden
        t = sum(2 * a * o for a, o in self.pooled_linears)
        if self.head == "map":  # nn.MultiheadAttention(probe, x, x): q 1 row, k/v n rows, out_proj, MLP on 1 row
            t += 2 * d * d + 4 * n * d * d + s.attention(1, n) + 2 * d * d + 4 * d * s.ffn
        return t

    def probe_flops(self, n: int, rows: int) -> int:
        """A ViT attention probe of ``rows`` query rows over n tokens, for one image."""
        s, d = self.stack, self.stack.hidden
        proj = 2 * n * s.attn_macs * 3 // 4 if self.probe == "qkv" else 2 * n * d * d + 2 * rows * d * d
        return proj + 2 * s.heads * rows * n * s.head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the count needs to know about a model, read from its config (or its modules)."""

    family: str
    vision: VisionSpec | None = None
    projector: tuple[tuple[int, int], ...] = ()  # (in, out) of each projector linear, in order
    llm: Stack | None = None
    vocab: int = 0
    drop_cls: bool = False  # LLaVA "default" strategy: the projector sees tokens 1..N-1
    placeholder_ids: tuple[int, ...] = ()



# ----------------------------------------------------------------------------- what one forward ran


@dataclass
class ForwardShapes:
    """Token counts of one prefill (and of the decode steps that followed it)."""

    batch: int
    seq_len: int  # padded prompt length entering the LLM (0: a vision-only model)
    lengths: list  # valid prompt tokens per sample
    visual: list  # visual placeholder tokens per sample
    vision_calls: list = field(default_factory=list)  # (images, H, W) per tower call
    projector_rows: int = 0
    logits_to_keep: int = 0  # 0: all rows
    events: list = field(default_factory=list)  # vtok.stats.Reduction of this prefill
    methods: list = field(default_factory=list)  # the attached vtok methods
    decode_steps: list = field(default_factory=list)  # query tokens of each decode forward
    entry: tuple | None = None  # (padded length, per-sample lengths) read at the LM's input, if recorded
    probe_costs: list | None = None  # the LLM probe computations the adapter logged (handle.probe_costs)


@dataclass
class FlopsReport:
    """FLOPs of one forward (a batch), per part; ``total`` is their sum.

    parts: batch totals (padded layouts if ``padded``, else the per-sample sums); per_sample: each
    sample's useful work per part; llm_tokens: per decoder layer, tokens of each sample entering it;
    llm_padded: per decoder layer, the padded layout length; vision_tokens: per vision block, the tokens
    entering its attention (first image).
    """

    convention: str
    padded: bool
    parts: dict
    per_sample: list
    llm_tokens: list
    llm_padded: list
    vision_tokens: list
    batch: int
    causal_skip: bool = False
    visual_final: list = field(default_factory=list)  # per sample: visual tokens left at the last LLM layer
    visual_entry: list = field(default_factory=list)  # per sample: visual tokens of the prompt (placeholders)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()))

    @property
    def sample_totals(self) -> list:
        return [int(sum(p.values())) for p in self.per_sample]

    def to_dict(self) -> dict:
        return {
            "convention": self.convention,
            "padded": self.padded,
            "total": self.total,
            "parts": dict(self.parts),
            "per_sample": [dict(p) for p in self.per_sample],
            "llm_tokens": self.llm_tokens,
            "llm_padded": self.llm_padded,
            "vision_tokens": self.vision_tokens,
            "visual_entry": self.visual_entry,
            "visual_final": self.visual_final,
        }

    def __str__(self) -> str:
        mode = "padded batch" if self.padded else "sum of samples"
        unit, scale = next(((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)) if self.total >= s), ("", 1))
        lines = [f"FLOPs ({self.convention}, {mode}, batch {self.batch}):"]
        for k, v in self.parts.items():
            if v:
                lines.append(f"  {k:<10} {v / scale:12.4f} {unit}  ({100 * v / max(self.total, 1):5.1f}%)")
        lines.append(f"  {'total':<10} {self.total / scale:12.4f} {unit}")
        return "\n".join(lines)


def _shares(amount, weights):
    tot = sum(weights)
    return [amount * w / tot if tot else amount / len(weights) for w in weights]


def _images_per_sample(spec: ModelSpec, shapes: ForwardShapes, n_img: int) -> list:
    v = spec.vision
    if spec.llm is None:
        return [1] * shapes.batch
    h, w = (shapes.vision_calls[0][1], shapes.vision_calls[0][2]) if shapes.vision_calls else (None, None)
    per_img = v.tokens(h, w) - (1 if spec.drop_cls else 0)
    out = [x // per_img for x in shapes.visual]
    if sum(out) != n_img:
        raise ValueError(
            f"cannot tell which images belong to which sample ({shapes.visual} placeholders, {n_img} images of "
            f"{per_img} tokens); in_vit reductions are counted for one crop per image (LLaVA-1.5 style)"
        )
    return out


def _vision_schedule(spec: ModelSpec, shapes: ForwardShapes, n: int, n_img: int):
    """Per vision block and image: (tokens at its attention, tokens at its MLP). ToMe's placement: a block
    with an in_vit reduction runs its attention on the tokens entering it and its MLP on the tokens left."""
    events = sorted((e for e in shapes.events if e.stage == "in_vit"), key=lambda e: e.layer)
    per_img = [1] * n_img
    if events and len(events[0].tokens_in) != n_img:
        per_img = _images_per_sample(spec, shapes, n_img)
    by_layer = {e.layer: e for e in events}
    cur = [n] * n_img
    out = []
    for layer in range(spec.vision.stack.layers):
        e = by_layer.get(layer)
        if e is None:
            out.append([(c, c) for c in cur])
            continue
        if len(e.tokens_in) == n_img:
            tin, tout = list(e.tokens_in), list(e.tokens_out)
        else:
            tin, tout = [], []
            for k, cnt in enumerate(per_img):
                tin += [e.tokens_in[k] // cnt] * cnt if cnt else []
                tout += [e.tokens_out[k] // cnt] * cnt if cnt else []
        out.append(list(zip(tin, tout)))
        cur = tout
    return out, per_img


def _vit_probe_flops(v, probes: list, sched_v: list) -> int:
    """The ViT attention probes' side computations: a CLS row or every query row, at each row of their block."""
    from vtok.method import ViTAttention

    over = 0
    for p in probes:
        if isinstance(p, ViTAttention):
            rows = 1 if p.kind == "cls" else None
            over += sum(v.probe_flops(na, rows or na) for na, _ in sched_v[p.layer % v.stack.layers])
    return over


def _vision_rows_schedule(spec: ModelSpec, shapes: ForwardShapes, events: list) -> list:
    """Per vision block and tower row: (tokens at its attention, tokens at its MLP), from in_vit events that
    list every row of every tower call of the forward (``Reduction.units``, with the merge ``point``): a merge
    at a block's input ("attn", which may concatenate the frames of a video into fewer rows) sets the counts
    its attention runs on, one before the MLP ("mlp") the MLP's."""
    v = spec.vision
    cur = [v.tokens(h, w) for images, h, w in shapes.vision_calls for _ in range(images)]
    by_layer: dict = {}
    for e in events:
        by_layer.setdefault(e.layer, []).append(e)
    out = []
    for layer in range(v.stack.layers):
        attn = cur
        mlp = None
        for e in by_layer.get(layer, []):
            counts = [o for _, o in e.units]
            if e.point == "attn":
                attn = counts
            elif len(counts) != len(attn):
                raise ValueError(f"in_vit events of block {layer} disagree on the number of tower rows")
            else:
                mlp = counts
        mlp = attn if mlp is None else mlp
        out.append(list(zip(attn, mlp)))
        cur = mlp
    return out


def _llm_schedule(spec: ModelSpec, shapes: ForwardShapes):
    """Per decoder layer: (padded length, tokens of each sample)."""
    lens = list(shapes.lengths)
    padded = shapes.seq_len
    # in_vit counted per tower row (point set) is undone before the LLM: the placeholders keep their count
    entry = [e for e in shapes.events if e.stage in ("in_vit", "before_llm", "projector") and e.point is None]
    if shapes.entry is not None:
        padded, lens = shapes.entry[0], list(shapes.entry[1])
    elif entry:
        for e in entry:
            lens = [n - (a - o) for n, a, o in zip(lens, e.tokens_in, e.tokens_out)]
        if any(a != o for e in entry for a, o in zip(e.tokens_in, e.tokens_out)):
            padded = max(lens)
    stages: dict = {}  # layer -> its in_llm events in the order they ran (a chain may share a layer)
    for e in shapes.events:
        if e.stage == "in_llm":
            stages.setdefault(e.layer, []).append(e)
    cur = (padded, lens)
    out = []
    for layer in range(spec.llm.layers):
        for e in stages.get(layer, []):
            lens = [n - (a - o) for n, a, o in zip(cur[1], e.tokens_in, e.tokens_out)]
            changed = any(a != o for a, o in zip(e.tokens_in, e.tokens_out))
            cur = (max(lens) if changed else cur[0], lens)
        out.append(cur)
    return out


def analyse(spec: ModelSpec, shapes: ForwardShapes, *, convention: str = "exact", padded: bool = True,
            causal_skip: bool = False, output_tokens: int = 0) -> FlopsReport:  # fmt: skip
    """FLOPs of one recorded forward (``ForwardShapes``) of a model described by ``spec``.

    ``convention="exact"`` (default) counts every matrix multiply the model runs as ``2*M*N*K``, which is
    the rule of ``torch.utils.flop_counter.FlopCounterMode`` (the tests check equality with it on tiny
    models):

    * linear layers: ``2 * rows * in * out`` (biases, norms, activations, RoPE, softmax are not counted);
      GQA: q/o at ``num_attention_heads * head_dim``, k/v at ``num_key_value_heads * head_dim``;
      SwiGLU MLPs count their three matrices;
    * attention: ``QK^T`` and ``AV``, i.e. ``4 * heads * q_len * kv_len * head_dim``, with the *full*
      ``q_len x kv_len`` rectangle even when it is causal, as dense attention kernels (eager, SDPA math)
      and FlopCounterMode count it. ``causal_skip=True`` counts only the causal triangle ``q(q+1)/2`` of
      the LLM prefill instead (what block-skipping FlashAttention kernels compute, roughly);
    * patch embedding convolution ``2 * patches * C * p^2 * d``; the LM head on the rows whose logits are
      computed (all rows, or ``logits_to_keep``);
    * method overhead: the side computations vtok's adapters run for a method's probes (LLM attention
      rows as the adapter logged them in ``handle.probe_costs``, ViT attention statistics), plus what each
      method reports for its own scoring (``Method.overhead_flops``), in ``parts['method']``.

    ``padded=True`` (default) counts what ran: every sample of a batch at the padded length of each
    layer's layout (FlopCounterMode sees these shapes). ``report.per_sample`` always holds each sample's
    useful work (its own lengths; the vision tower and projector split over samples in proportion to their
    visual tokens, exact when images have equal token counts); ``padded=False`` makes ``total`` their sum.

    ``convention="fastv"`` is the formula papers use (FastV, HoliTom, DyCoke): LLM only, per sample and
    decoder layer ``4nd^2 + 2n^2d + 2ndm`` (n tokens entering the layer, d hidden width, m FFN width: MACs
    of q/k/v/o, attention and a two-matrix FFN; GQA and the SwiGLU gate are ignored), so prefill is
    ``K*f(n) + (L-K)*f(n_hat)`` for FastV, and decode for R output tokens
    ``sum_layers R*(4d^2 + 2dm) + 2d*(R*n + R(R+1)/2)`` (HoliTom issue #2).

    Decode (``output_tokens=R``, exact convention): the R-1 one-token forwards that ``generate`` runs
    after the prefill to produce R tokens (the first comes from the prefill's logits); step j attends over
    the layer's prefill KV length + j, at the reduced per-layer KV lengths.
    """
    from vtok.method import LLMAttention

    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {CONVENTIONS}")
    if isinstance(output_tokens, bool) or not isinstance(output_tokens, int) or output_tokens < 0:
        raise ValueError(f"output_tokens={output_tokens!r} must be an int >= 0")
    b = shapes.batch
    parts = dict.fromkeys(PARTS, 0)
    per = [dict.fromkeys(PARTS, 0) for _ in range(b)]
    weights = shapes.visual if any(shapes.visual) else [1] * b
    sched = _llm_schedule(spec, shapes) if spec.llm is not None and shapes.seq_len else []
    vis_tokens: list = []
    vis_last: list = []

    if convention == "fastv":
        s = spec.llm
        if s is None:
            raise UnsupportedModel("the fastv convention counts an LLM; this model has none")
        r = output_tokens
        d, m = s.hidden, s.ffn
        for i in range(b):
            per[i]["prefill"] = sum(s.fastv_layer(lens[i]) for _, lens in sched)
            if r:
                per[i]["decode"] = sum(r * (4 * d * d + 2 * d * m) + 2 * d * (r * lens[i] + r * (r + 1) / 2)
                                       for _, lens in sched)  # fmt: skip
        parts = {k: sum(p[k] for p in per) for k in PARTS}
        return _report(convention, False, parts, per, sched, vis_tokens, b, causal_skip, shapes, None)

    def add(part, total, per_values):
        parts[part] += total
        for i, x in enumerate(per_values):
            per[i][part] += x

    probes = [p for m in shapes.methods for p in m.probes()]
    # vision tower (and the methods' in-ViT overhead and ViT probes)
    rows_events = [e for e in shapes.events if e.stage == "in_vit" and e.point is not None]
    if spec.vision is not None and rows_events:  # in_vit counted per tower row (AnyRes crops, video frames)
        v = spec.vision
        sched_v = _vision_rows_schedule(spec, shapes, rows_events)
        vis_tokens = [blk[0][0] if blk else 0 for blk in sched_v]
        vis_last = [nm for _, nm in sched_v[-1]]
        t = sum(v.patch_embed(images, h, w) for images, h, w in shapes.vision_calls)
        t += sum(v.stack.block(na, nm) for blk in sched_v for na, nm in blk)
        t += sum(v.after_blocks(nm) for _, nm in sched_v[-1])
        add("vision", t, _shares(t, weights))
        over = sum(int(m.overhead_flops(e, spec, e.units)) for m in shapes.methods for e in rows_events if e.method == m.name)
        # work a method adds at every block whether it merges there or not (TempMe's LoRA)
        over += sum(int(m.tower_flops(spec, sched_v)) for m in shapes.methods if callable(getattr(m, "tower_flops", None)))
        over += _vit_probe_flops(v, probes, sched_v)
        add("method", over, _shares(over, weights))
    elif spec.vision is not None:
        v = spec.vision
        for k, (images, h, w) in enumerate(shapes.vision_calls):
            n = v.tokens(h, w)
            sched_v, img_owner = _vision_schedule(spec, shapes, n, images) if k == 0 else ([[(n, n)] * images] * v.stack.layers, None)  # noqa: E501
            if k == 0:
                vis_tokens = [blk[0][0] for blk in sched_v]
                vis_last = [nm for _, nm in sched_v[-1]]
            t = v.patch_embed(images, h, w)
            t += sum(v.stack.block(na, nm) for blk in sched_v for na, nm in blk)
            t += sum(v.after_blocks(nm) for _, nm in sched_v[-1])
            add("vision", t, _shares(t, weights))
            if k == 0:
                over = 0
                for m in shapes.methods:
                    for e in shapes.events:
                        if e.stage == "in_vit" and e.method == m.name:
                            over += int(m.overhead_flops(e, spec, sched_v[e.layer]))
                over += _vit_probe_flops(v, probes, sched_v)
                add("method", over, _shares(over, weights))
    # projector
    own = any(getattr(m, "replaces_projector", False) for m in shapes.methods)  # its cost is the method's
    if spec.projector and shapes.projector_rows and not own:
        t = sum(2 * shapes.projector_rows * a * o for a, o in spec.projector)
        add("projector", t, _shares(t, weights))
    # LLM prefill, LM head, decode
    if sched:
        s = spec.llm
        for padded_len, lens in sched:
            add("prefill", b * s.block(padded_len, causal_skip=causal_skip), [s.block(x, causal_skip=causal_skip) for x in lens])
        final_pad, final_lens = sched[-1]
        keep = shapes.logits_to_keep
        head = 2 * s.hidden * spec.vocab
        add("lm_head", b * (min(keep, final_pad) if keep else final_pad) * head,
            [(min(keep, x) if keep else x) * head for x in final_lens])  # fmt: skip
        steps = list(shapes.decode_steps) or [1] * max(output_tokens - 1, 0)
        done = 0
        for q in steps:
            for padded_len, lens in sched:
                add("decode", b * (s.linear(q) + s.attention(q, padded_len + done + q)),
                    [s.linear(q) + s.attention(q, x + done + q) for x in lens])  # fmt: skip
            add("decode", b * q * head, [q * head] * b)
            done += q
        # LLM attention probes (side computations): as the adapter logged them, else from the declared probes
        d, qo, kvo = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim

        def probe(rows, keys):
            return 2 * keys * d * kvo + 2 * rows * d * qo + 2 * s.heads * rows * keys * s.head_dim

        if shapes.probe_costs is not None:
            for c in shapes.probe_costs:
                add("method", c["batch"] * probe(c["padded_rows"], c["padded_keys"]),
                    [probe(r, k) for r, k in zip(c["rows"], c["keys"])])  # fmt: skip
        else:
            for p in probes:
                if isinstance(p, LLMAttention) and any(shapes.visual):
                    padded_len, lens = sched[p.layer]
                    rows = (lambda n: 1) if p.query == "last" else (lambda n: n)
                    add("method", b * probe(rows(padded_len), padded_len), [probe(rows(x), x) for x in lens])
    # the methods' own computations beyond probes (in_llm / before_llm)
    for m in shapes.methods:
        for e in shapes.events:
            if e.method == m.name and e.stage != "in_vit":
                extra = int(m.overhead_flops(e, spec))
                add("method", extra, _shares(extra, weights))
    if not padded:
        parts = {k: sum(p[k] for p in per) for k in PARTS}
    return _report(convention, padded, parts, per, sched, vis_tokens, b, causal_skip, shapes, vis_last)


def _report(convention, padded, parts, per, sched, vis_tokens, b, causal_skip, shapes, vis_last):
    if sched:
        entry = list(shapes.visual)
        final = [n - (length - v) for n, length, v in zip(sched[-1][1], shapes.lengths, shapes.visual)]
    else:
        entry = [vis_tokens[0] if vis_tokens else 0] * b
        final = list(vis_last) if vis_last else list(entry)
    return FlopsReport(
        visual_entry=[int(x) for x in entry],
        visual_final=[int(x) for x in final],
        convention=convention,
        padded=padded,
        parts={k: int(round(v)) for k, v in parts.items()},
        per_sample=[{k: int(round(v)) for k, v in p.items()} for p in per],
        llm_tokens=[list(lens) for _, lens in sched],
        llm_padded=[p for p, _ in sched],
        vision_tokens=list(vis_tokens),
        batch=b,
        causal_skip=causal_skip,
    )

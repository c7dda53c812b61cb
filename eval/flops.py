"""FLOPs of a forward pass: ``count`` (one forward of a model), ``Tracker`` (any code, ``generate`` included),
``estimate`` (a config and a token budget, no weights), ``counted`` (FlopCounterMode, the reference).

Everything of ``cost_model``, ``model_spec`` and ``presets`` is re-exported here:
``report = vtok.eval.flops.count(model, handle, **inputs); report.total, report.parts``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from vtok.hf_compat import cache_from_kwargs

from .cost_model import (
    CONVENTIONS,
    PARTS,
    FlopsReport,
    ForwardShapes,
    ModelSpec,
    Stack,
    UnsupportedModel,
    VisionSpec,
    analyse,
)
from .model_spec import get_path, model_spec, spec_mismatches
from .presets import FULL_SIZE, full_size_config, meta_model

__all__ = [
    "Stack",
    "VisionSpec",
    "ModelSpec",
    "ForwardShapes",
    "FlopsReport",
    "UnsupportedModel",
    "PARTS",
    "CONVENTIONS",
    "model_spec",
    "count",
    "Tracker",
    "estimate",
    "full_size_config",
    "meta_model",
    "FULL_SIZE",
    "counted",
    "reductions_for",
    "visual_layout",
    "spec_mismatches",
    "analyse",
]


# ----------------------------------------------------------------------------- recording a real forward


def _handle_of(model, handle):
    if handle is None:
        handle = getattr(model, "_vtok_handle", None)
    if handle is not None and not getattr(handle, "attached", True):
        handle = None
    return handle


def _pixels(args, kwargs):
    for x in list(args) + [kwargs.get(k) for k in ("pixel_values", "x", "pixel_values_videos")]:
        if isinstance(x, torch.Tensor) and x.dim() >= 4:
            return x
    return None


class Tracker:
    """Record the token counts of every forward of ``model`` while active; ``reports()`` turns them into FLOPs.

    >>> with Tracker(model, handle) as t:
    ...     model.generate(**inputs, max_new_tokens=8)
    >>> t.reports()[0].total        # prefill + the 7 decode steps, as they ran

    Each prefill (a forward without a filled KV cache) starts a record; later forwards with a cache add
    decode steps to it (each counted with its KV length). The vision tower may run inside the forward or
    before it (``generate`` encodes the images first): its calls since the last record belong to the next
    prefill. Light shape hooks on the vision tower, the projector, the language model and the model itself
    record *token counts only*: how many images/crops entered the tower (and at what resolution), how many
    rows entered the projector, the padded prompt length, each sample's valid length (``attention_mask``)
    and ``logits_to_keep``. The reductions come from ``handle.stats`` (``before_llm``/``projector`` events
    shorten the LLM entry, an ``in_llm`` event at layer K shortens layers K..L-1, ``in_vit`` events at
    layer l shorten vision blocks l.. of each image); ``analyse`` computes the FLOPs from the config.
    """

    def __init__(self, model, handle=None):
        self.model = model
        self.handle = _handle_of(model, handle)
        self.spec = model_spec(model)
        self.records: list[ForwardShapes] = []
        self._hooks: list = []
        self._cur: ForwardShapes | None = None
        self._calls: list = []
        self._rows = 0
        self._before: set = set()
        self._before_events: list = []

    def __enter__(self) -> "Tracker":
        m = self.model
        if self.spec.llm is not None:
            tower = get_path(m, "model.vision_tower") or get_path(m, "vision_tower")
            proj = get_path(m, "model.multi_modal_projector") or get_path(m, "multi_modal_projector")
            lm = get_path(m, "model.language_model") or get_path(m, "language_model")
            if tower is None or proj is None or lm is None:
                raise UnsupportedModel(f"cannot find the vision tower, projector and LM of {type(m).__name__}")
            self._hooks += [
                lm.register_forward_hook(self._lm_post, with_kwargs=True),
                m.register_forward_pre_hook(self._top_pre, with_kwargs=True),
                m.register_forward_hook(self._top_post, with_kwargs=True),
                tower.register_forward_pre_hook(self._tower_pre, with_kwargs=True),
                proj.register_forward_pre_hook(self._proj_pre, with_kwargs=True),
            ]
        else:
            self._hooks += [
                m.register_forward_pre_hook(self._vit_pre, with_kwargs=True),
                m.register_forward_hook(self._top_post, with_kwargs=True),
            ]
        return self

    def __exit__(self, *exc) -> None:
        while self._hooks:
            self._hooks.pop().remove()

    def _methods(self):
        return list(self.handle.methods) if self.handle is not None else []

    def _snapshot(self):
        # Hold the old events while their ids are compared: once the handle drops an old event, CPython
        # may give a new one the same id, and it would be taken for an old one (seen: ToMe's in_vit
        # events missing at random from the second batch on, so the vision FLOPs varied run to run).
        self._before_events = list(self.handle.stats) if self.handle is not None else []
        self._before = {id(e) for e in self._before_events}

    def _top_pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past and self.records:
            q = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
            self.records[-1].decode_steps.append(int(q))
            return None
        if ids is None:
            raise ValueError("vtok.eval.flops needs input_ids (visual spans and lengths come from them)")
        b, s = ids.shape
        mask = kwargs.get("attention_mask")
        two_d = mask is not None and mask.dim() == 2
        visual = torch.isin(ids, torch.tensor(self.spec.placeholder_ids or (-1,), device=ids.device))
        if two_d:
            visual &= mask.bool()
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            raise ValueError("vtok.eval.flops counts logits_to_keep given as an int")
        self._cur = ForwardShapes(
            batch=b,
            seq_len=s,
            lengths=[int(x) for x in (mask.sum(1).tolist() if two_d else [s] * b)],
            visual=[int(x) for x in visual.sum(1).tolist()],
            logits_to_keep=int(keep or 0),
            methods=self._methods() if bool(visual.any()) else [],
        )
        self._snapshot()
        return None

    def _vit_pre(self, module, args, kwargs):
        pix = _pixels(args, kwargs)
        if pix is None:
            raise ValueError(f"vtok.eval.flops found no image tensor in the inputs of {type(module).__name__}")
        n = int(pix.shape[0])
        self._cur = ForwardShapes(batch=n, seq_len=0, lengths=[0] * n, visual=[0] * n, methods=self._methods())
        self._calls = [(n, int(pix.shape[-2]), int(pix.shape[-1]))]
        self._snapshot()
        return None

    def _tower_pre(self, module, args, kwargs):
        pix = _pixels(args, kwargs)
        if pix is not None:
            self._calls.append((int(pix.shape[0]), int(pix.shape[-2]), int(pix.shape[-1])))
        return None

    def _proj_pre(self, module, args, kwargs):
        x = kwargs.get("image_features", args[0] if args else None)
        if x is not None:
            self._rows += int(x.numel() // x.shape[-1])
        return None

    def _lm_post(self, module, args, kwargs, output):
        # the LM's real input, after any splice (AnyRes newline tokens shrink with pooled grids)
        cur = self._cur
        if cur is None:
            return None
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        b, s = x.shape[:2]
        mask = kwargs.get("attention_mask")
        lens = mask.sum(1).tolist() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else [s] * b
        cur.entry = (int(s), [int(v) for v in lens])
        return None

    def _top_post(self, module, args, kwargs, output):
        cur, self._cur = self._cur, None
        if cur is None:
            return None
        cur.vision_calls, cur.projector_rows = self._calls, self._rows
        self._calls, self._rows = [], 0
        if self.handle is not None:
            cur.events = [e for e in self.handle.stats if id(e) not in self._before]
            if cur.seq_len and hasattr(self.handle, "probe_costs"):
                cur.probe_costs = list(self.handle.probe_costs)
        self.records.append(cur)
        return None

    def reports(self, **kw) -> list:
        """One report per recorded prefill (with its decode steps); keywords as for ``analyse``."""
        return [analyse(self.spec, r, **kw) for r in self.records]


def count(model, handle=None, *, convention: str = "exact", padded: bool = True, causal_skip: bool = False,
          output_tokens: int = 0, **inputs) -> FlopsReport:  # fmt: skip
    """FLOPs of one forward of ``model`` on ``inputs`` (the keyword arguments its forward takes).

    The forward runs once under ``torch.no_grad`` inside a ``Tracker`` to learn the token counts (with a
    vtok handle attached, its ``stats`` give the reductions); the FLOPs are then computed analytically from
    the config by ``analyse`` (its keywords: conventions, padding, decode): nothing is timed or traced.
    ``handle`` defaults to the one attached to ``model``. ``output_tokens=R`` adds the decode of R output
    tokens; pass ``logits_to_keep=1`` to count the prefill as ``generate`` runs it.
    """
    if not inputs:
        raise ValueError("count(model, handle, **inputs) needs the model's inputs, e.g. input_ids=..., pixel_values=...")
    with torch.no_grad(), Tracker(model, handle) as t:
        model(**inputs)
    if not t.records:
        raise RuntimeError("the forward did not reach the model's top-level module; nothing was recorded")
    return analyse(t.spec, t.records[-1], convention=convention, padded=padded, causal_skip=causal_skip,
                   output_tokens=output_tokens)  # fmt: skip


# ----------------------------------------------------------------------------- FlopCounterMode reference


@contextmanager
def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def native_mha(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs):
        b, nq, e = query
        nk = key[1]
        return 2 * b * nq * e * e + 4 * b * nk * e * e + 4 * b * nq * nk * e + 2 * b * nq * e * e

    mapping = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", cpu_flash), ("_native_multi_head_attention", native_mha)):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    fc = FlopCounterMode(display=False, custom_mapping=mapping)
    with fc:
        yield fc


def counted(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under ``torch.utils.flop_counter.FlopCounterMode``; return (result, flops).

    Two kernels FlopCounterMode has no formula for are added: the CPU SDPA kernel
    (``_scaled_dot_product_flash_attention_for_cpu``, counted like the CUDA SDPA kernels) and the fused
    ``nn.MultiheadAttention`` fast path (``_native_multi_head_attention``: q/k/v and output projections
    plus QK^T and AV), which it would otherwise count as zero.
    """
    with torch.no_grad(), _flop_counter() as fc:
        out = fn(*args, **kwargs)
    return out, int(fc.get_total_flops())


# ----------------------------------------------------------------------------- token layouts from a config


def _layout_adapter(config):
    """The vtok adapter of a config's model family, on a meta-device model built from a copy of the config:
    its layout code runs the model's own packing and pooling, with no weights and no memory."""
    from vtok.adapters import find_adapter

    model = meta_model(copy.deepcopy(config))
    return find_adapter(model)(model, {}, None)


def visual_layout(config, image_size=None, images: int = 1, frames: int = 0):
    """What the vision side runs for ``images`` images (of ``image_size`` (H, W)) and/or one video of ``frames``.

    Returns (tower crops, projector rows, visual tokens entering the LLM). LLaVA: one crop per image.
    LLaVA-NeXT / OneVision: the adapter's layouts (base + AnyRes crops, the unpadded grid with a newline
    per row, OneVision's ``anyres_max`` down-scaling and one crop per image when a prompt holds several;
    a video's pooled frames plus one newline), read from the model's own code on the meta device.
    """
    spec = model_spec(config)
    v = spec.vision
    n_sel = v.tokens() - (1 if spec.drop_cls else 0)
    mt = config.model_type
    crops = rows = tokens = 0
    adapter = _layout_adapter(config) if mt != "llava" and (images or frames) else None
    if images:
        if adapter is None:
            crops, tokens = images, images * n_sel
        else:
            sizes = torch.tensor([image_size or (v.image_size * 2, v.image_size * 2)] * images)
            prompt = {"batch_num_images": [images]}  # the images share one prompt
            crops = sum(adapter.num_patches(sizes, **prompt))
            tokens = sum(lay.length for lay in adapter.image_layouts(sizes, **prompt))
        rows = crops * n_sel
    if frames:
        if mt != "llava_onevision":
            raise ValueError(f"video layout is known for llava_onevision only, not {mt!r}")
        crops += frames
        rows += frames * n_sel
        tokens += adapter.video_layout(frames).length
    return crops, rows, tokens


def reductions_for(method, hparams: dict | None, visual_tokens: int, config=None, units: list[int] | None = None):
    """The ``Reduction`` events a method would record for one sample with ``visual_tokens`` visual tokens.

    The method says it (``Method.token_schedule``; ``units`` = tokens per image, default one unit); methods
    that cannot tell without running raise, and ``estimate`` then takes ``reductions=``.
    """
    from vtok.method import Method, get_method_class

    m = method if isinstance(method, Method) else get_method_class(method)(**(hparams or {}))
    return m, m.token_schedule(visual_tokens, units or [visual_tokens])


def estimate(config_or_name, *, text_tokens: int = 64, images: int = 1, image_size=None, frames: int = 0,
             method=None, reductions=None, output_tokens: int = 0, convention: str = "exact",
             causal_skip: bool = False, logits_to_keep: int = 1) -> FlopsReport:  # fmt: skip
    """FLOPs of one sample from a config alone (no weights): ``text_tokens`` text tokens plus the visual tokens of
    ``images`` images (``image_size`` (H, W) for AnyRes models) and/or a video of ``frames`` frames.
    ``config_or_name``: an HF config, or the name of a full-size config (``FULL_SIZE``).

    ``method``: a name, (name, hparams) or Method instance whose reductions follow from its budget
    (``reductions_for``); or give ``reductions`` (a list of ``vtok.Reduction``) directly.
    ``logits_to_keep=1`` counts the LM head on the last row, as ``generate`` does.
    """
    cfg = full_size_config(config_or_name) if isinstance(config_or_name, str) else config_or_name
    spec = model_spec(cfg)
    crops, rows, vis = visual_layout(cfg, image_size=image_size, images=images, frames=frames)
    methods, events = [], list(reductions or [])
    if method is not None:
        if reductions is not None:
            raise ValueError("give either method= or reductions=, not both")
        name, hp = (method, None) if not isinstance(method, tuple) else method
        units = None
        if cfg.model_type == "llava" and images:
            units = [vis // images] * images
        m, events = reductions_for(name, hp, vis, cfg, units)
        methods = [m]
    v = spec.vision
    h = w = v.image_size
    shapes = ForwardShapes(
        batch=1,
        seq_len=text_tokens + vis,
        lengths=[text_tokens + vis],
        visual=[vis],
        vision_calls=[(crops, h, w)] if crops else [],
        projector_rows=rows,
        logits_to_keep=logits_to_keep,
        events=events,
        methods=methods,
    )
    return analyse(spec, shapes, convention=convention, padded=True, causal_skip=causal_skip,
                   output_tokens=output_tokens)  # fmt: skip

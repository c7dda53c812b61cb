"""Shared machinery of LLaVA-style VLM adapters: the prefill's visual units, the before_llm splice,
the decode-step mapping onto shorter layouts, and what the caller gets back.

A subclass knows its family (tower, projector, LM, how projected features map to placeholders);
the in-LLM stage is the ``InLLMStage`` mixin (``llm_stage.py``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from vtok.hf_compat import (
    cache_from_kwargs,
    output_cache,
    precomputed_visual_features,
    replace_precomputed_visual_features,
)
from vtok.method import (
    AskModel,
    CallVideos,
    LLMAttention,
    Question,
    TextQuery,
    Transition,
    ViTAttention,
)
from vtok.tokens import VisualTokens

from .base import Adapter, InstanceWrap, per_thread
from .before_llm import BeforeLLMStage
from .caller_layout import (
    as_tuple,
    guard_cache,
    loss_labels,
    per_layer_to_caller_layout,
    to_caller_layout,
)
from .hf_llm import (
    SeqState,
    remap_mask,
)
from .hf_vision import (
    attention_module,
    config_patches,
    feature_block,
    has_cls_token,
    vision_blocks,
)
from .llm_stage import InLLMStage
from .vit import InViTRunner, check_vit_method, install_qkv_lora
from .vit_blocks import hf_attn_implementation, hf_block_parts

__all__ = ["VLMAdapter"]


@dataclass
class _Forward:
    prefill: bool
    active: bool = False
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    probes: dict = field(default_factory=dict)
    units: VisualTokens | None = None  # visual tokens entering before_llm
    spans: list = field(default_factory=list)  # per unit: sequence indices of its placeholders
    reduced: VisualTokens | None = None
    states: list = field(default_factory=list)  # SeqState per layout (entry, then one per in_llm stage)
    layer_kwargs: dict | None = None
    mask2d: torch.Tensor | None = None  # decode: 2-D mask of the current layout
    pos: torch.Tensor | None = None  # decode: position ids of the current layout
    labels: torch.Tensor | None = None
    vit_reduced: bool = False  # the units were already reduced inside the vision tower (in_vit)
    relaid: bool = False  # the before_llm output was laid out anew from native grids (AnyRes families)
    refed: int = 0  # decode: leading input tokens that were already in the cache (dropped, zero logits)
    method_state: dict = field(default_factory=dict)  # id(method) -> the dict its LLMViews share
    transitions: dict = field(default_factory=dict)  # layer -> sub-block tensors captured so far
    layouts: dict = field(default_factory=dict)  # AnyRes families: modality -> layouts of this prefill's features
    unit_layouts: list | None = None  # AnyRes families: the layout of each unit of this prefill

    def current(self):
        """The layout the sequence has now (a stage that removed nothing stores None, not a layout)."""
        return next(s for s in reversed(self.states) if s is not None)


@dataclass
class _Generation:
    """What a prefill leaves for the decode steps that follow it."""

    states: list
    orig_len: int
    cache: object = None


class VLMAdapter(BeforeLLMStage, InLLMStage, Adapter):
    stages = ("before_llm", "in_llm")
    probe_types = (ViTAttention, LLMAttention, Transition, TextQuery, Question, CallVideos, AskModel)

    # per-call state, one per thread (a model may serve several threads at once)
    _fw = per_thread()  # the forward in flight
    _gen = per_thread()  # what the last prefill left for the decode steps that follow it
    _captured = per_thread(dict)  # ViT probes captured while the vision tower ran
    _pending_labels = per_thread()
    _in_generate = per_thread()  # inside the model's generate (it may run the tower before any forward)
    _call_ids = per_thread()  # the input_ids generate was called with (its tower run precedes any forward)

    # subclass interface ------------------------------------------------------
    #: placeholder token id(s) whose positions hold visual features
    def placeholder_ids(self) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def core(self):
        """The module that takes input_ids/pixel_values and calls the language model."""
        return self.model.model

    @property
    def lm(self):
        return self.model.model.language_model

    def attach_vision(self) -> None:  # pragma: no cover - abstract
        """Install hooks on the vision side: a projector hook that calls ``capture_features`` and the
        ViT probe hooks that call ``capture_probe``."""
        raise NotImplementedError

    def build_units(self, features, input_ids) -> tuple[VisualTokens, list]:  # pragma: no cover - abstract
        """Projected features -> (VisualTokens, per-unit placeholder spans); validates the counts."""
        raise NotImplementedError

    def expand_encoder_outputs(self, mm_encoder_outputs: dict) -> dict:
        """The pre-computed features as the model's forward needs them (default: as given); a family may
        return a new dict, e.g. merged tokens from a direct ``get_image_features`` call laid out again."""
        return mm_encoder_outputs

    def features_from_encoder_outputs(self, mm_encoder_outputs: dict):  # pragma: no cover - abstract
        """The projected features held in ``mm_encoder_outputs`` (what ``generate`` pre-computes)."""
        raise NotImplementedError

    def hook_vit_probes(self) -> None:
        """A pre-hook on the attention of every tower block a ViTAttention probe names; the subclass's
        ``_make_vit_probe(probes)`` computes and captures the statistics."""
        by_layer: dict[int, list] = {}
        for m in self.all_methods():
            for p in m.probes():
                if isinstance(p, ViTAttention):
                    by_layer.setdefault(p.layer, []).append(p)
        blocks = vision_blocks(self.vision_tower)
        for layer, probes in by_layer.items():
            self.hook(attention_module(blocks[layer]), self._make_vit_probe(probes), pre=True)

    # capture (vision hooks call these; in generate the tower runs before the prefill forward) -----
    def capture_probe(self, probe, value) -> None:
        self._captured[probe] = value

    def capture_features(self, features) -> None:
        fw = self._fw
        if fw is not None and fw.prefill and fw.active and fw.units is None:
            fw.units, fw.spans = self.build_units(features, fw.input_ids)

    def vocab_size(self) -> int:
        cfg = self.model.config
        return getattr(getattr(cfg, "text_config", cfg), "vocab_size")

    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    # checks ------------------------------------------------------------------
    def num_llm_layers(self) -> int:
        return len(self.lm.layers)

    def dims(self) -> dict:
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        blocks = len(vision_blocks(self.vision_tower))
        return {
            "llm_hidden": text.hidden_size,
            "llm_layers": self.num_llm_layers(),
            "vision_hidden": cfg.vision_config.hidden_size,
            "vit_blocks": blocks,
            "vit_feature_block": feature_block(getattr(cfg, "vision_feature_layer", -1), blocks),
            "vision_cls": has_cls_token(self.vision_tower),
            "vit_tokens": config_patches(cfg.vision_config),  # patches per image (crop, frame), CLS excluded
        }

    def check_probe(self, probe, method) -> None:
        super().check_probe(probe, method)
        tok = getattr(self.handle.processor, "tokenizer", self.handle.processor)
        if isinstance(probe, AskModel) and not probe.optional and not callable(tok):
            raise ValueError(
                f"{method.name} asks the attached model about the visual tokens, which needs the model's tokenizer to "
                f"write the question and read the answer; pass vtok.apply(model, {method.name!r}, processor=processor) "
                "(the processor or tokenizer you prepare inputs with)"
            )
        if isinstance(probe, Question) and not probe.optional and not hasattr(tok, "decode"):
            raise ValueError(
                f"{method.name} reads the call's question, which vtok decodes with the model's tokenizer; pass "
                "vtok.apply(model, ..., processor=processor) (the processor or tokenizer you prepare inputs with)"
            )
        if isinstance(probe, ViTAttention):
            n = len(vision_blocks(self.vision_tower))
            if not -n <= probe.layer < n:
                raise ValueError(f"{method.name}: ViT probe layer {probe.layer} is outside the tower's blocks 0..{n - 1}")
            if probe.kind == "cls" and not has_cls_token(self.vision_tower):
                raise ValueError(
                    f"{method.name}: the vision tower {type(self.vision_tower).__name__} has no CLS token, so it "
                    "cannot serve ViTAttention(kind='cls'); use kind='colmean'"
                )

    # in_vit in the tower ----------------------------------------------------------
    def _feature_layer_blocks(self) -> int:
        """How many tower blocks feed the hidden state the model takes (vision_feature_layer)."""
        n = len(vision_blocks(self.vision_tower))
        return self.model.config.vision_feature_layer % (n + 1)

    def num_vit_blocks(self) -> int | None:
        return self._feature_layer_blocks() if isinstance(self.model.config.vision_feature_layer, int) else None

    def install_tower_runner(self, method, *, protected: int, on_reset, groups=None) -> InViTRunner:
        """The in_vit runner in this model's vision tower, installed, with the method's q/k/v low-rank updates
        (``qkv_lora``) in place first; ``groups``: rows -> the video of each tower row, or None."""
        tower = self.vision_tower
        parts = hf_block_parts(tower)
        runner = InViTRunner(
            self, method, parts, protected=protected, active=self._feature_layer_blocks(), track_source=True,
            attn_implementation=lambda: hf_attn_implementation(tower), on_reset=on_reset, tower=tower, groups=groups,
        )
        if callable(getattr(method, "qkv_lora", None)):
            install_qkv_lora(self, parts, method)
        runner.install()
        return runner

    def validate_tower_method(self, method, drops_cls: bool) -> None:
        """Refuse an in_vit method this tower cannot run (before any hook is installed); ``drops_cls``: the
        model drops token 0 of the tower output (vision_feature_select_strategy='default')."""
        hf_block_parts(self.vision_tower)  # raises for block structures vtok does not know
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"{method.name} merges tokens inside the vision tower, so every hidden state has its own token count; "
                f"this model concatenates several feature layers (vision_feature_layer={layer}), which cannot work. "
                "Use a before_llm method instead"
            )
        if self._feature_layer_blocks() == 0:
            raise ValueError(
                f"{method.name}: vision_feature_layer={layer} selects the patch embeddings, before any tower block; "
                "there is no block to reduce in"
            )
        if drops_cls and not getattr(method, "protect_cls", True):
            raise ValueError(
                f"{method.name}: this model drops token 0 of the tower output (vision_feature_select_strategy="
                "'default'), so token 0 must stay unmerged; use protect_cls=True"
            )
        check_vit_method(method, hf_attn_implementation(self.vision_tower), self._feature_layer_blocks())

    # attach ------------------------------------------------------------------
    def attach(self) -> None:
        self._fw: _Forward | None = None
        self._gen: _Generation | None = None
        self._captured: dict = {}  # ViT probes captured while the vision tower ran
        self._pending_labels = None
        self.hook(self.model, self._top_pre, pre=True)
        self.hook(self.model, self._top_post, pre=False)
        self.hook(self.core, self._core_pre, pre=True)
        self.hook(self.lm, self._lm_pre, pre=True)
        self._hooks.append(InstanceWrap(self.model, "generate", self._wrap_generate))
        self.attach_vision()
        # in_llm steps: (layer, method) in layer order, methods of one layer in chain order
        chain = self.methods.get("in_llm", [])
        self._steps = sorted(
            ((layer, i, m) for i, m in enumerate(chain) for layer in sorted(set(m.llm_layers()))),
            key=lambda t: (t[0], t[1]),
        )
        self._steps = [(layer, m) for layer, _, m in self._steps]
        self._stage_layers = sorted({layer for layer, _ in self._steps})
        if self._stage_layers:
            for layer in range(self._stage_layers[0], len(self.lm.layers)):
                self.hook(self.lm.layers[layer], self._make_layer_pre(layer), pre=True)
        probe_layers, transition_layers = {}, {}
        for m in self.all_methods():
            for p in m.probes():
                if isinstance(p, LLMAttention):
                    probe_layers.setdefault(p.layer, []).append(p)
                elif isinstance(p, Transition):
                    transition_layers.setdefault(p.layer, set()).add(p.stats)
        for layer, probes in probe_layers.items():
            self.hook(self.lm.layers[layer].self_attn, self._make_probe_pre(probes), pre=True)
        for layer, kinds in sorted(transition_layers.items()):
            self._hook_transition(layer, vectors=False in kinds, stats=True in kinds)

    def _wrap_generate(self, orig):
        """Refuse assisted / prompt-lookup decoding for in_llm methods: its first forward feeds the prompt
        together with the candidate tokens, so the method's query rows (the last token, the text after the
        image) would include tokens that are not the prompt, and the output would differ from greedy."""

        @functools.wraps(orig)
        def generate(*args, **kwargs):
            cfg = kwargs.get("generation_config")
            assisted = any(
                kwargs.get(k) is not None or getattr(cfg, k, None) is not None
                for k in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
            )
            chain = [m for m in self.methods.get("in_llm", []) if not m.at_noop()]
            if assisted and chain:
                raise ValueError(
                    f"{chain[0].name} prunes inside the LLM, but assisted decoding (assistant_model / prompt lookup) "
                    "feeds the prompt together with candidate tokens in the first forward, so its query rows would "
                    "include tokens that are not part of the prompt. Generate without an assistant, or use a method "
                    "that reduces before the LLM (those work with assisted decoding)"
                )
            outer = self._in_generate, self._call_ids
            self._in_generate = True
            self._call_ids = kwargs.get("input_ids", args[0] if args else None)
            try:
                return orig(*args, **kwargs)
            finally:
                self._in_generate, self._call_ids = outer

        return generate

    def direct_call(self) -> bool:
        """True when the model's pieces (``get_image_features``) are called by the user, not by the
        model's own forward or generate."""
        return self._fw is None and not self._in_generate

    # top level: labels, loss and what the caller gets back ------------------------------------
    def _top_pre(self, module, args, kwargs):
        """The loss is computed after the forward, on the layout the LLM really ran (see ``_top_post``);
        the output is a dict inside and turned into a tuple at the end if the caller asked for one."""
        labels = {k: kwargs.pop(k) for k in ("labels", "shift_labels") if kwargs.get(k) is not None}
        loss_kw = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        keep = kwargs.get("logits_to_keep", 0)
        if isinstance(keep, torch.Tensor):
            if keep.numel() == 1:
                keep = int(keep)
            else:
                raise ValueError(
                    "vtok maps logits back to the caller's sequence for logits_to_keep given as an int (the last "
                    "rows); with a method attached, pass an int, or compute the rows you need from all logits"
                )
        self._pending_labels = (labels, loss_kw, int(keep or 0), kwargs.get("return_dict") is False)
        if kwargs.get("return_dict") is False:
            kwargs["return_dict"] = True
        return args, kwargs

    def _top_post(self, module, args, kwargs, output):
        fw = self._fw
        (labels, loss_kw, keep, want_tuple), self._pending_labels = self._pending_labels, None
        if fw is not None:
            if fw.prefill and fw.active and self._gen is not None:
                self._gen.cache = output_cache(output)
                if any(st is not None and not st.is_identity() for st in fw.states):
                    guard_cache(self._gen.cache, self.handle)
            final = next((s for s in reversed(fw.states) if s is not None and not s.is_identity()), None)
            logits = getattr(output, "logits", None)
            reduced = final is not None and fw.prefill and logits is not None
            if "labels" in labels:  # as HF: a loss when labels are given (shift_labels, if given, win)
                lab, shift = loss_labels(labels, final if reduced else None, fw.input_ids.shape[1])
                output.loss = module.loss_function(
                    logits=logits, labels=lab, shift_labels=shift, vocab_size=self.vocab_size(), **loss_kw
                )
            if reduced:
                output.logits = to_caller_layout(logits, final, fw.input_ids.shape[1], keep)
                per_layer_to_caller_layout(output, fw.states, self._steps, fw.input_ids.shape[1])
            elif fw.refed and logits is not None and not keep:  # re-fed tokens get zero rows
                output.logits = torch.nn.functional.pad(logits, (0, 0, fw.refed, 0))
        elif "labels" in labels:  # a text-only or pass-through call: the model's own loss path
            output.loss = module.loss_function(
                logits=output.logits, vocab_size=self.vocab_size(), **labels, **loss_kw
            )
        self._fw = None
        self._captured = {}
        return as_tuple(output) if want_tuple else output

    # forward start -------------------------------------------------------------
    def _core_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = cache_from_kwargs(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            self._gen = None
            has_visual = input_ids is not None and bool(torch.isin(input_ids, self._placeholder_tensor(input_ids)).any())
            mask = kwargs.get("attention_mask")
            reason = self._passthrough_reason(input_ids, has_visual, mask, kwargs)
            self.handle.note_passthrough(reason)
            self._fw = _Forward(
                prefill=True,
                active=has_visual and reason is None,
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=kwargs.get("position_ids"),
            )
            self.handle.stats.clear()  # stats describe the last prefill, also a text-only one
            self.handle.probe_costs.clear()
            if has_visual and reason is None:
                mm = precomputed_visual_features(kwargs)
                if mm:
                    given = mm
                    mm = self.expand_encoder_outputs(mm)
                    feats = self.features_from_encoder_outputs(mm)
                    if feats is not None:
                        self._fw.units, self._fw.spans = self.build_units(feats, input_ids)
                    if mm is not given:
                        replace_precomputed_visual_features(kwargs, mm)
                        return args, kwargs
        else:
            if self._gen is not None and self._gen.cache is not cache:
                self._gen = None
            self._fw = _Forward(prefill=False)
        return None

    def _passthrough_reason(self, input_ids, has_visual, mask, kwargs) -> str | None:
        """Why this prefill runs the untouched model (HF serves it, vtok cannot reduce it), or None.

        Calls whose visual tokens an in_vit method would already have merged inside the tower cannot run
        untouched: they are refused."""
        visual_inputs = self._has_visual_inputs(kwargs) or precomputed_visual_features(kwargs) is not None
        reason = None
        if input_ids is None and visual_inputs:
            reason = "the call gave inputs_embeds without input_ids (vtok finds visual spans from input_ids)"
        elif has_visual and mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            reason = (
                "the call gave a prepared attention mask (4-D, or a dict of masks per attention type: a static "
                "cache or compiled generate builds one); vtok shortens sequences from a 2-D [batch, seq] mask"
            )
        elif has_visual and not visual_inputs:
            reason = "input_ids hold image/video placeholders but the call gave no pixel values (the model embeds them as text)"
        shaper = self._feature_method()
        if reason is not None and visual_inputs and shaper is not None:
            where = "inside the vision tower" if shaper is self.method("in_vit") else "in place of the projector"
            raise ValueError(
                f"vtok cannot serve this call: {reason}, and {shaper.name} reduces tokens {where}, so the untouched "
                "model would not fit them either. Pass input_ids (as the processor made them), a 2-D attention_mask "
                "and pixel_values"
            )
        return reason

    def _feature_method(self):
        """The method that shapes the features the placeholders get (in_vit or projector), or None."""
        return self.method("in_vit") or self.method("projector")

    def _placeholder_tensor(self, ref):
        return torch.tensor(self.placeholder_ids(), device=ref.device)

    def _has_visual_inputs(self, kwargs) -> bool:
        return any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))

    # LM entry ------------------------------------------------------------------
    def _lm_pre(self, module, args, kwargs):
        fw = self._fw
        if fw is None:
            return None
        if fw.prefill:
            return self._lm_prefill(kwargs) if fw.active else None
        return self._lm_decode(kwargs)

    def _lm_prefill(self, kwargs):
        fw = self._fw
        self._run_before_llm()
        embeds = kwargs["inputs_embeds"]
        b, s0, _ = embeds.shape
        dev = embeds.device
        valid = fw.attention_mask.bool() if fw.attention_mask is not None else torch.ones(b, s0, dtype=torch.bool, device=dev)
        pos = fw.position_ids
        if pos is None:
            pos = torch.arange(s0, device=dev).expand(b, s0)
        pos = pos.expand(b, s0)
        visual = torch.isin(fw.input_ids, self._placeholder_tensor(fw.input_ids))
        state = SeqState.original(valid, pos, visual)
        out, chain = fw.reduced, self.methods.get("before_llm", [])
        changed = out is not None and (
            fw.vit_reduced
            or fw.relaid
            or out.features.shape != fw.units.features.shape
            or not torch.equal(out.features, fw.units.features)
        )
        if changed:
            # the policy of the method that produced the final tokens (the chain's last, else the projector
            # stage's or in_vit's)
            if chain:
                policy = chain[-1].position_policy_at("before_llm")
            else:
                stage = "projector" if self.method("projector") is not None else "in_vit"
                policy = self.method(stage).position_policy_at(stage)
            if self.needs_relayout(out, fw.units):
                state, embeds = self.relayout(out, fw.spans, embeds, state, policy)
                kwargs["inputs_embeds"] = embeds
            else:
                keep = valid & ~visual
                embeds = embeds.clone()
                self.place_reduced(out, fw.spans, keep, embeds)
                state = state.compact(keep, policy)
                kwargs["inputs_embeds"] = state.gather(embeds)
            kwargs["attention_mask"] = state.valid.long()
            kwargs["position_ids"] = state.positions
        fw.states = [state]
        self._gen = _Generation(states=fw.states, orig_len=s0)
        return (), kwargs

    def _lm_decode(self, kwargs):
        fw, gen = self._fw, self._gen
        if gen is None:
            return None
        entry = gen.states[0]
        embeds = kwargs.get("inputs_embeds")
        b, q = embeds.shape[:2]
        dev = embeds.device
        cache = cache_from_kwargs(kwargs)
        decoded = cache.get_seq_length() - entry.length
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(
                "vtok needs a 2-D attention_mask [batch, seq] during decoding (got a prepared mask); decode a "
                "reduced prefill with a dynamic cache"
            )
        # How long the caller's sequence is now: its 2-D mask, else the positions it computed (HF numbers a
        # cache-continuing call from the cache's length, which is the pruned one). A one-token step cannot
        # re-feed anything, so the positions are read (a host sync) only for longer calls.
        given_pos = kwargs.get("position_ids")
        total = None
        if mask is not None:
            total = mask.shape[1]
        elif given_pos is not None and q > 1:
            total = int(given_pos[:, -1].max()) + 1
        if total is not None and total != gen.orig_len + decoded + q:
            # The caller counts the sequence in its own (full) layout while the cache holds the pruned one:
            # a new turn of a chat that reuses the cache re-feeds tokens that are already cached. Keep only
            # the new ones; the caller gets its rows back, the re-fed ones as zeros.
            refed = gen.orig_len + decoded + q - total
            if not 0 < refed < q:
                raise ValueError(
                    f"vtok: this call continues a sequence of {total} tokens, but the KV cache holds the "
                    f"{gen.orig_len} prompt tokens (pruned inside) and {decoded} more, and {q} tokens are new; pass "
                    "the conversation's full ids and attention mask with the cache, or start a new prefill without it"
                )
            if mask is None and given_pos is not None:  # HF's positions continued from the pruned length
                kwargs["position_ids"] = (total - (q - refed) + torch.arange(q - refed, device=dev)).expand(b, -1)
                given_pos = None
            embeds = embeds[:, refed:]
            kwargs["inputs_embeds"] = embeds
            if given_pos is not None:
                kwargs["position_ids"] = given_pos[:, refed:]
            fw.refed, q = refed, q - refed
        if mask is None:
            mask = torch.ones(b, gen.orig_len + decoded + q, dtype=torch.long, device=dev)
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = (gen.orig_len + decoded + torch.arange(q, device=dev)).expand(b, q)
        if not entry.is_identity():
            mask = remap_mask(entry, mask)
            pos = pos - entry.shift.unsqueeze(1)
            kwargs["attention_mask"], kwargs["position_ids"] = mask, pos
        fw.mask2d, fw.pos = mask, pos
        return (), kwargs

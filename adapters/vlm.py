"""Shared machinery of LLaVA-style VLM adapters: before_llm splicing, in_llm compaction, decode.

A subclass knows its model family: where the vision tower, projector and language model are,
and how projected features map to placeholder tokens (``visual_tokens``). This class does the
rest for any HF decoder LM: it shortens the sequence at the LM entry (before_llm) and at decoder
layer K (in_llm), keeps per-layer KV-cache lengths consistent during ``generate``, and maps
decode-step masks and positions to the shorter layouts.

Prefill: a forward whose cache is empty (or absent) and whose input_ids hold visual placeholders.
Decode: a forward with a non-empty cache that is the one returned by our last prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vtok.hf_compat import cache_from_kwargs, output_cache, precomputed_visual_features
from vtok.method import (
    LLM_PROBES,
    AttentionScores,
    LLMAttention,
    LLMStep,
    LLMView,
    TextQuery,
    Transition,
    Transitions,
    ViTAttention,
)
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

from .base import Adapter, per_thread
from .hf_llm import (
    SeqState,
    attention_scores,
    build_layer_kwargs,
    decoder_input_norm,
    last_valid_index,
    query_rows,
    remap_mask,
)
from .hf_vision import attention_module, has_cls_token, vision_blocks

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
    refed: int = 0  # decode: leading input tokens that were already in the cache (dropped, zero logits)
    method_state: dict = field(default_factory=dict)  # id(method) -> the dict its LLMViews share
    transitions: dict = field(default_factory=dict)  # layer -> sub-block tensors captured so far

    def current(self):
        """The layout the sequence has now (a stage that removed nothing stores None, not a layout)."""
        return next(s for s in reversed(self.states) if s is not None)


@dataclass
class _Generation:
    """What a prefill leaves for the decode steps that follow it."""

    states: list
    orig_len: int
    cache: object = None


class VLMAdapter(Adapter):
    stages = ("before_llm", "in_llm")
    probe_types = (ViTAttention, LLMAttention, Transition, TextQuery)

    # per-call state, one per thread (a model may serve several threads at once)
    _fw = per_thread()  # the forward in flight
    _gen = per_thread()  # what the last prefill left for the decode steps that follow it
    _captured = per_thread(dict)  # ViT probes captured while the vision tower ran
    _pending_labels = per_thread()

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

    def check_probe(self, probe, method) -> None:
        super().check_probe(probe, method)
        if isinstance(probe, ViTAttention):
            n = len(vision_blocks(self.vision_tower))
            if not -n <= probe.layer < n:
                raise ValueError(f"{method.name}: ViT probe layer {probe.layer} is outside the tower's blocks 0..{n - 1}")
            if probe.kind == "cls" and not has_cls_token(self.vision_tower):
                raise ValueError(
                    f"{method.name}: the vision tower {type(self.vision_tower).__name__} has no CLS token, so it "
                    "cannot serve ViTAttention(kind='cls'); use kind='colmean'"
                )

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
        probe_layers, transition_layers = {}, set()
        for m in self.all_methods():
            for p in m.probes():
                if isinstance(p, LLMAttention):
                    probe_layers.setdefault(p.layer, []).append(p)
                elif isinstance(p, Transition):
                    transition_layers.add(p.layer)
        for layer, probes in probe_layers.items():
            self.hook(self.lm.layers[layer].self_attn, self._make_probe_pre(probes), pre=True)
        for layer in sorted(transition_layers):
            self._hook_transition(layer)

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
                    _guard_cache(self._gen.cache, self.handle)
            final = next((s for s in reversed(fw.states) if s is not None and not s.is_identity()), None)
            logits = getattr(output, "logits", None)
            reduced = final is not None and fw.prefill and logits is not None
            if "labels" in labels:  # as HF: a loss when labels are given (shift_labels, if given, win)
                lab, shift = self._loss_labels(labels, final if reduced else None, fw.input_ids.shape[1])
                output.loss = module.loss_function(
                    logits=logits, labels=lab, shift_labels=shift, vocab_size=self.vocab_size(), **loss_kw
                )
            if reduced:
                output.logits = _to_caller_layout(logits, final, fw.input_ids.shape[1], keep)
            elif fw.refed and logits is not None and logits.shape[1] > 1 or fw.refed and not keep:
                output.logits = torch.nn.functional.pad(logits, (0, 0, fw.refed, 0))
        elif "labels" in labels:  # a text-only or pass-through call: the model's own loss path
            output.loss = module.loss_function(
                logits=output.logits, vocab_size=self.vocab_size(), **labels, **loss_kw
            )
        self._fw = None
        self._captured = {}
        return _as_tuple(output) if want_tuple else output

    @staticmethod
    def _loss_labels(labels: dict, final, s0: int):
        """(labels, shift_labels) for the loss on the layout the LLM ran: the loss of the reduced sequence
        (each kept token predicts the next *kept* token), which for a before_llm method is the loss of the
        equivalent shorter prompt. Without a reduction, the caller's own labels."""
        if final is None:
            return labels.get("labels"), labels.get("shift_labels")
        if labels.get("shift_labels") is not None:  # label of token i + 1 at i: rebuild each token's own label
            nxt = labels["shift_labels"]
            own = torch.nn.functional.pad(nxt[:, :-1], (1, 0), value=-100)
            after = nxt[:, -1:]
        else:
            own = labels["labels"]
            after = torch.full_like(own[:, :1], -100)
        ext = torch.cat([own, torch.full_like(own[:, :1], -100)], dim=1)  # slot s0: padding
        gathered = ext.gather(1, torch.where(final.valid, final.orig_index, s0).to(own.device))
        if labels.get("shift_labels") is not None:
            return None, torch.cat([gathered[:, 1:], after], dim=1)
        return gathered, None

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
                    feats = self.features_from_encoder_outputs(mm)
                    if feats is not None:
                        self._fw.units, self._fw.spans = self.build_units(feats, input_ids)
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
        elif has_visual and mask is not None and mask.dim() != 2:
            reason = (
                "the call gave a prepared 4-D attention mask (a static cache or compiled generate builds one); "
                "vtok shortens sequences from a 2-D [batch, seq] mask"
            )
        elif has_visual and not visual_inputs:
            reason = "input_ids hold image/video placeholders but the call gave no pixel values (the model embeds them as text)"
        if reason is not None and visual_inputs and self.method("in_vit") is not None:
            raise ValueError(
                f"vtok cannot serve this call: {reason}, and {self.method('in_vit').name} merges tokens inside the "
                "vision tower, so the untouched model would not fit them either. Pass input_ids (as the processor "
                "made them), a 2-D attention_mask and pixel_values"
            )
        return reason

    def _placeholder_tensor(self, ref):
        return torch.tensor(self.placeholder_ids(), device=ref.device)

    def _has_visual_inputs(self, kwargs) -> bool:
        return any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))

    # before_llm ----------------------------------------------------------------
    def _run_before_llm(self) -> None:
        fw = self._fw
        chain = self.methods.get("before_llm", [])
        if not chain:
            if fw.vit_reduced:  # an in_vit stage already shortened the units: splice them as they are
                fw.reduced = fw.units
            return
        if fw.units is None:
            raise RuntimeError("the visual features of this prefill were not captured")
        units = fw.units
        for method in chain:  # a chain: each method gets what the previous one returned
            probes = self._collect_probes(method, ("vit", "text"))
            out = method.before_llm(units, probes)
            if not isinstance(out, VisualTokens):
                raise TypeError(f"{method.name}.before_llm must return VisualTokens, got {type(out).__name__}")
            self._record_units(method, "before_llm", units, out)
            units = out
        fw.reduced = units

    def _collect_probes(self, method, kinds=("vit", "text", "llm"), before_layer=None):
        """The method's probes of the given kinds; LLM probes only those of layers before ``before_layer``
        (a probe is computed when its layer runs, so a stage at layer L sees the probes of layers < L)."""
        fw = self._fw
        fw.probes.update(self._captured)
        res = {}
        for p in method.probes():
            kind = "text" if isinstance(p, TextQuery) else "llm" if isinstance(p, LLM_PROBES) else "vit"
            if kind not in kinds or (kind == "llm" and before_layer is not None and p.layer >= before_layer):
                continue
            if kind == "text":
                res[p] = self._text_query()
            elif p in fw.probes:
                res[p] = fw.probes[p]
            else:
                raise ValueError(
                    f"{method.name} needs {p!r}, which was not computed in this forward "
                    "(were the visual features passed in pre-computed, without running the vision tower?)"
                )
        return res

    def _text_query(self):
        fw = self._fw
        ids = fw.input_ids
        text = ~torch.isin(ids, self._placeholder_tensor(ids))
        if fw.attention_mask is not None:
            text &= fw.attention_mask.bool()
        emb = self.lm.get_input_embeddings()
        out = []
        for b in range(ids.shape[0]):
            t = ids[b][text[b]]
            out.append((t, emb(t)))
        return out

    def _record_units(self, method, stage, units: VisualTokens, out: VisualTokens):
        b = int(self._fw.input_ids.shape[0])
        owner = units.owner.tolist()
        n_in, n_out = units.counts().tolist(), out.counts().tolist()
        tin, tout = [0] * b, [0] * b
        kept = [[] for _ in range(b)]
        offset = [0] * b
        for u, o in enumerate(owner):
            tin[o] += n_in[u]
            tout[o] += n_out[u]
            p = out.positions[u, : n_out[u]]
            pin = units.positions[u, : n_in[u]]
            if not torch.equal(pin, torch.arange(n_in[u], device=pin.device)):
                # positions are original patch indices (after in_vit or an earlier method of the chain):
                # kept indexes the tokens that entered this method
                order = torch.argsort(pin)
                p = order[torch.searchsorted(pin[order].contiguous(), p.contiguous()).clamp_max(max(n_in[u] - 1, 0))]
            kept[o].append(p + offset[o])
            offset[o] += n_in[u]
        kept_t = None
        if getattr(method, "kept_meaningful", True):
            kept_t = [torch.cat(k).sort().values.cpu() if k else torch.zeros(0, dtype=torch.long) for k in kept]
        self.handle.stats.append(Reduction(method.name, stage, None, tin, tout, kept_t))

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
            or out.features.shape != fw.units.features.shape
            or not torch.equal(out.features, fw.units.features)
        )
        if changed:
            keep = valid & ~visual
            embeds = embeds.clone()
            self.place_reduced(out, fw.spans, keep, embeds)
            # the policy of the method that produced the final tokens (the chain's last, else in_vit's)
            policy = (chain[-1] if chain else self.method("in_vit")).position_policy
            state = state.compact(keep, policy)
            kwargs["inputs_embeds"] = state.gather(embeds)
            kwargs["attention_mask"] = state.valid.long()
            kwargs["position_ids"] = state.positions
        fw.states = [state]
        self._gen = _Generation(states=fw.states, orig_len=s0)
        return (), kwargs

    def place_reduced(self, out: VisualTokens, spans: list, keep: torch.Tensor, embeds: torch.Tensor) -> None:
        """Put each unit's surviving tokens into placeholder slots of its span (in place).

        ``keep`` [B, S] starts with the text tokens; the slots set here survive. A token goes to the
        slot of its ``position`` when positions are unique (so original RoPE positions stay
        meaningful); otherwise the unit's first slots are used in output order. Families with
        layout tokens (image newlines) override this to re-insert them.
        """
        counts = out.counts().tolist()
        for u, span in enumerate(spans):
            b_u = int(out.owner[u])
            k = counts[u]
            p = out.positions[u, :k]
            ok = k == 0 or (torch.unique(p).numel() == k and bool((p < span.numel()).all()))
            slots = span[p] if ok else span[:k]
            keep[b_u, slots] = True
            embeds[b_u, slots] = out.features[u, :k].to(embeds.dtype)

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
        if mask is not None and mask.dim() != 2:
            raise ValueError("vtok needs a 2-D attention_mask [batch, seq] during decoding (got a 4-D mask)")
        # How long the caller's sequence is now: its 2-D mask, else the positions it computed (HF numbers a
        # cache-continuing call from the cache's length, which is the pruned one).
        given_pos = kwargs.get("position_ids")
        total = mask.shape[1] if mask is not None else int(given_pos[:, -1].max()) + 1 if given_pos is not None else None
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

    # in_llm --------------------------------------------------------------------
    def _scores(self, attn, normed, position_embeddings, state: SeqState, query, layer) -> AttentionScores:
        """An attention probe of ``query`` over the keys of ``state``'s layout; logs what it computed."""
        rows = query_rows(query, state.valid, state.visual, _segments(state)[1])
        per_key, padded_rows = attention_scores(attn, normed, position_embeddings, state.valid, rows)
        n_rows = state.valid.sum(1) if rows is None else rows[1].sum(1)
        self.handle.probe_costs.append(
            {
                "layer": layer,
                "batch": int(state.valid.shape[0]),
                "padded_rows": int(padded_rows),
                "padded_keys": int(state.length),
                "rows": [int(x) for x in n_rows.tolist()],
                "keys": [int(x) for x in state.valid.sum(1).tolist()],
            }
        )
        mass = (per_key * state.visual).sum(1)
        return AttentionScores(per_key, mass, state.orig_index, state.valid)

    def _make_probe_pre(self, probes):
        def pre(module, args, kwargs):
            fw = self._fw
            if fw is None or not fw.prefill or not fw.active:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for p in probes:
                fw.probes[p] = self._scores(module, hidden, kwargs["position_embeddings"], fw.current(), p.query, p.layer)
            return None

        return pre

    def _hook_transition(self, layer: int) -> None:
        """Sub-block inputs/outputs of one decoder layer at the visual tokens, from the model's own forward."""
        dec = self.lm.layers[layer]

        def grab(name, x):
            fw = self._fw
            if fw is None or not fw.prefill or not fw.active:
                return
            state = fw.current()
            rows = fw.transitions.setdefault(layer, {})
            rows[name] = [x[b, idx.to(x.device)].detach() for b, idx in enumerate(state.visual_index())]
            if len(rows) == 4:
                fw.probes[Transition(layer)] = Transitions(
                    rows["attn_in"], rows["attn_out"], rows["mlp_in"], rows["mlp_out"],
                    [state.orig_index[b, idx] for b, idx in enumerate(state.visual_index())],
                )  # fmt: skip

        def first(args, kwargs, key):
            return kwargs[key] if key in kwargs else args[0]

        self.hook(dec.self_attn, lambda m, a, k: grab("attn_in", first(a, k, "hidden_states")), pre=True)
        self.hook(dec.self_attn, lambda m, a, k, out: grab("attn_out", out[0] if isinstance(out, tuple) else out), pre=False)
        self.hook(dec.mlp, lambda m, a, k: grab("mlp_in", first(a, k, "x")), pre=True)
        self.hook(dec.mlp, lambda m, a, k, out: grab("mlp_out", out), pre=False)

    def _make_layer_pre(self, layer):
        steps = [i + 1 for i, (lay, _) in enumerate(self._steps) if lay == layer]  # their states' indices

        def pre(module, args, kwargs):
            fw = self._fw
            if fw is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if fw.prefill:
                if not fw.active:
                    return None
                if steps:
                    hidden = self._prefill_stage(layer, hidden, kwargs)
            else:
                gen = self._gen
                if gen is None:
                    return None
                changed = False
                for i in steps:
                    state = gen.states[i]
                    if state is not None:
                        fw.mask2d = remap_mask(state, fw.mask2d)
                        fw.pos = fw.pos - state.step_shift.unsqueeze(1)
                        changed = True
                if changed:
                    fw.layer_kwargs = build_layer_kwargs(
                        self.lm, hidden, fw.mask2d, fw.pos, cache_from_kwargs(kwargs), layer
                    )
            if fw.layer_kwargs is None:
                return None
            kwargs.update(fw.layer_kwargs)
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return pre

    def _view(self, layer, method, hidden, state: SeqState) -> LLMView:
        fw = self._fw
        before, after = _segments(state)

        def attend(query):
            dec = self.lm.layers[layer]
            normed = decoder_input_norm(dec)(hidden)
            pe = self.lm.rotary_emb(hidden, position_ids=state.positions)
            return self._scores(dec.self_attn, normed, pe, state, query, layer)

        return LLMView(
            layer,
            hidden,
            state.valid,
            state.visual,
            state.visual_index(),
            self._collect_probes(method, before_layer=layer),
            positions=state.positions,
            orig_index=state.orig_index,
            text_before=before,
            text_after=after,
            last=last_valid_index(state.valid),
            state=fw.method_state.setdefault(id(method), {}),
            attend=attend,
        )

    def _prefill_stage(self, layer, hidden, kwargs):
        """Run every in_llm step of this layer (chain order); each may drop and merge visual tokens."""
        fw = self._fw
        for method in [m for lay, m in self._steps if lay == layer]:
            prev = fw.current()
            view = self._view(layer, method, hidden, prev)
            step = _as_step(method, method.in_llm(view), view)
            keep = prev.valid & ~prev.visual
            for b, (idx, k) in enumerate(zip(view.visual_index, step.kept)):
                keep[b, idx[k.to(idx.device)]] = True
            self.handle.stats.append(
                Reduction(
                    method.name,
                    "in_llm",
                    layer,
                    [int(i.numel()) for i in view.visual_index],
                    [int(k.numel()) for k in step.kept],
                    [k.cpu() for k in step.kept],
                )
            )
            if torch.equal(keep, prev.valid):
                fw.states.append(None)
                if step.hidden is None:
                    continue
                state = prev
            else:
                state = prev.compact(keep, method.position_policy)
                fw.states.append(state)
                hidden = state.gather(hidden)
            if step.hidden is not None:  # merges: the kept visual tokens take the method's hidden states
                hidden = hidden.clone()
                for b, (idx, h) in enumerate(zip(state.visual_index(), step.hidden)):
                    hidden[b, idx] = h.to(hidden.dtype)
            fw.layer_kwargs = build_layer_kwargs(
                self.lm, hidden, state.valid.long(), state.positions, cache_from_kwargs(kwargs), layer
            )
        return hidden


class _PrunedCacheGuard:
    """Stands in for ``update`` on a KV cache that holds a pruned prefill (on that instance only): once the
    handle that pruned it is removed, the untouched model cannot continue it, and says so."""

    def __init__(self, update, handle):
        import weakref

        self.update, self.handle = update, weakref.ref(handle)  # a copy of the cache must not copy the model

    def __call__(self, *args, **kwargs):
        handle = self.handle()
        if handle is None or not handle.attached:
            raise ValueError(
                "vtok: this KV cache holds a prompt that vtok pruned, and the vtok handle that pruned it was "
                "removed; the untouched model cannot continue it (its lengths do not match the prompt). Finish "
                "the generation before handle.remove(), or run the prompt again without this cache"
            )
        return self.update(*args, **kwargs)


def _guard_cache(cache, handle) -> None:
    if cache is not None and not isinstance(cache.__dict__.get("update"), _PrunedCacheGuard):
        cache.update = _PrunedCacheGuard(cache.update, handle)


def _as_tuple(output) -> tuple:
    """What ``return_dict=False`` gives: the set fields in the output class's field order (loss first)."""
    import dataclasses

    return tuple(v for v in (getattr(output, f.name) for f in dataclasses.fields(output)) if v is not None)


def _to_caller_layout(logits, final: SeqState, s0: int, keep: int):
    """Logits of the reduced layout in the caller's: [B, s0, V] with zeros at removed tokens, or, for
    ``logits_to_keep=k``, the caller's last k positions [B, k, V]."""
    b, rows, v = logits.shape
    idx = torch.where(final.valid, final.orig_index, s0)
    if rows != final.length:  # logits_to_keep: the reduced layout's last rows
        idx = idx[:, final.length - rows :]
    start = s0 - keep if keep else 0
    idx = torch.where(idx >= start, idx - start, s0 - start)
    full = logits.new_zeros(b, s0 - start + 1, v)
    full.scatter_(1, idx.unsqueeze(-1).expand(-1, -1, v), logits)
    return full[:, : s0 - start].contiguous()


def _segments(state: SeqState):
    """(text before the visual span, text after it) [B, S]; a sample without visual tokens has all its
    text before."""
    b, s = state.valid.shape
    ar = torch.arange(s, device=state.valid.device).expand(b, s)
    text = state.valid & ~state.visual
    has = state.visual.any(1, keepdim=True)
    first = torch.where(state.visual, ar, s).min(1, keepdim=True).values
    last = torch.where(state.visual, ar, -1).max(1, keepdim=True).values
    before = text & (~has | (ar < first))
    after = text & has & (ar > last)
    return before, after


def _as_step(method, out, view: LLMView) -> LLMStep:
    """Check what an in_llm stage returned: per sample sorted, unique positions among its visual tokens
    (and, for merges, one hidden state per kept token)."""
    step = out if isinstance(out, LLMStep) else LLMStep(list(out))
    if len(step.kept) != len(view.visual_index):
        raise ValueError(f"{method.name}.in_llm returned {len(step.kept)} index lists for {len(view.visual_index)} samples")
    kept, perms = [], []
    for b, (idx, k) in enumerate(zip(view.visual_index, step.kept)):
        k, perm = torch.as_tensor(k, dtype=torch.long).reshape(-1).sort()
        perms.append(perm)
        n = idx.numel()
        if k.numel() and (int(k[0]) < 0 or int(k[-1]) >= n or bool((k[1:] == k[:-1]).any())):
            raise ValueError(
                f"{method.name}.in_llm: sample {b} kept {k.tolist()[:8]}...; give unique positions in 0..{n - 1} "
                "among the visual tokens entering the layer"
            )
        kept.append(k)
    hidden = step.hidden
    if hidden is not None:
        d = view.hidden.shape[-1]
        if len(hidden) != len(kept) or any(tuple(h.shape) != (k.numel(), d) for h, k in zip(hidden, kept)):
            raise ValueError(f"{method.name}.in_llm: LLMStep.hidden must hold one [kept, {d}] tensor per sample")
        hidden = [h[perm.to(h.device)] for h, perm in zip(hidden, perms)]
    return LLMStep(kept, hidden)

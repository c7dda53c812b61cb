"""The in-LLM stage of VLM adapters: stage layers, LLM probes (query sets, transitions), drops and merges.

A mixin of ``VLMAdapter``: during the prefill it runs each in_llm step at its decoder layer (the
method's view, probes computed at the asking layer, compaction or merge of the sequence) and during
decoding maps masks and positions to the shorter per-layer layouts.
"""

from __future__ import annotations

import torch

from vtok.hf_compat import cache_from_kwargs
from vtok.method import AttentionScores, LLMStep, LLMView, Transition, Transitions, TransitionStats
from vtok.stats import Reduction

from .hf_llm import (
    SeqState,
    attention_scores,
    build_layer_kwargs,
    decoder_input_norm,
    last_valid_index,
    query_rows,
    remap_mask,
)

__all__ = ["InLLMStage"]


class InLLMStage:
    """The in_llm half of ``VLMAdapter`` (uses its ``_fw``, ``_gen``, ``_steps``, ``lm``, ``handle``)."""
    def _scores(self, attn, normed, position_embeddings, state: SeqState, query, layer) -> AttentionScores:
        """An attention probe of ``query`` over the keys of ``state``'s layout; logs what it computed."""
        after = _segments(state)[1] if isinstance(query, str) and query == "instruction" else None
        rows = query_rows(query, state.valid, state.visual, after)
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

    def _hook_transition(self, layer: int, vectors: bool, stats: bool) -> None:
        """Sub-block inputs/outputs of one decoder layer from the model's own forward: the vectors at the
        visual tokens (``Transition(layer)``) and/or per-token reductions (``Transition(layer, stats=True)``)."""
        dec = self.lm.layers[layer]

        def grab(name, x):
            fw = self._fw
            if fw is None or not fw.prefill or not fw.active:
                return
            state = fw.current()
            rows = fw.transitions.setdefault(layer, {})
            if stats:
                if name.endswith("_in"):
                    rows[name + "_full"] = x
                else:
                    xin = rows.pop(name[:-4] + "_in_full").float()
                    y = x.float()
                    rows[name[:-4] + "_stats"] = torch.stack(
                        [xin.square().sum(-1), y.square().sum(-1), (xin * y).sum(-1)], -1
                    )
            if vectors:
                rows[name] = [x[b, idx.to(x.device)].detach() for b, idx in enumerate(state.visual_index())]
            if vectors and all(k in rows for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")):
                fw.probes[Transition(layer)] = Transitions(
                    rows.pop("attn_in"), rows.pop("attn_out"), rows.pop("mlp_in"), rows.pop("mlp_out"),
                    [state.orig_index[b, idx] for b, idx in enumerate(state.visual_index())],
                )  # fmt: skip
            if stats and "attn_stats" in rows and "mlp_stats" in rows:
                fw.probes[Transition(layer, stats=True)] = TransitionStats(
                    rows.pop("attn_stats"), rows.pop("mlp_stats"), state.valid, state.visual, state.orig_index
                )

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
                state = prev.compact(keep, method.position_policy_at("in_llm"))
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

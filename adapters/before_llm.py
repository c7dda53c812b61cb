"""The before_llm stage of VLM adapters (a mixin of ``VLMAdapter``): the chain of methods on the prefill's
visual units, the probes and question text they read, their stats, and the splice into the prompt."""

from __future__ import annotations

import torch

from vtok.method import LLM_PROBES, CallVideos, Question, TextQuery
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

__all__ = ["BeforeLLMStage"]


class BeforeLLMStage:
    """Runs on ``VLMAdapter``'s per-call state (``self._fw``, ``self._captured``)."""

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
            self._check_counts(method, fw.units, out)
            self._record_units(method, "before_llm", units, out)
            units = out
        fw.reduced = units

    @staticmethod
    def _check_counts(method, units: VisualTokens, out: VisualTokens) -> None:
        """One rule for every adapter: a unit gets at most as many tokens as it has placeholders (the
        prompt is never grown or cut silently)."""
        if out.num_units != units.num_units:
            raise ValueError(
                f"{method.name}.before_llm returned {out.num_units} units for {units.num_units}; return one per unit "
                "(VisualTokens.select / select_indices keep the units)"
            )
        over = [(u, int(o), int(i)) for u, (o, i) in enumerate(zip(out.counts().tolist(), units.counts().tolist())) if o > i]
        if over:
            u, o, i = over[0]
            raise ValueError(
                f"{method.name}.before_llm returned {o} tokens for unit {u}, which has {i} placeholder slots; a "
                "before_llm method returns at most one token per placeholder (vtok does not grow the prompt)"
            )

    def _collect_probes(self, method, kinds=("vit", "text", "llm"), before_layer=None):
        """The method's probes of the given kinds; LLM probes only those of layers before ``before_layer``
        (a probe is computed when its layer runs, so a stage at layer L sees the probes of layers < L)."""
        fw = self._fw
        fw.probes.update(self._captured)
        res = {}
        for p in method.probes():
            kind = "text" if isinstance(p, (TextQuery, Question, CallVideos)) else "llm" if isinstance(p, LLM_PROBES) else "vit"
            if kind not in kinds or (kind == "llm" and before_layer is not None and p.layer >= before_layer):
                continue
            if isinstance(p, Question):
                res[p] = self._question()
            elif isinstance(p, CallVideos):
                res[p] = self._call_videos(method)
            elif kind == "text":
                res[p] = self._text_query()
            elif p in fw.probes:
                res[p] = fw.probes[p]
            else:
                raise ValueError(
                    f"{method.name} needs {p!r}, which was not computed in this forward "
                    "(were the visual features passed in pre-computed, without running the vision tower?)"
                )
        return res

    def _call_videos(self, method) -> list:
        videos = self.handle.call_context().get("videos")
        b = int(self._fw.input_ids.shape[0])
        if videos is None or len(videos) != b:
            given = "none" if videos is None else f"{len(videos)}"
            raise ValueError(
                f"{method.name} reads the raw video of each sample; wrap the call in "
                f"`with handle.context(videos=[...]):` with one vtok.video.Frames (or None) per sample ({b} here, "
                f"{given} given)"
            )
        return list(videos)

    def _question(self) -> list[str]:
        """Per sample, the text after its last visual token, decoded (special tokens skipped)."""
        fw = self._fw
        ids = fw.input_ids
        visual = torch.isin(ids, self._placeholder_tensor(ids))
        valid = fw.attention_mask.bool() if fw.attention_mask is not None else torch.ones_like(visual)
        ar = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(visual, ar, -1).max(1).values
        tok = getattr(self.handle.processor, "tokenizer", self.handle.processor)
        return [tok.decode(ids[b][valid[b] & (ar > last[b])].tolist(), skip_special_tokens=True) for b in range(ids.shape[0])]

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
        self.handle.stats.append(Reduction(method.name, stage, None, tin, tout, kept_t, list(zip(n_in, n_out))))

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

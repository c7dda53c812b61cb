"""The before_llm stage of VLM adapters (a mixin of ``VLMAdapter``): the chain of methods on the prefill's
visual units, the probes and question text they read, their stats, and the splice into the prompt."""

from __future__ import annotations

import torch

from vtok.method import LLM_PROBES, AskModel, CallVideos, Question, TextQuery
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

from .ask import ModelAsk

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
        self.handle.check_trained()  # a method's own modules run here: refused untrained in eval mode
        for method in chain:  # a chain: each method gets what the previous one returned
            probes = self._collect_probes(method, ("vit", "text"))
            out = method.before_llm(units, probes)
            if not isinstance(out, VisualTokens):
                raise TypeError(f"{method.name}.before_llm must return VisualTokens, got {type(out).__name__}")
            self._check_counts(method, units, out)
            asked = [v.forwards for p, v in probes.items() if isinstance(p, AskModel) and v is not None]
            self._record_units(method, "before_llm", units, out, nested=[f for a in asked for f in a] if asked else None)
            units = out
        fw.reduced = units

    @staticmethod
    def _check_counts(method, units: VisualTokens, out: VisualTokens) -> None:
        """One rule for every adapter: one unit out per unit in, and a declared grid layout that holds
        exactly the unit's tokens."""
        if out.num_units != units.num_units:
            raise ValueError(
                f"{method.name}.before_llm returned {out.num_units} units for {units.num_units}; return one per unit "
                "(VisualTokens.select / select_indices keep the units)"
            )
        for u, k in enumerate(out.counts().tolist()):
            lay = out.unit_layout(u)
            if lay is None or lay == "sequence":
                continue
            if not isinstance(lay, list) or sum(h * w for h, w in lay) != k:
                raise ValueError(
                    f"{method.name}.before_llm declared the layout {lay!r} for unit {u}, which does not hold its {k} "
                    "tokens; declare None, 'sequence', or (h, w) grids whose sizes add up to the token count"
                )

    def needs_relayout(self, out: VisualTokens, units: VisualTokens) -> bool:
        """Whether the prompt must be laid out again (a declared layout, or more tokens than a unit had)."""
        if out.layout is not None:
            return True
        return bool((out.counts() > units.counts()).any())

    def layout_newline(self, u: int, b: int, span: torch.Tensor, embeds: torch.Tensor):
        """The embedding of a newline token for unit ``u`` of sample ``b`` (None: the family has none)."""
        return None

    def relayout(self, out: VisualTokens, spans: list, embeds: torch.Tensor, state, policy: str):
        """The prompt with every unit's span replaced by its tokens in output order, laid out as declared
        (``VisualTokens.layout``): ``(SeqState, embeddings)``. Text keeps its order. Positions: 'compact'
        numbers the new sequence contiguously; 'keep' keeps the text's and gives a token its unit's first
        position plus its ``position``. A token maps back to the caller's sequence in order over the span's
        placeholders (those beyond the span have no caller row); what the caller gets back is as for any
        reduction."""
        from .hf_llm import SeqState

        b, s0, _ = embeds.shape
        dev = embeds.device
        counts = out.counts().tolist()
        starts = {}
        covered = torch.zeros(b, s0, dtype=torch.bool)
        for u, span in enumerate(spans):
            starts[(int(out.owner[u]), int(span[0]))] = u
            covered[int(out.owner[u]), span.cpu()] = True
        valid, pos0 = state.valid.cpu(), state.positions.cpu()
        newline = {}  # unit -> the newline embedding its layout uses (None: the family has none)
        rows = []  # per sample: (src index, unit or -1, token j or -1 (newline), orig index, position)
        for bi in range(b):
            row = []
            for i in valid[bi].nonzero().squeeze(1).tolist():
                u = starts.get((bi, i))
                if u is None:
                    if not covered[bi, i]:
                        row.append((i, -1, -1, i, int(pos0[bi, i])))
                    continue
                span = spans[u].cpu().tolist()
                lay = out.unit_layout(u)
                seq = list(range(counts[u]))
                if isinstance(lay, list):  # declared grids: a newline after each row where the family has them
                    newline[u] = self.layout_newline(u, bi, spans[u], embeds)
                    seq, j = [], 0
                    for h, w in lay:
                        for _ in range(h):
                            seq += list(range(j, j + w)) + ([-1] if newline[u] is not None and w else [])
                            j += w
                first = int(pos0[bi, i])
                tok_pos = out.positions[u, : counts[u]].cpu().tolist()
                for n_, t in enumerate(seq):
                    orig = span[n_] if n_ < len(span) else s0
                    p = first + (tok_pos[t] if t >= 0 else tok_pos[seq[n_ - 1]])  # a newline: its row's last token
                    row.append((span[0], u, t, orig, p))
            rows.append(row)
        length = max((len(r) for r in rows), default=0)
        table = torch.full((b, length, 5), -1, dtype=torch.long)  # left-padded rows of the tuples above
        for bi, row in enumerate(rows):
            if row:
                table[bi, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        src, unit, tok, orig, positions = table.unbind(-1)
        new_valid = src >= 0
        visual = unit >= 0
        index = src.clamp_min(0)
        orig = torch.where(new_valid, orig, s0)
        positions = positions.masked_fill(~new_valid, 0)
        if policy == "compact":
            start = positions.gather(1, (~new_valid).sum(1, keepdim=True).clamp_max(max(length - 1, 0)))
            positions = torch.where(new_valid, start + new_valid.long().cumsum(1) - 1, 0)  # from the first entry
        new = embeds.gather(1, index.to(dev).unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
        new = new * new_valid.to(dev).unsqueeze(-1).to(new.dtype)
        bi, ci = (visual & (tok >= 0)).nonzero(as_tuple=True)
        new[bi.to(dev), ci.to(dev)] = out.features[unit[bi, ci].to(out.features.device), tok[bi, ci].to(out.features.device)].to(new.dtype)
        bi, ci = (visual & (tok < 0)).nonzero(as_tuple=True)
        if bi.numel():
            new[bi.to(dev), ci.to(dev)] = torch.stack([newline[int(u)] for u in unit[bi, ci].tolist()]).to(new.dtype)
        kept = new_valid.sum(1)
        step = (valid.sum(1) - kept) if policy == "compact" else torch.zeros(b, dtype=torch.long)
        st = SeqState(
            valid=new_valid.to(dev), positions=positions.to(dev), visual=visual.to(dev), orig_index=orig.to(dev),
            index=index.to(dev), prev_len=s0, shift=(state.shift.cpu() + step).to(dev), step_shift=step.to(dev),
        )
        return st, new

    def _collect_probes(self, method, kinds=("vit", "text", "llm"), before_layer=None):
        """The method's probes of the given kinds; LLM probes only those of layers before ``before_layer``
        (a probe is computed when its layer runs, so a stage at layer L sees the probes of layers < L)."""
        fw = self._fw
        fw.probes.update(self._captured)
        res = {}
        for p in method.probes():
            text = isinstance(p, (TextQuery, Question, CallVideos, AskModel))
            kind = "text" if text else "llm" if isinstance(p, LLM_PROBES) else "vit"
            if kind not in kinds or (kind == "llm" and before_layer is not None and p.layer >= before_layer):
                continue
            tok = getattr(self.handle.processor, "tokenizer", self.handle.processor)
            if isinstance(p, (Question, AskModel)) and p.optional and not callable(tok):
                res[p] = None  # no processor: an optional probe is served as None
            elif isinstance(p, Question):
                res[p] = self._question()
            elif isinstance(p, CallVideos):
                res[p] = self._call_videos(method)
            elif isinstance(p, AskModel):
                res[p] = ModelAsk(self, self.handle.processor, p.chunk)
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

    def _record_units(self, method, stage, units: VisualTokens, out: VisualTokens, nested=None):
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
        self.handle.stats.append(
            Reduction(method.name, stage, None, tin, tout, kept_t, list(zip(n_in, n_out)), nested, method.step_flops())
        )

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

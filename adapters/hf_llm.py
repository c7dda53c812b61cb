"""Decoder-LM side of HF models: sequence compaction, positions, masks, KV cache, attention probes.

Speaks one HF decoder stack (``layers``, ``rotary_emb``, ``config``) with Llama-style attention
(``q_proj``/``k_proj``, optional ``q_norm``/``k_norm``); masks come from transformers' own builder
(through ``vtok.hf_compat``), so the user's attention implementation serves the shorter sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtok.hf_compat import causal_mask, rotary_fn

__all__ = ["SeqState", "attention_scores", "query_rows", "build_layer_kwargs", "remap_mask", "decoder_input_norm"]


@dataclass
class SeqState:
    """One layout of the LLM sequence (per sample, left-padded).

    valid [B, S]: real tokens; positions [B, S]: RoPE position ids; visual [B, S]: visual tokens;
    orig_index [B, S]: index in the user's original sequence. ``index`` [B, S] maps into the previous
    layout (None: this is the original layout); ``prev_len`` its length; ``shift`` [B]: how much
    decode-step position ids are lowered relative to the original numbering (compact policies).
    """

    valid: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    orig_index: torch.Tensor
    index: torch.Tensor | None = None
    prev_len: int = 0
    shift: torch.Tensor | None = None
    step_shift: torch.Tensor | None = None

    @classmethod
    def original(cls, valid, positions, visual):
        b, s = valid.shape
        zero = torch.zeros(b, dtype=torch.long, device=valid.device)
        return cls(valid, positions, visual, torch.arange(s, device=valid.device).expand(b, s), shift=zero, step_shift=zero)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def visual_index(self) -> list[torch.Tensor]:
        return [row.nonzero().squeeze(1) for row in self.visual]

    def compact(self, keep: torch.Tensor, policy: str) -> "SeqState":
        """New left-padded layout holding the tokens where ``keep`` [B, S] is True, in order."""
        keep = keep & self.valid
        b, s = keep.shape
        dev = keep.device
        counts = keep.sum(1)
        s_new = int(counts.max())
        ar = torch.arange(s, device=dev)
        order = torch.argsort((~keep).long() * s + ar, dim=1)  # kept first, in index order
        slot = torch.arange(s_new, device=dev).unsqueeze(0) - (s_new - counts).unsqueeze(1)
        valid = slot >= 0
        index = order.gather(1, slot.clamp_min(0))
        removed = (self.valid & ~keep).long()
        if policy == "compact":
            pos = self.positions - removed.cumsum(1)
            step = removed.sum(1)
        elif policy == "keep":
            pos = self.positions
            step = torch.zeros(b, dtype=torch.long, device=dev)
        else:  # pragma: no cover - validated by Method
            raise ValueError(f"unknown position policy {policy!r}")
        return SeqState(
            valid=valid,
            positions=pos.gather(1, index).masked_fill(~valid, 0),
            visual=self.visual.gather(1, index) & valid,
            orig_index=self.orig_index.gather(1, index),
            index=index,
            prev_len=s,
            shift=self.shift + step,
            step_shift=step,
        )

    def is_identity(self) -> bool:
        return self.index is None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Gather [B, S_prev, ...] into this layout; pad slots are zero."""
        idx = self.index.reshape(*self.index.shape, *([1] * (x.dim() - 2))).expand(*self.index.shape, *x.shape[2:])
        out = x.gather(1, idx)
        return out * self.valid.reshape(*self.valid.shape, *([1] * (x.dim() - 2))).to(out.dtype)


def remap_mask(state: SeqState, mask2d: torch.Tensor) -> torch.Tensor:
    """Map a 2-D mask over [previous layout + new tokens] to [this layout + new tokens]."""
    head = mask2d[:, : state.prev_len].gather(1, state.index) * state.valid.to(mask2d.dtype)
    return torch.cat([head, mask2d[:, state.prev_len :]], dim=1)


def build_layer_kwargs(lm, hidden, mask2d, positions, cache, layer_idx):
    """attention_mask, position_ids and position_embeddings for decoder layers from ``layer_idx`` on."""
    pe = lm.rotary_emb(hidden, position_ids=positions)
    mask = causal_mask(lm.config, hidden, mask2d, cache, positions, layer_idx)
    return {"attention_mask": mask, "position_ids": positions, "position_embeddings": pe}


def _project(attn, proj, norm_name, h, n_heads, head_dim):
    x = getattr(attn, proj)(h).view(*h.shape[:-1], n_heads, head_dim)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


#: query rows handled per matmul in ``attention_scores`` (bounds the [B, Hq, rows, S] probabilities)
ROW_CHUNK = 256


def query_rows(query, valid, visual, after):
    """The rows of a query set per sample: (index [B, R], row mask [B, R]), or None for "mean" (all rows).

    query: "last", "mean", "text", "instruction" (= ``after``: text after the visual span), "visual",
    or a [B, S] bool mask. Rows are in sequence order; padded rows (mask False) repeat row 0.
    """
    valid = valid.bool()
    if isinstance(query, torch.Tensor):
        if query.dtype != torch.bool or query.shape != valid.shape:
            raise ValueError(f"a query mask must be a bool tensor of the view's shape {tuple(valid.shape)}")
        sel = query & valid
    elif query == "last":
        idx = last_valid_index(valid).unsqueeze(1)
        return idx, torch.ones_like(idx, dtype=torch.bool)
    elif query == "mean":
        return None
    elif query == "text":
        sel = valid & ~visual
    elif query == "instruction":
        sel = after & valid
    elif query == "visual":
        sel = visual & valid
    else:
        raise ValueError(f"query={query!r} is not a query set ('last', 'mean', 'text', 'instruction', 'visual') or a mask")
    b, s = sel.shape
    counts = sel.sum(1)
    r = max(1, int(counts.max()))
    ar = torch.arange(s, device=sel.device)
    order = torch.argsort((~sel).long() * s + ar, dim=1)[:, :r]
    mask = torch.arange(r, device=sel.device).unsqueeze(0) < counts.unsqueeze(1)
    return torch.where(mask, order, order[:, :1]), mask


@torch.no_grad()
def attention_scores(attn, hidden, position_embeddings, valid, rows):
    """Head-averaged attention per key of chosen query rows of a Llama-style attention module.

    hidden [B, S, D]: the module's input (after the layer norm); valid [B, S]: keys that exist; rows:
    ``query_rows(...)``. q/k come from the module's own projections (and q_norm/k_norm, RoPE) for the
    needed rows only; the scores by ``vtok.kernels`` (GQA-aware, causal, no [S, S] map). Returns
    (per_key [B, S] fp32 averaged over heads and rows, padded number of query rows computed).
    """
    from vtok.kernels import attention_colmean, attention_rows as rows_kernel

    cfg = attn.config
    n_q, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    rope = rotary_fn(attn)
    cos, sin = position_embeddings
    b, s = hidden.shape[:2]
    if cos.shape[0] != b:
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
    k = _project(attn, "k_proj", "k_norm", hidden, n_kv, head_dim)
    k, _ = rope(k, k, cos, sin)
    valid = valid.bool()
    if rows is None:  # every valid row: column means in row chunks
        q = _project(attn, "q_proj", "q_norm", hidden, n_q, head_dim)
        q, _ = rope(q, q, cos, sin)
        return attention_colmean(q, k, scale=scaling, key_mask=valid, query_mask=valid, causal=True), s
    idx, mask = rows
    acc = torch.zeros(b, s, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, idx.shape[1], ROW_CHUNK):
        sl = idx[:, r0 : r0 + ROW_CHUNK]
        gather = lambda t: t.gather(1, sl.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
        q = _project(attn, "q_proj", "q_norm", gather(hidden), n_q, head_dim)
        q, _ = rope(q, q, gather(cos), gather(sin))
        p = rows_kernel(q, k, scale=scaling, key_mask=valid, causal_offset=sl)  # [B, r, S]
        acc += (p * mask[:, r0 : r0 + ROW_CHUNK, None]).sum(1)
    return acc / mask.sum(1).clamp_min(1).unsqueeze(1), idx.shape[1]


def decoder_input_norm(layer):
    """The norm a Llama-style decoder layer applies before its attention."""
    return layer.input_layernorm


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    ar = torch.arange(valid.shape[1], device=valid.device)
    return (valid.long() * ar).argmax(1)

"""What the caller of an attached VLM gets back: logits in its own layout, the loss of the reduced
sequence, ``return_dict=False`` tuples, and KV caches that refuse to outlive the pruning handle."""

from __future__ import annotations

import dataclasses
import weakref

import torch

__all__ = ["as_tuple", "guard_cache", "loss_labels", "to_caller_layout"]


class _PrunedCacheGuard:
    """Stands in for ``update`` on a KV cache that holds a pruned prefill (on that instance only): once the
    handle that pruned it is removed, the untouched model cannot continue it, and says so."""

    def __init__(self, update, handle):
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


def guard_cache(cache, handle) -> None:
    if cache is not None and not isinstance(cache.__dict__.get("update"), _PrunedCacheGuard):
        cache.update = _PrunedCacheGuard(cache.update, handle)


def as_tuple(output) -> tuple:
    """What ``return_dict=False`` gives: the set fields in the output class's field order (loss first)."""
    return tuple(v for v in (getattr(output, f.name) for f in dataclasses.fields(output)) if v is not None)


def to_caller_layout(logits, final, s0: int, keep: int):
    """Logits of the reduced layout (``final``: its SeqState) in the caller's: [B, s0, V] with zeros at removed tokens, or, for
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


def per_layer_to_caller_layout(output, states: list, steps: list, s0: int) -> None:
    """``output.hidden_states`` / ``output.attentions`` of a reduced prefill in the caller's layout, like
    the logits: [B, s0, D] (attentions [B, H, s0, s0]) with zeros at the tokens that layer did not have.
    ``states``: the entry layout, then one per in_llm step (None: unchanged); ``steps``: (layer, method)
    of those steps. hidden_states[0] is the embedding output, hidden_states[j] layer j-1's."""
    layouts, cur = [], states[0]
    stage_states = list(zip((layer for layer, _ in steps), states[1:]))
    for layer in range(max(len(getattr(output, "hidden_states", None) or ()) - 1, len(getattr(output, "attentions", None) or ()))):
        for at, st in stage_states:
            if at == layer and st is not None:
                cur = st
        layouts.append(cur)
    hs = getattr(output, "hidden_states", None)
    if hs is not None:
        output.hidden_states = tuple(
            to_caller_layout(h, states[0] if j == 0 else layouts[j - 1], s0, 0) for j, h in enumerate(hs)
        )
    att = getattr(output, "attentions", None)
    if att is not None:
        mapped = []
        for a, lay in zip(att, layouts):
            if a is None:
                mapped.append(a)
                continue
            idx = torch.where(lay.valid, lay.orig_index, s0).to(a.device)
            full = a.new_zeros(a.shape[0], a.shape[1], s0 + 1, s0 + 1)
            for b in range(a.shape[0]):
                full[b, :, idx[b, :, None], idx[b, None, :]] = a[b]
            mapped.append(full[:, :, :s0, :s0].contiguous())
        output.attentions = tuple(mapped)


def loss_labels(labels: dict, final, s0: int):
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

"""`vtok bench`'s ideal: the untouched blocks replayed at the lengths a method left (no selection cost).

The model's stacks of blocks, stamps of their time in an untouched run, the capture of every block's
inputs with a method attached, and the replay; the method is in docs/BENCHMARKS.md ("Ideal TTFT").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .bench_settings import Case


def model_stacks(model) -> dict:
    """The model's stacks of blocks, as vtok's adapter finds them: ``vision`` (encoder blocks) and, for a VLM,
    ``llm`` (decoder layers)."""
    from vtok.adapters import find_adapter
    from vtok.adapters.hf_vision import vision_blocks
    from vtok.adapters.vit import ViTAdapter
    from vtok.adapters.vlm import VLMAdapter

    adapter = find_adapter(model)(model, {}, None)  # only asked where things are; nothing is attached
    if isinstance(adapter, VLMAdapter):
        return {"vision": list(vision_blocks(adapter.vision_tower)), "llm": list(adapter.lm.layers)}
    if isinstance(adapter, ViTAdapter):
        return {"vision": [p.block for p in adapter.block_parts()]}
    raise ValueError(f"vtok bench does not know the blocks of {type(model).__name__} ({adapter.name} adapter)")


class _Stamps:
    """Marks (on ``clock``) when a stack's first block starts and its last block ends, the first pass only."""

    def __init__(self, blocks, clock):
        self.clock = clock
        self.start = self.end = None
        self.hooks = [blocks[0].register_forward_pre_hook(self._pre), blocks[-1].register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.start is None:
            self.start = self.clock.mark()

    def _post(self, module, args, output):
        if self.start is not None and self.end is None:
            self.end = self.clock.mark()

    def ms(self) -> float:
        if self.end is None:
            raise RuntimeError("the stack did not run in this call")
        return self.clock.ms(self.start, self.end)

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()


_CACHE = object()  # where a captured call had its KV cache (the replay gives a fresh one)


def _hidden(args, kwargs):
    """(where, tensor): the hidden states a block is called with -- its first tensor argument."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    raise ValueError("a block was called without a tensor argument")


@dataclass
class _Call:
    """One block call of the capture forward: arguments (hidden states left out, cache replaced by a
    marker), the length entering and leaving, and the hidden states where this length starts."""

    args: tuple
    kwargs: dict
    where: int | str
    n_in: int
    n_out: int | None = None
    hidden: torch.Tensor | None = None

    def bind(self, hidden, cache):
        sub = lambda v: cache if v is _CACHE else v  # noqa: E731
        args = tuple(hidden if i == self.where else sub(a) for i, a in enumerate(self.args))
        kwargs = {k: hidden if k == self.where else sub(v) for k, v in self.kwargs.items()}
        return args, kwargs

    def others_sized(self, n: int) -> bool:
        """Whether another tensor argument has a dimension of the hidden states' length (a mask...)."""
        vals = [*self.args, *self.kwargs.values()]
        vals += [t for v in vals if isinstance(v, (tuple, list)) for t in v]
        return any(isinstance(v, torch.Tensor) and n in v.shape[1:] for v in vals)


class _Capture:
    """Records every block's first call in a stack (registered after vtok's hooks: sees what vtok handed on)."""

    def __init__(self, blocks):
        self.calls: list = [None] * len(blocks)
        self.hooks = []
        for i, b in enumerate(blocks):
            self.hooks.append(b.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            self.hooks.append(b.register_forward_hook(self._make_post(i), with_kwargs=True))

    @staticmethod
    def _drop_cache(v):
        from vtok.hf_compat import is_kv_cache

        return _CACHE if is_kv_cache(v) else v

    def _make_pre(self, i):
        def pre(module, args, kwargs):
            if self.calls[i] is not None:
                return None
            where, h = _hidden(args, kwargs)
            prev = self.calls[i - 1] if i else None
            starts = prev is None or prev.n_in != h.shape[1]
            self.calls[i] = _Call(
                args=tuple(None if j == where else self._drop_cache(a) for j, a in enumerate(args)),
                kwargs={k: None if k == where else self._drop_cache(v) for k, v in kwargs.items()},
                where=where,
                n_in=int(h.shape[1]),
                hidden=h.detach() if starts else None,
            )
            return None

        return pre

    def _make_post(self, i):
        def post(module, args, kwargs, output):
            c = self.calls[i]
            if c is not None and c.n_out is None:
                t = output[0] if isinstance(output, (tuple, list)) else output
                c.n_out = int(t.shape[1]) if isinstance(t, torch.Tensor) else c.n_in
            return None

        return post

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()


def _lengths(calls) -> list:
    """(tokens entering, tokens leaving) per block."""
    return [(c.n_in, c.n_out) for c in calls]


@dataclass
class _Captured:
    """What one forward with a setting attached left: per stack its block calls, FLOPs, stats."""

    calls: dict
    flops: object
    events: list


def _capture(case: Case, stacks: dict, handle=None) -> _Captured:
    from .flops import Tracker, analyse

    caps = {name: _Capture(blocks) for name, blocks in stacks.items()}
    try:
        with torch.no_grad(), Tracker(case.model, handle) as tracker:
            case.forward()
    finally:
        for c in caps.values():
            c.remove()
    if not tracker.records:
        raise RuntimeError(f"{case.name}: the capture forward recorded nothing")
    missing = [n for n, c in caps.items() if any(x is None for x in c.calls)]
    if missing:
        raise RuntimeError(f"{case.name}: blocks of {missing} did not run in the capture forward")
    report = analyse(tracker.spec, tracker.records[-1])
    events = list(handle.stats) if handle is not None else []
    return _Captured({n: c.calls for n, c in caps.items()}, report, events)


class _NoIdeal(Exception):
    """The replay cannot run this stack at the lengths it needs."""


def attention_share(model) -> float:
    """The attention's part of a vision block's linear multiply-accumulates (q, k, v, o against the MLP)."""
    from .flops import model_spec

    stack = model_spec(model).vision.stack
    return stack.attn_macs / (stack.attn_macs + stack.mlp_macs)


def _replay(case: Case, stacks: dict, captured: _Captured, names) -> dict:
    """{stack: fn} that runs the untouched blocks of each named stack on the captured inputs, each block at
    its own length: a block that merged inside (ToMe) at ``n_out + share * (n_in - n_out)`` tokens, ``share``
    from ``attention_share``; ``_NoIdeal`` when another argument has the hidden states' length (a mask)."""
    share = attention_share(case.model)
    fns = {}
    for name in names:
        calls, blocks = captured.calls[name], stacks[name]
        plan, src = [], None
        for blk, call in zip(blocks, calls):
            src = call if call.hidden is not None else src
            n_out = call.n_out if call.n_out is not None else call.n_in
            m = n_out + round(share * (call.n_in - n_out))
            if m != call.n_in and call.others_sized(call.n_in):
                raise _NoIdeal(f"{name} block {blocks.index(blk)} takes another argument of the hidden states' length")
            plan.append((blk, call, src.hidden if m == src.hidden.shape[1] else src.hidden[:, :m]))
        needs_cache = any(v is _CACHE for _, c, _ in plan for v in (*c.args, *c.kwargs.values()))

        def fn(plan=plan, needs_cache=needs_cache):
            cache = None
            if needs_cache:
                from vtok.hf_compat import new_kv_cache

                cache = new_kv_cache(case.model.config.get_text_config())
            with torch.no_grad():
                for blk, call, h in plan:
                    args, kwargs = call.bind(h, cache)
                    blk(*args, **kwargs)

        fns[name] = fn
    return fns

"""Vision transformers: the ``in_vit`` runner and the standalone ViT adapters.

:class:`InViTRunner` reduces tokens block by block in any family whose block parts
``vtok.adapters.vit_blocks`` knows (the VLM adapters reuse it for their towers). Adapters:
:class:`HFVisionAdapter` (CLIP, SigLIP, DINOv2), :class:`TimmViTAdapter`, :class:`OpenClipViTAdapter`.
"""

from __future__ import annotations

import inspect
import sys
import threading
from types import SimpleNamespace
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vtok.method import ViTAttention
from vtok.stats import Reduction
from vtok.vit import ViTMerge, ViTSource, ViTView, check_regroup, merge_tokens, regroup_index, regroup_rows, remap_assign

from .base import Adapter, InstanceWrap, per_thread
from .hf_vision import config_patches, has_cls_token
from .vit_blocks import (  # noqa: F401  (BlockParts and the *_block_parts were defined here before)
    BlockParts,
    hf_attn_implementation,
    hf_block_parts,
    open_clip_block_parts,
    timm_block_parts,
)

__all__ = [
    "BlockParts",
    "InViTRunner",
    "ViTAdapter",
    "HFVisionAdapter",
    "TimmViTAdapter",
    "OpenClipViTAdapter",
    "hf_block_parts",
    "timm_block_parts",
    "open_clip_block_parts",
    "check_vit_method",
    "install_qkv_lora",
]


# ------------------------------------------------------------------------------------------ runner


def check_vit_method(method, where: str | None, num_blocks: int | None = None) -> None:
    """Raise a clear error if ``method`` cannot run in_vit here (before any hook is installed)."""
    for attr in ("vit_schedule", "in_vit"):
        if not callable(getattr(method, attr, None)):
            raise TypeError(
                f"method {method.name!r} is registered for stage 'in_vit' but has no {attr}(); an in_vit method "
                "implements vit_schedule(num_blocks) and in_vit(view) (see vtok.vit)"
            )
    if getattr(method, "prop_attn", False) and where not in (None, "eager", "sdpa"):
        raise ValueError(
            f"{method.name}: proportional attention adds log(size) to the attention logits as a float mask, "
            f"which attn_implementation={where!r} cannot take; use attn_implementation='sdpa' for the vision "
            f"encoder or prop_attn=False"
        )
    if num_blocks is not None:
        method.vit_schedule(num_blocks)  # a schedule that does not fit the encoder raises here


def _add_bias(existing, bias):
    if existing is None:
        return bias
    if existing.dtype == torch.bool:
        zeros = torch.zeros(existing.shape, dtype=bias.dtype, device=bias.device)
        existing = zeros.masked_fill(~existing, float("-inf"))
    return existing + bias


@dataclass
class _Block:
    merged: torch.Tensor | None = None  # x' (merged residual stream) waiting for the MLP branch
    branch: torch.Tensor | None = None  # m (MLP branch output on x')


class InViTRunner:
    """Runs one ``in_vit`` method inside a ViT, block by block, with instance-level hooks.

    Per forward (reset when block 0 starts): token sizes, the source map, the keys of the
    current block and the records of what each block merged. ``active``: how many leading
    blocks reach the output that matters (a VLM's feature layer); the schedule covers those.
    ``protected``: prefix tokens handed to the method as protected. ``on_record(block, n_in,
    n_out, kept, point)`` is called after every merge; ``on_reset()`` when a forward starts.

    How a block is reduced (ToMe's placement: after the attention residual, before the MLP):

    1. attention pre-hook: proportional attention -- ``log(size)`` of every key as an additive float
       mask ([B, 1, 1, N]; [B*H, N, N] as a stride-0 view for ``nn.MultiheadAttention``); the
       attention implementation (SDPA, eager) stays the one the user chose. ViT probes are computed
       here from the attention input (small q/k side computations).
    2. keys: a forward hook on the module producing them (HF ``k_proj``, timm ``k_norm``, open_clip
       ``ln_k``); for ``nn.MultiheadAttention`` the key projection of its input (one [N, C] x [C, C]).
    3. pre-hook on the MLP branch's first module (the norm): the method's merge is applied to the
       residual stream ``x`` there, so the MLP runs on the merged tokens ``x'``.
    4. forward hook on the branch's last module: its output ``m`` is kept, and a zero is returned so
       the block's own ``x + branch`` stays well-formed.
    5. forward hook on the block (run before any other forward hook): the block's output becomes
       ``x' + m`` -- exactly ToMe's block, computed with the block's own modules.
    """

    # per-call state, kept per thread: one attached model may run in several threads at once
    n0 = per_thread()
    sizes = per_thread()
    assign = per_thread()
    metric = per_thread()
    probes = per_thread()
    records = per_thread()
    reduced = per_thread()
    schedule = per_thread()
    _blk = per_thread()
    rows = per_thread()  # [B0] the current row of each input row (None: no rows were concatenated)
    groups = per_thread()  # [B] the video of each current row
    frames_per_row = per_thread()  # [B] input rows (frames) each current row holds
    protected_now = per_thread()  # prefix tokens per current row (grows when rows are concatenated)
    origin = per_thread()  # [B] the first input row each current row holds
    last_hidden = per_thread()  # the last block's output of the last forward (for frame_class_tokens)
    points = per_thread()  # per entry of ``records``: (merge point "attn"/"mlp", origin [rows] of its rows)

    def __init__(
        self,
        adapter: Adapter,
        method,
        parts: list[BlockParts],
        *,
        protected: int,
        active: int | None = None,
        track_source: bool = True,
        attn_implementation: Callable[[], str | None] = lambda: None,
        on_reset: Callable | None = None,
        on_record: Callable | None = None,
        tower: nn.Module | None = None,
        groups: Callable[[int], torch.Tensor | None] | None = None,
    ):
        self.adapter = adapter
        self.method = method
        self.parts = parts
        self.protected = protected
        n = len(parts)
        active = n if active is None else active
        self.n_active = active
        sched = [int(v) for v in method.vit_schedule(active)] if active > 0 else []
        self._local = threading.local()
        self.installed = sched + [0] * (n - len(sched))  # the schedule the hooks were installed for
        #: the method's merge point at the blocks' input (before attention), at every block reaching the output
        self.pre = callable(getattr(method, "in_vit_pre", None)) and active > 0
        merging = [i for i, v in enumerate(self.installed) if v > 0]
        self.first_merge = 0 if self.pre else (merging[0] if merging else None)
        self.groups_of = groups  # rows -> [rows] video of each row for the coming tower call, or None
        self.prop_attn = bool(getattr(method, "prop_attn", False))
        self.track_source = track_source
        self.attn_implementation = attn_implementation
        self.on_reset = on_reset
        self.on_record = on_record
        # what a run asks of the tower and the method, found once here rather than at every forward
        self._budget_schedule = "num_tokens" in inspect.signature(method.vit_schedule).parameters
        self._ckpt_modules = [p.block for p in parts if hasattr(p.block, "gradient_checkpointing")] + [
            m for m in (tower.modules() if tower is not None else ()) if hasattr(m, "grad_checkpointing")
        ]
        self.probe_layers: dict[int, list[ViTAttention]] = {}
        self._has_cls = bool(getattr(adapter, "num_prefix_tokens", lambda: protected)())
        for p in method.probes():
            if isinstance(p, ViTAttention):
                self.probe_layers.setdefault(p.layer % n, []).append(p)
        self._reset()

    # state ---------------------------------------------------------------------------------
    def _reset(self):
        self.n0 = 0
        self.sizes: torch.Tensor | None = None
        self.assign: torch.Tensor | None = None
        self.metric: torch.Tensor | None = None
        self.probes: dict = {}
        self.records: list = []
        self.reduced = False
        self._blk = _Block()
        self.schedule = list(self.installed)
        self.rows = None
        self.groups = None
        self.frames_per_row = None
        self.protected_now = self.protected
        self.origin = None
        self.points = []
        self.last_hidden = None

    def _schedule_for(self, patches: int) -> None:
        """A schedule given as a budget (tome's ``retain``) follows the tokens this run really has; which
        blocks merge stays as installed."""
        if not self._budget_schedule or self.n_active <= 0:
            return
        sched = [int(v) for v in self.method.vit_schedule(self.n_active, num_tokens=patches)]
        sched += [0] * (len(self.parts) - len(sched))
        if [v > 0 for v in sched] != [v > 0 for v in self.installed]:
            raise ValueError(
                f"{self.method.name}: at {patches} patches per image its schedule merges in other blocks than the one "
                "installed for the tower's configured size; give r= explicitly"
            )
        self.schedule = sched

    def _checkpointed(self) -> bool:
        """Whether the tower recomputes its blocks in backward: HF's layers (``gradient_checkpointing``),
        timm's VisionTransformer and open_clip's Transformer (``grad_checkpointing`` on a parent of the blocks)."""
        return any(
            m.training and (getattr(m, "gradient_checkpointing", False) or getattr(m, "grad_checkpointing", False))
            for m in self._ckpt_modules
        )

    @property
    def active(self) -> bool:
        return self.first_merge is not None or bool(self.probe_layers)

    def source(self) -> ViTSource | None:
        """The source map of the last forward (None if nothing merged or tracking is off)."""
        if not self.reduced or self.assign is None:
            return None
        return ViTSource(self.assign, self.sizes, self.rows)

    def unmerge(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` [B, N, ...], one per current token -> one per input token [B0, N0, ...] (each input
        token gets the value of the token holding it); unchanged while nothing merged."""
        if self.assign is None:
            return values
        return ViTSource(self.assign, self.sizes, self.rows).gather(values)

    # install -------------------------------------------------------------------------------
    def install(self) -> None:
        if not self.active:
            return
        a = self.adapter
        a.hook(self.parts[0].block, self._start, pre=True)
        a.hook(self.parts[-1].block, self._keep_last, pre=False)
        for i, part in enumerate(self.parts):
            r = self.installed[i]
            if self.pre and i < self.n_active:
                a.hook(part.block, self._make_pre_merge(i, part), pre=True)
            # sizes matter from the first merging block on, up to the last block that reaches the output
            bias = self.prop_attn and self.first_merge is not None and self.first_merge <= i < self.n_active
            if bias or i in self.probe_layers or (r > 0 and part.key_pre):
                a.hook(part.attn, self._make_attn_pre(i, part, bias, r > 0 and part.key_pre), pre=True)
            if r > 0:
                if not part.key_pre:
                    a.hook(part.key_module, self._make_keys(part), pre=False)
                a.hook(part.mlp_in, self._make_merge(i, part), pre=True)
                a.hook(part.branch_end, self._branch_end, pre=False)
                # before any other forward hook (e.g. transformers' hidden-state capture)
                a.hook(part.block, self._block_end, pre=False, prepend=True)

    # hooks ---------------------------------------------------------------------------------
    def _start(self, module, args, kwargs):
        if torch.is_grad_enabled() and self.first_merge is not None and self._checkpointed():
            raise ValueError(
                f"{self.method.name} merges tokens inside the vision tower, which runs with gradient checkpointing "
                "here: the backward pass would recompute each block on token counts that have moved on. Turn "
                "checkpointing off for the tower (e.g. model.gradient_checkpointing_disable(), or only for the LLM: "
                "model.language_model.gradient_checkpointing_enable()), or merge in eval mode / under torch.no_grad()"
            )
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        self._reset()
        self.n0 = int(x.shape[1])
        groups = self.groups_of(int(x.shape[0])) if self.groups_of is not None else None
        self.groups = torch.arange(x.shape[0]) if groups is None else groups.cpu().long()
        if self.groups.shape[0] != x.shape[0]:
            raise RuntimeError(f"in_vit: {self.groups.shape[0]} row groups for a tower call of {x.shape[0]} rows")
        self.frames_per_row = torch.ones_like(self.groups)
        self.origin = torch.arange(x.shape[0])
        self._schedule_for(self.n0 - self.protected)
        if self.on_reset is not None:
            self.on_reset()
        return None

    def _keep_last(self, module, args, kwargs, output):
        self.last_hidden = output[0] if isinstance(output, tuple) else output
        return None

    def class_tokens(self) -> list[torch.Tensor]:
        """Per video (row group) of the last forward: the prefix (class) token of every frame, [frames, C], in
        frame order (frames concatenated into one row keep their class tokens in front, row after row)."""
        x = self.last_hidden
        if x is None or self.protected == 0:
            raise ValueError(
                f"{self.method.name}: no class tokens to read (the tower has no prefix token, or has not run)"
            )
        p = self.protected
        out: dict = {}
        for row, (g, f) in enumerate(zip(self.groups.tolist(), self.frames_per_row.tolist())):
            out.setdefault(g, []).append(x[row, : f * p].reshape(f, p, -1)[:, 0])
        return [torch.cat(v) for _, v in sorted(out.items())]

    def _make_attn_pre(self, index: int, part: BlockParts, bias: bool, keys: bool):
        def pre(module, args, kwargs):
            hidden = part.attn_input(args, kwargs)
            if keys:
                self.metric = part.keys(args, kwargs, None)
            b, n = hidden.shape[:2]
            logb = None
            if bias:
                impl = self.attn_implementation()
                if impl not in (None, "eager", "sdpa"):
                    check_vit_method(self.method, impl)
                if self.sizes is None:
                    self.sizes = torch.ones(b, n, dtype=torch.float32, device=hidden.device)
                logb = self.sizes.log()
            for p in self.probe_layers.get(index, ()):
                self.probes[p] = part.stats(hidden, p.kind_for(self._has_cls), logb)
            if logb is None:
                return None
            logb = logb.to(hidden.dtype)
            if part.mha_heads is None:
                mask = logb[:, None, None, :]
            else:  # nn.MultiheadAttention: [B*H, N, N], a stride-0 view along the query axis
                mask = logb.repeat_interleave(part.mha_heads, 0)[:, None, :].expand(-1, n, -1)
            if part.mask_arg not in kwargs and len(args) > 1:
                raise ValueError(
                    f"cannot add proportional attention: {type(module).__name__} receives its mask positionally"
                )
            kwargs[part.mask_arg] = _add_bias(kwargs.get(part.mask_arg), mask)
            return args, kwargs

        return pre

    def _make_keys(self, part: BlockParts):
        def post(module, args, kwargs, output):
            self.metric = part.keys(args, kwargs, output)
            return None

        return post

    def _view(self, index: int, x: torch.Tensor, metric, point: str) -> ViTView:
        if self.sizes is None:
            self.sizes = torch.ones(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        return ViTView(
            index, self.schedule[index], x, metric, self.sizes, self.protected_now, self.probes,
            self.groups, self.frames_per_row, point,
        )

    def _apply(self, index: int, plan: ViTMerge | None, x: torch.Tensor, point: str):
        """Apply the method's plan to the tokens ``x`` [B, N, C] (concatenating rows first if it asks):
        the new tokens, or None when the plan does nothing."""
        if plan is None:
            return None
        if not isinstance(plan, ViTMerge):
            raise TypeError(f"{self.method.name}.in_vit must return a vtok.vit.ViTMerge or None, got {type(plan).__name__}")
        if plan.r == 0 and plan.regroup == 1 and plan.add is None:
            return None
        f = int(plan.regroup)
        if f != 1:
            if point != "attn":
                raise ValueError(
                    f"{self.method.name}: rows can be concatenated (ViTMerge.regroup) only at a block's input "
                    "(in_vit_pre), where attention has not run yet"
                )
            check_regroup(self.groups, f)
            x = self._regroup(x, f)
        b, n, _ = x.shape
        if plan.add is not None:
            if tuple(plan.add.shape) != tuple(x.shape):
                raise ValueError(f"{self.method.name}: ViTMerge.add must be {tuple(x.shape)}, got {tuple(plan.add.shape)}")
            x = x + plan.add.to(x.dtype)
        if plan.r == 0 and plan.order is None:
            return x
        self._check_plan(plan, b, n)
        x_new, self.sizes = merge_tokens(x, self.sizes, plan)
        if self.track_source:
            self._track(plan, b, n, x.device)
        self.reduced = True
        kept = plan.kept(n)
        self.records.append((index, n, n - plan.r, kept))
        self.points.append((point, self.origin))
        if self.on_record is not None:
            self.on_record(index, n, n - plan.r, kept, point)
        return x_new

    def _track(self, plan: ViTMerge, b: int, n: int, device) -> None:
        if self.assign is None:
            self.assign = torch.arange(n, device=device).expand(b, n).clone()
        self.assign = remap_assign(self.assign, plan, n, self.rows)

    def _regroup(self, x: torch.Tensor, f: int) -> torch.Tensor:
        """Concatenate every ``f`` rows of one video: tokens, sizes, the source map and the row groups."""
        b, n = x.shape[:2]
        p = self.protected_now
        self.sizes = regroup_rows(self.sizes.unsqueeze(-1), f, p)[..., 0]  # set by _view before any plan
        if self.track_source:
            if self.assign is None:
                self.assign = torch.arange(n, device=x.device).expand(b, n).clone()
            rows = self.rows if self.rows is not None else torch.arange(b, device=x.device)
            rows = rows.to(x.device)
            self.assign = regroup_index(n, f, p, x.device)[rows % f].gather(1, self.assign)
            self.rows = rows // f
        self.groups = self.groups[::f]
        self.origin = self.origin[::f]
        self.frames_per_row = self.frames_per_row.view(-1, f).sum(1)
        self.protected_now = p * f
        self.reduced = True
        return regroup_rows(x, f, p)

    def _make_pre_merge(self, index: int, part: BlockParts):
        def pre(module, args, kwargs):
            if args:
                x = args[0]
            else:
                key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
                x = kwargs[key]
            plan = self.method.in_vit_pre(self._view(index, x, x, "attn"))
            x_new = self._apply(index, plan, x, "attn")
            if x_new is None:
                return None
            if x_new.shape[0] != x.shape[0]:
                mask = args[1] if len(args) > 1 else kwargs.get(part.mask_arg, kwargs.get("attention_mask"))
                if mask is not None:
                    raise ValueError(
                        f"{self.method.name}: this tower passes an attention mask to its blocks, which cannot follow "
                        "rows concatenated across frames"
                    )
            if args:
                return (x_new,) + tuple(args[1:]), kwargs
            kwargs[key] = x_new
            return args, kwargs

        return pre

    def _make_merge(self, index: int, part: BlockParts):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if self.metric is None:
                raise RuntimeError(f"in_vit: the keys of block {index} were not captured before its MLP")
            view = self._view(index, x, self.metric, "mlp")
            self.metric = None
            x_new = self._apply(index, self.method.in_vit(view), x, "mlp")
            if x_new is None:
                return None
            self._blk = _Block(merged=x_new)
            if args:
                return (x_new,) + tuple(args[1:]), kwargs
            kwargs["input"] = x_new
            return args, kwargs

        return pre

    def _check_plan(self, plan: ViTMerge, b: int, n: int) -> None:
        name = self.method.name
        if plan.src.shape != plan.dst.shape or plan.src.shape[0] != b:
            raise ValueError(
                f"{name}: ViTMerge src/dst must both be [batch, r], got {tuple(plan.src.shape)}, {tuple(plan.dst.shape)}"
            )
        if plan.order is not None and tuple(plan.order.shape) != (b, n - plan.r):
            raise ValueError(f"{name}: ViTMerge order must be [batch, {n - plan.r}], got {tuple(plan.order.shape)}")
        p = self.protected_now
        if plan.r > n - p - 1 or bool((plan.src < p).any()) or bool((plan.dst < p).any()):
            raise ValueError(f"{name}: a merge touched one of the {p} protected prefix tokens or removed too many tokens")

    def _branch_end(self, module, args, kwargs, output):
        blk = self._blk
        if blk.merged is None or blk.branch is not None:
            return None
        blk.branch = output
        return output.new_zeros(())

    def _block_end(self, module, args, kwargs, output):
        blk = self._blk
        if blk.merged is None:
            return None
        if blk.branch is None:
            raise RuntimeError("in_vit: the block's MLP branch did not run after the merge")
        out = blk.merged + blk.branch
        self._blk = _Block()
        if isinstance(output, tuple):
            return (out,) + tuple(output[1:])
        return out


# ------------------------------------------------------------------------------------------ low-rank updates


class _SwappedWeight:
    """``nn.MultiheadAttention`` seen with another ``in_proj_weight`` (every other attribute is the module's):
    its own forward runs on it, hooks untouched, the module itself unchanged."""

    def __init__(self, module, weight):
        object.__setattr__(self, "_m", module)
        object.__setattr__(self, "in_proj_weight", weight)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_m"), name)


def install_qkv_lora(adapter: Adapter, parts: list[BlockParts], method) -> None:
    """Add the method's low-rank update to every block's query/key/value projections: for block i,
    ``method.qkv_lora(i)`` gives ``(A [r, C], B [3C, r])`` (or None) and the packed q|k|v output of an input
    x gains ``x A^T B^T`` (LoRA; B zero-initialised means the untouched projections). Installed before any
    other hook, so the keys a merge matches on are the updated ones (except on ``nn.MultiheadAttention``,
    whose keys vtok computes from the packed weight itself: there the metric stays the frozen projection's)."""
    for i, part in enumerate(parts):
        if method.qkv_lora(i) is None:
            continue
        if part.qkv is None:
            raise ValueError(
                f"{method.name} adds low-rank updates to the attention's query/key/value projections, which vtok "
                f"cannot reach in block {i} ({type(part.attn).__name__}); use a model whose attention has q/k/v "
                "Linear layers, a fused qkv Linear, or nn.MultiheadAttention"
            )
        kind, target = part.qkv
        if kind == "split":
            local = threading.local()  # A x of the block's input, computed once for q, k and v

            for j, lin in enumerate(target):
                def post(module, args, kwargs, out, j=j, i=i, local=local):
                    a, b = method.qkv_lora(i)
                    c = out.shape[-1]
                    x = args[0] if args else next(iter(kwargs.values()))
                    cached = getattr(local, "ax", None)
                    if j == 0 or cached is None or cached[0] is not x:
                        local.ax = cached = (x, F.linear(x, a.to(x.dtype)))
                    if j == len(target) - 1:
                        local.ax = None
                    return out + F.linear(cached[1], b[j * c : (j + 1) * c].to(x.dtype))

                adapter.hook(lin, post, pre=False, prepend=True)
        elif kind == "fused":
            def fused(module, args, kwargs, out, i=i):
                a, b = method.qkv_lora(i)
                x = args[0] if args else next(iter(kwargs.values()))
                return out + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))

            adapter.hook(target, fused, pre=False, prepend=True)
        else:  # nn.MultiheadAttention: its own forward on the updated packed weight
            def make(orig, mha=target, i=i):
                cls_forward = type(mha).forward

                def forward(*args, **kwargs):
                    if adapter.in_hook():
                        return orig(*args, **kwargs)
                    a, b = method.qkv_lora(i)
                    w = mha.in_proj_weight + (b @ a).to(mha.in_proj_weight.dtype)
                    return cls_forward(_SwappedWeight(mha, w), *args, **kwargs)

                return forward

            adapter._hooks.append(InstanceWrap(target, "forward", make))


# ------------------------------------------------------------------------------------------ adapters


class ViTAdapter(Adapter):
    """A standalone vision encoder; runs ``in_vit`` methods. ``source``: the last forward's source map."""

    stages = ("in_vit",)
    probe_types = (ViTAttention,)
    model_classes: tuple = ()

    # family interface
    def tower(self) -> nn.Module:
        return self.model

    def block_parts(self) -> list[BlockParts]:  # pragma: no cover - abstract
        raise NotImplementedError

    def num_prefix_tokens(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def attn_implementation(self) -> str | None:
        return None

    def num_vit_blocks(self) -> int:
        return len(self.block_parts())

    def num_patches(self) -> int | None:
        """Patch tokens per image entering the blocks at the encoder's configured input size (prefix tokens
        excluded), or None if the family does not say."""
        return None

    def dims(self) -> dict:
        parts = self.block_parts()
        n = len(parts)
        norm = parts[0].mlp_in if parts else None
        return {
            "vit_blocks": n,
            "vit_feature_block": n - 1,
            "vision_cls": self.num_prefix_tokens() > 0,
            "vit_tokens": self.num_patches(),
            "vision_hidden": int(norm.normalized_shape[0]) if isinstance(norm, nn.LayerNorm) else None,
        }

    # checks
    def check_probe(self, probe, method) -> None:
        super().check_probe(probe, method)
        n = len(self.block_parts())
        if not -n <= probe.layer < n:
            raise ValueError(f"{method.name}: ViT probe layer {probe.layer} is outside the encoder's blocks 0..{n - 1}")
        if probe.kind == "keycorr":
            raise ValueError(
                f"{method.name}: the standalone ViT adapter serves ViTAttention (kind 'cls'/'colmean') only, not "
                "ViTKeyCorrelation; apply the method to a vision-language model (LLaVA, LLaVA-NeXT, OneVision)"
            )
        if probe.kind == "cls" and self.num_prefix_tokens() == 0:
            raise ValueError(
                f"{method.name}: {type(self.tower()).__name__} has no class token, so it cannot serve "
                "ViTAttention(kind='cls'); use kind='colmean'"
            )

    def validate(self) -> None:
        super().validate()
        self.block_parts()  # raises for block structures vtok does not know
        method = self.method("in_vit")
        check_vit_method(method, self.attn_implementation(), len(self.block_parts()))
        if method is not None and self.num_prefix_tokens() > 0 and not getattr(method, "protect_cls", True):
            raise ValueError(
                f"{method.name}: protect_cls=False would merge the class token of {type(self.tower()).__name__}, whose "
                "output (pooler / class-token head, and the patch tokens it slices after the prefix) reads token 0 as "
                "the class token; use protect_cls=True"
            )

    # hooks
    def attach(self) -> None:
        method = self.method("in_vit")
        if callable(getattr(method, "qkv_lora", None)):
            install_qkv_lora(self, self.block_parts(), method)
        self.runner = InViTRunner(
            self,
            method,
            self.block_parts(),
            protected=self.num_prefix_tokens() if getattr(method, "protect_cls", True) else 0,
            track_source=bool(getattr(method, "trace_source", True)),
            attn_implementation=self.attn_implementation,
            on_reset=self.handle.stats.clear,
            on_record=self._record,
            tower=self.tower(),
            groups=self._row_groups,
        )
        self.runner.install()

    def _row_groups(self, rows: int) -> torch.Tensor | None:
        """The video of each batch row, from ``handle.context(frames=[...])`` (None: every row on its own)."""
        frames = self.handle.call_context().get("frames")
        if frames is None:
            return None
        if sum(frames) != rows:
            raise ValueError(
                f"handle.context(frames={frames}) describes {sum(frames)} frames, but the encoder got {rows} rows; "
                "give one frame count per video of this batch, in order"
            )
        return torch.repeat_interleave(torch.arange(len(frames)), torch.tensor(frames))

    def _record(self, block, n_in, n_out, kept, point):
        b = kept.shape[0]  # rows of the block (frames, or clips once frames were concatenated)
        method = self.method("in_vit")
        self.handle.stats.append(
            Reduction(method.name, "in_vit", block, [n_in] * b, [n_out] * b, list(kept.cpu()), units=[(n_in, n_out)] * b, point=point)
        )

    @property
    def source(self) -> ViTSource | None:
        """Where the output tokens of the last forward came from (None: nothing merged, or trace_source=False)."""
        runner = getattr(self, "runner", None)
        return None if runner is None else runner.source()

    def frame_class_tokens(self) -> list[torch.Tensor]:
        """Per video of the last forward (``handle.context(frames=...)``; each image its own): the class token of
        every frame after the last block, before the tower's head, [frames, C]."""
        return self.runner.class_tokens()

    def class_head(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """What the tower does to its class token after the blocks (final norm, projection) on x [k, C]."""
        raise NotImplementedError


class HFVisionAdapter(ViTAdapter):
    name = "hf_vision"
    model_classes = ("CLIPVisionModel", "SiglipVisionModel", "Dinov2Model")

    @classmethod
    def matches(cls, model) -> bool:
        return type(model).__name__ in cls.model_classes and type(model).__module__.startswith("transformers.")

    def block_parts(self):
        return hf_block_parts(self.model)

    def num_prefix_tokens(self) -> int:
        return 1 if has_cls_token(self.model) else 0

    def num_patches(self) -> int | None:
        return config_patches(self.model.config)

    def attn_implementation(self):
        return hf_attn_implementation(self.model)

    def class_head(self, x: torch.Tensor) -> torch.Tensor:
        core = getattr(self.model, "vision_model", self.model)
        norm = getattr(core, "post_layernorm", None) or getattr(core, "layernorm", None)
        return x if norm is None else norm(x)


class TimmViTAdapter(ViTAdapter):
    name = "timm_vit"
    model_classes = ("timm.models.vision_transformer.VisionTransformer",)

    @classmethod
    def matches(cls, model) -> bool:
        mod = sys.modules.get("timm.models.vision_transformer")
        return mod is not None and isinstance(model, mod.VisionTransformer)

    def block_parts(self):
        return timm_block_parts(self.model)

    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    def num_patches(self) -> int | None:
        n = getattr(getattr(self.model, "patch_embed", None), "num_patches", None)
        return int(n) if n else None

    def class_head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.head(m.head_drop(m.fc_norm(m.norm(x))))


class OpenClipViTAdapter(ViTAdapter):
    name = "open_clip_vit"
    model_classes = ("open_clip.transformer.VisionTransformer", "open_clip CLIP models with .visual")

    @classmethod
    def _vit_class(cls):
        mod = sys.modules.get("open_clip.transformer")
        return None if mod is None else mod.VisionTransformer

    @classmethod
    def matches(cls, model) -> bool:
        vt = cls._vit_class()
        return vt is not None and (isinstance(model, vt) or isinstance(getattr(model, "visual", None), vt))

    def tower(self):
        vt = self._vit_class()
        return self.model if isinstance(self.model, vt) else self.model.visual

    def block_parts(self):
        return open_clip_block_parts(self.tower())

    def text_block_parts(self) -> list[BlockParts]:
        """The text tower's blocks of a whole open_clip CLIP model (none for a bare VisionTransformer)."""
        text = getattr(self.model, "transformer", None)
        if self.model is self.tower() or getattr(text, "resblocks", None) is None:
            return []
        return open_clip_block_parts(self.model)

    def dims(self) -> dict:
        out = super().dims()
        text = self.text_block_parts()
        if text:
            out.update(text_blocks=len(text), text_hidden=int(text[0].mlp_in.normalized_shape[0]))
        return out

    def attach(self) -> None:
        super().attach()
        method = self.method("in_vit")
        text = self.text_block_parts()
        if text and callable(getattr(method, "text_qkv_lora", None)):  # a PEFT method's text-tower LoRA (TempMe)
            install_qkv_lora(self, text, SimpleNamespace(name=method.name, qkv_lora=method.text_qkv_lora))

    def num_prefix_tokens(self) -> int:
        return 1  # open_clip's VisionTransformer always prepends its class embedding

    def num_patches(self) -> int | None:
        grid = getattr(self.tower(), "grid_size", None)
        return int(grid[0]) * int(grid[1]) if grid else None

    def class_head(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tower()
        x = t.ln_post(x)
        return x if t.proj is None else x @ t.proj

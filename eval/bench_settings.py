"""`vtok bench` cases and settings: ``Case``, ``Setting`` and each method's settings on a case.

A method's default and each budget (``retain=b``, or ToMe's per-block ``r`` from ``per_block_r``);
settings that coincide once; a setting the adapter cannot run kept with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .bench_replay import _Captured

BUDGETS = (0.25, 0.10)


@dataclass
class Case:
    """One model and one input. ``kind``: "vlm" (timed with ``generate``: TTFT, decode, memory) or "vit" (one
    forward). ``settings``: settings of the case's own for some methods, ``{name: [(label, hparams), ...]}``,
    used instead of the default + budgets; ``budgets``: the budgets the other methods are run at."""

    name: str
    kind: str
    model: torch.nn.Module
    inputs: dict
    description: str
    settings: dict = field(default_factory=dict)
    budgets: tuple = BUDGETS
    processor: object = None  # the model's processor, for methods that read the question or ask the model (QuoTA)

    def apply_kwargs(self) -> dict:
        """``vtok.apply`` keywords the case adds to a setting's."""
        return {"processor": self.processor} if self.processor is not None else {}

    def forward(self):
        """The prefill as ``generate`` runs it (VLM), or the forward (ViT)."""
        if self.kind == "vlm":
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        return self.model(**self.inputs)


@dataclass(frozen=True)
class Setting:
    method: str | None  # None: the untouched model
    hparams: tuple = ()  # sorted (key, value) pairs
    label: str = "default"
    note: str = ""
    skip: str = ""  # why the setting is not run (left in the table with the reason)

    @property
    def settings(self) -> str:
        """``k=v, ...`` as ``vtok eval`` writes it (rows of the two match by method and this string)."""
        return ", ".join(f"{k}={v}" for k, v in self.hparams) or "-"

    def kwargs(self) -> dict:
        """``vtok.apply`` keywords; a method that needs trained weights runs untrained (the bench times it)."""
        from vtok.method import get_method_class

        untrained = self.method is not None and get_method_class(self.method).needs_weights
        return {**dict(self.hparams), **({"weights": "untrained"} if untrained else {})}


def per_block_r(blocks: int, tokens: int, visual: int, target: int) -> tuple[list, int]:
    """A per-block ToMe schedule for ``blocks`` blocks that leaves ``target`` of ``visual`` visual tokens.

    ``tokens`` enter the first block, of which ``tokens - visual`` are protected (CLS). A block removes at
    most half of its unprotected tokens (bipartite matching). Returns (r per block, visual tokens it leaves):
    the removal spread evenly, then moved to the earliest blocks with room while the limit bites.
    """
    p = tokens - visual

    def left(r):
        n = tokens
        for v in r:
            n -= min(v, (n - p) // 2)
        return n - p

    remove = max(0, visual - target)
    r = [remove // blocks + (1 if i < remove % blocks else 0) for i in range(blocks)]
    while left(r) > target:
        n = tokens
        for i, v in enumerate(r):
            cap = (n - p) // 2
            if v < cap:
                r[i] += 1
                break
            n -= min(v, cap)
        else:
            break  # every block merges all it can
    n = tokens
    for i, v in enumerate(r):  # what each block really merges (ToMe clamps r to half the unprotected tokens)
        r[i] = min(v, (n - p) // 2)
        n -= r[i]
    return r, n - p


@dataclass(frozen=True)
class _ViTShape:
    """What ``per_block_r`` needs of a VLM's vision tower: blocks in the schedule, tokens entering per image,
    visual tokens per image."""

    blocks: int
    tokens: int
    visual: int


def _budget_hparams(cls, budget: float, vit: _ViTShape | None):
    """(hparams or None, note) that reach ``budget`` with method class ``cls``: ``retain``, a per-block ToMe
    ``r``, or whatever the method's own ``settings_for_budget`` gives (M3's nested scales, TokenFLEX's n)."""
    from vtok.method import BudgetContext, keep_count

    names = {f.name for f in dataclasses.fields(cls)}
    if "retain" in names:
        return {"retain": budget}, ""
    if "r" in names and callable(getattr(cls, "vit_schedule", None)):
        if vit is None or not vit.blocks:
            return None, f"{cls.name}: no vision tower schedule on this model for budget {budget:g}"
        target = keep_count(vit.visual, budget)
        r, reached = per_block_r(vit.blocks, vit.tokens, vit.visual, target)
        note = "" if reached == target else f"per-block r reaches {reached} visual tokens, not {target}"
        return {"r": r}, note
    hp = None if vit is None else cls.settings_for_budget(budget, BudgetContext(vit.visual, vit.blocks, max(0, vit.tokens - vit.visual)))
    if hp is None:
        return None, f"{cls.name} has no budget setting on this model: reported at its default only"
    return hp, ""


def case_settings(case: Case, names, vit: _ViTShape | None) -> list[Setting]:
    """Every method of ``names`` (registry order) at its settings for ``case``; coinciding settings once."""
    from vtok.method import get_method_class

    from .runner import Setting as RunnerSetting, _can_attach

    out: list[Setting] = []
    for name in names:
        cls = get_method_class(name)
        if name in case.settings:
            cands = [(label, hp, "") for label, hp in case.settings[name]]
        else:
            cands = [("default", {}, "")]
            for b in case.budgets:
                hp, note = _budget_hparams(cls, b, vit)
                if hp is None:
                    if not any(s.note == note for s in out):
                        out.append(Setting(name, (), f"budget {b:g}", note, skip=note))
                    continue
                cands.append((f"budget {b:g}", hp, note))
        seen: dict = {}
        for label, hp, note in cands:
            try:
                config = repr(cls(**hp).config())
            except (TypeError, ValueError) as e:
                out.append(Setting(name, tuple(sorted(hp.items())), label, skip=str(e).splitlines()[0]))
                continue
            if config in seen:  # e.g. random's default is retain=0.25
                i = seen[config]
                out[i] = dataclasses.replace(out[i], label=f"{out[i].label} = {label}")
                continue
            s = Setting(name, tuple(sorted(hp.items())), label, note)
            why = _can_attach(case.model, RunnerSetting(name, s.hparams))
            seen[config] = len(out)
            out.append(dataclasses.replace(s, skip=why) if why else s)
    return out


def _vit_shape(case: Case, base: _Captured) -> _ViTShape | None:
    """What ``per_block_r`` needs of a VLM case's tower, from its untouched capture ``base`` (None for a ViT case)."""
    from vtok.adapters import find_adapter

    blocks = find_adapter(case.model)(case.model, {}, None).num_vit_blocks()
    if not blocks or case.kind != "vlm":
        return None
    images = base.calls["vision"][0].hidden.shape[0]  # images (frames, crops) of the batch
    visual = sum(base.flops.visual_entry) // images
    return _ViTShape(blocks, base.calls["vision"][0].n_in, visual)

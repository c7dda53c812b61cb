"""HF ``LlavaForConditionalGeneration`` (LLaVA-1.5 style): one fixed-size grid of tokens per image."""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, replace

import torch

from vtok.method import ViTAttention
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

from .base import InstanceWrap, per_thread
from .hf_vision import has_cls_token, vit_probe_stats
from .vit import InViTRunner
from .vlm import VLMAdapter

__all__ = ["LlavaAdapter"]


@dataclass
class _ViTFeatures:
    """What the last reducing tower run (in_vit) or projector stage left for the prefill: the tokens the
    LLM gets per image, fewer than the image's placeholders."""

    positions: torch.Tensor  # [images, n] slot of each token in the image's placeholder span, sorted
    sizes: torch.Tensor  # [images, n] patches per token
    n_full: int  # features per image without reduction (= placeholders per image)
    # in_vit: (block, n_in, n_out, kept [images, n_out]) per merging block; projector: one
    # (None, n_in, [n_out per image], None)
    records: list
    features: torch.Tensor | None = None  # projected tokens [images, n, D]
    # the tensor the prefill will be handed, [images, n_full, D]: the zero-padded projector output, or
    # the rows of it that generate pre-computed (recognised by identity, see _rows_of)
    padded: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [images, n] real tokens (None: all; a projector stage may be ragged)
    #: in_vit: [images, n_full] for every patch the index of the merged token holding it (among ``positions``)
    patch_token: torch.Tensor | None = None
    stage: str = "in_vit"
    method: str = ""
    points: list | None = None  # in_vit: per record, where in its block the merge ran ("attn" / "mlp")

    def select(self, rows: list[int], padded: torch.Tensor) -> "_ViTFeatures":
        """These images, in this order (``generate`` repeats groups of images for beams / sequences)."""
        idx = torch.tensor(rows, device=self.positions.device)
        pick = lambda k: k if not isinstance(k, torch.Tensor) else k[idx.to(k.device)]  # noqa: E731
        return replace(
            self,
            positions=self.positions[idx],
            sizes=self.sizes[idx],
            records=[(b, i, [o[j] for j in rows] if isinstance(o, list) else o, pick(k)) for b, i, o, k in self.records],
            features=self.features[idx.to(self.features.device)],
            padded=padded,
            mask=None if self.mask is None else self.mask[idx.to(self.mask.device)],
            patch_token=None if self.patch_token is None else self.patch_token[idx.to(self.patch_token.device)],
        )


def _rows_of(views, padded: torch.Tensor) -> list[int] | None:
    """Which row of ``padded`` each tensor of ``views`` is, when they are the row views the model made of
    it (``list(image_features)``), read from their storage offsets, never from their values; None if one
    is not such a view."""
    rows = []
    for t in views:
        if (
            not isinstance(t, torch.Tensor)
            or t.shape != padded.shape[1:]
            or t.stride() != padded.stride()[1:]
            or t.untyped_storage().data_ptr() != padded.untyped_storage().data_ptr()
        ):
            return None
        j, rest = divmod(t.storage_offset() - padded.storage_offset(), padded.stride(0))
        if rest or not 0 <= j < padded.shape[0]:
            return None
        rows.append(j)
    return rows


def _padded(merged: torch.Tensor, vit: "_ViTFeatures") -> torch.Tensor:
    """The tokens [images, k, D] at their slot of the full layout (zeros elsewhere; pad tokens nowhere)."""
    n_img, _, d = merged.shape
    full = merged.new_zeros(n_img, vit.n_full + 1, d)
    pos = vit.positions if vit.mask is None else vit.positions.masked_fill(~vit.mask, vit.n_full)
    full.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, d), merged)
    return full[:, : vit.n_full]


class LlavaAdapter(VLMAdapter):
    name = "llava"
    _vit_last = per_thread()  # the in_vit run the coming prefill splices (per thread, like all per-call state)
    _vit_run = per_thread()  # the last in_vit run of this thread (pre-computed features are its rows)
    model_classes = ("LlavaForConditionalGeneration",)
    stages = ("in_vit", "projector", "before_llm", "in_llm")
    unmerges_for_grids = True

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    # model knowledge -----------------------------------------------------------
    @property
    def projector(self):
        return self.model.model.multi_modal_projector

    def parts(self) -> dict:
        return {"projector": self.projector}

    def placeholder_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def _strategy(self) -> str:
        return self.model.config.vision_feature_select_strategy

    def _drops_cls(self) -> bool:
        return self._strategy() == "default"

    def grid(self, n_tokens: int):
        vc = self.model.config.vision_config
        g = getattr(vc, "image_size", 0) // getattr(vc, "patch_size", 1)
        if g * g == n_tokens:
            return (g, g)
        r = math.isqrt(n_tokens)
        return (r, r) if r * r == n_tokens else None

    def validate(self) -> None:
        super().validate()
        method = self.method("in_vit")
        proj = self.method("projector")
        if proj is not None and method is not None:
            raise ValueError(
                f"{proj.name} works on the projector's input grid, which {method.name} already merged inside the "
                f"vision tower; use {proj.name} with a before_llm or in_llm method instead"
            )
        if method is None:
            return
        self.validate_tower_method(method, self._drops_cls())
        full = any(m.needs_full_grids for m in self.methods.get("before_llm", []))
        for m in self.all_methods():
            if any(isinstance(p, ViTAttention) for p in m.probes()) and not (full and m.needs_full_grids):
                raise ValueError(
                    f"{m.name} needs ViT attention probes, which are not aligned with the tokens once {method.name} "
                    "merged them inside the tower; use these methods separately"
                )

    # hooks ----------------------------------------------------------------------
    def attach_vision(self) -> None:
        self._vit: InViTRunner | None = None
        self._vit_last = self._vit_run = None  # per thread (class attributes)
        method = self.method("in_vit")
        if method is not None:
            tower = self.vision_tower
            protect = self._drops_cls() or (has_cls_token(tower) and getattr(method, "protect_cls", True))
            self._vit = self.install_tower_runner(method, protected=int(protect), on_reset=self._vit_reset)
            self.hook(self.projector, self._projector_pre, pre=True)
        if self.method("projector") is not None:
            self._hooks.append(InstanceWrap(self.projector, "forward", self._wrap_projector))
        self.hook(self.projector, self._projector_post, pre=False)
        self.hook_vit_probes()

    def _make_vit_probe(self, probes):
        def pre(module, args, kwargs):
            fw = self._fw
            if fw is not None and not fw.prefill:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            prefix = int(has_cls_token(self.vision_tower))
            assign = self._vit.assign if self._vit is not None else None  # merges before this block, if any
            for p in probes:
                stats = vit_probe_stats(module, hidden, p, prefix)
                if assign is not None:  # every patch gets the statistic of the token holding it (full-grid methods)
                    stats = stats.gather(1, assign.to(stats.device))
                self.capture_probe(p, stats[:, 1:] if self._drops_cls() and has_cls_token(self.vision_tower) else stats)
            return None

        return pre

    @property
    def source(self):
        """The in_vit source map of the last tower run (``vtok.vit.ViTSource``), or None."""
        runner = getattr(self, "_vit", None)
        return None if runner is None else runner.source()

    def _vit_reset(self):
        self._vit_last = None
        self._vit_run = None  # the tower run generate's pre-computed features come from (kept for every prefill)

    def _wrap_projector(self, orig):
        """The projector stage: the method gets the projector's input and the projector, and its tokens
        replace the projector's output (``_projector_post`` hands the model one row per placeholder)."""
        method = self.method("projector")

        @functools.wraps(orig)
        def forward(image_features, *args, **kwargs):
            fw = self._fw
            if self.in_hook() or (fw is not None and not fw.active):  # nested, or a call that runs untouched
                return orig(image_features, *args, **kwargs)
            self._local.depth = 1
            try:
                return self._projector_stage(method, image_features, lambda x: orig(x, *args, **kwargs))
            finally:
                self._local.depth = 0

        return forward

    def _projector_stage(self, method, feats, project):
        if feats.dim() != 3:
            raise ValueError(f"{method.name}: expected projector input [images, tokens, dim], got {tuple(feats.shape)}")
        self.handle.check_trained()
        n_img, n, _ = feats.shape
        tokens = VisualTokens.from_features(feats, self._image_owner(n_img, n), grid=self.grid(n))
        out = method.projector(tokens, project)
        if not isinstance(out, VisualTokens):
            raise TypeError(f"{method.name}.projector must return VisualTokens, got {type(out).__name__}")
        counts = out.counts().tolist()
        if out.num_units != n_img or max(counts, default=0) > n:
            raise ValueError(
                f"{method.name}.projector returned {out.num_units} image(s) with up to {max(counts, default=0)} tokens "
                f"for {n_img} image(s) of {n}; the projector stage returns at most one token per placeholder"
            )
        if self.direct_call() and len(set(counts)) > 1:
            raise ValueError(
                f"get_image_features called directly returns one tensor of equal rows per image, but {method.name} "
                f"gives these images {counts} tokens; call it with one setting for every image, or call the model"
            )
        self._vit_last = _ViTFeatures(
            positions=out.positions, sizes=out.sizes, n_full=n, records=[(None, n, counts, None)],
            mask=None if min(counts, default=0) == out.mask.shape[1] else out.mask, stage="projector", method=method.name,
        )
        return out.features

    def _image_owner(self, n_img: int, n: int) -> torch.Tensor:
        """The batch row of each image, from the ids of the call in flight (each image its own row when the
        features are computed outside a model call, or the ids do not tell)."""
        fw = self._fw
        ids = fw.input_ids if fw is not None and fw.prefill else self._call_ids
        if ids is not None and ids.dim() == 2:
            per_row = (ids == self.placeholder_ids()[0]).sum(1)
            if bool((per_row % n == 0).all()) and int(per_row.sum()) == n_img * n:
                return torch.repeat_interleave(torch.arange(ids.shape[0]), (per_row // n).cpu())
        return torch.arange(n_img)

    def _projector_pre(self, module, args, kwargs):
        """After in_vit merged: restore raster order (by each token's first patch) before the projector."""
        runner = self._vit
        src = runner.source()
        if src is None:
            return None
        feats = args[0] if args else kwargs["image_features"]
        drop = 1 if self._drops_cls() else 0
        first = src.first()
        if feats.dim() != 3 or feats.shape[1] != first.shape[1] - drop or feats.shape[0] != first.shape[0]:
            raise ValueError(
                f"the projector got features of shape {tuple(feats.shape)}, but the merged vision tower produced "
                f"{first.shape[0]} image(s) x {first.shape[1]} tokens; with an in_vit method, take the features "
                "from the model config's vision_feature_layer (do not override it per call)"
            )
        first, sizes = first[:, drop:] - drop, src.sizes[:, drop:]
        order = torch.argsort(first, dim=1)
        feats = feats.gather(1, order.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        self._vit_last = _ViTFeatures(
            positions=first.gather(1, order),
            sizes=sizes.gather(1, order),
            n_full=runner.n0 - drop,
            records=list(runner.records),
            points=[p for p, _ in runner.points],
            method=self.method("in_vit").name,
            patch_token=rank.gather(1, src.assign[:, drop:] - drop),  # the projector input drops the prefix token
        )
        if args:
            return (feats,) + tuple(args[1:]), kwargs
        kwargs["image_features"] = feats
        return args, kwargs

    def _projector_post(self, module, args, kwargs, output):
        vit = self._vit_last
        if vit is not None and vit.padded is None:
            # the model expects one feature per placeholder: hand it the merged tokens at their first
            # patch's slot (zeros elsewhere); the LM entry then splices the merged tokens only
            vit.features, vit.padded = output, _padded(output, vit)
            self._vit_run = vit
            if self.direct_call():
                # get_image_features called by the user: the merged tokens themselves (in raster order of
                # their first patch); passed back as pre-computed features they are laid out again
                self._vit_last = None
                return None
            self.capture_features(vit.padded)
            return vit.padded
        self.capture_features(output)
        return None

    def _take_vit_features(self, features):
        """The last merged tower run's data for ``features``, which must be the very tensor that run
        handed on (``_ViTFeatures.padded``); None when no in_vit merge is pending."""
        vit = self._vit_last
        if vit is None or vit.padded is None:
            return None
        self._vit_last = None
        if features is vit.padded:
            return vit
        raise ValueError(
            "the image features of this prefill are not the ones the vision tower just produced with the in_vit "
            "method attached; pass pixel_values (not pre-computed features) while an in_vit method is attached"
        )

    def _record_vit(self, vit: _ViTFeatures, owner: torch.Tensor, batch: int) -> None:
        owner = owner.tolist()
        points = vit.points or [None] * len(vit.records)
        for (block, n_in, n_out, kept), point in zip(vit.records, points):
            tin, tout = [0] * batch, [0] * batch
            ks = [[] for _ in range(batch)]
            for u, o in enumerate(owner):
                if kept is not None:
                    ks[o].append(kept[u].cpu() + tin[o])
                tin[o] += n_in
                tout[o] += n_out[u] if isinstance(n_out, list) else n_out
            kept_t = None if kept is None else [torch.cat(k) if k else torch.zeros(0, dtype=torch.long) for k in ks]
            if kept is None:  # the projector stage: (in, out) per image
                units = [(n_in, n_out[u]) for u in range(len(owner))]
            else:  # in_vit: (in, out) per tower row (image), with the merge point, for the FLOP count
                units = [(n_in, n_out)] * len(owner)
            self.handle.stats.append(Reduction(vit.method, vit.stage, block, tin, tout, kept_t, units, point=point))

    def expand_encoder_outputs(self, mm_encoder_outputs: dict) -> dict:
        """Merged tokens a direct ``get_image_features`` call returned (rows of the last merged run's
        output, by identity) come back one feature per placeholder, as the model's forward needs them."""
        image = mm_encoder_outputs.get("image")
        vit = self._vit_run
        if image is None or vit is None or vit.features is None or getattr(image, "pooler_output", None) is None:
            return mm_encoder_outputs
        rows = _rows_of(list(image.pooler_output), vit.features)
        if rows is None:
            return mm_encoder_outputs
        padded = vit.padded[torch.tensor(rows, device=vit.padded.device)]
        self._vit_last = vit.select(rows, padded=padded)  # features_from_encoder_outputs finds its rows
        out = copy.copy(image)
        out.pooler_output = list(padded)
        return {**mm_encoder_outputs, "image": out}

    def features_from_encoder_outputs(self, mm_encoder_outputs: dict):
        """The pre-computed image features [images, tokens, D]. When they are rows of an in_vit run's
        output (``generate`` computed them with the method attached, maybe repeating groups of images; or
        a direct call's merged tokens, laid out again by ``expand_encoder_outputs``), the pending run is
        narrowed to those rows, in their order. The run stays known for every later prefill over the same
        features (``generate(use_cache=False)`` runs a full prefill at every step)."""
        image = mm_encoder_outputs.get("image")
        if image is None:
            return None
        rows = list(image.pooler_output)
        features = torch.stack(rows)
        for vit in (self._vit_last, self._vit_run):
            if vit is not None and vit.padded is not None:
                found = _rows_of(rows, vit.padded)
                if found is not None:
                    self._vit_last = vit.select(found, padded=features)
                    return features
        shaper = self._feature_method()
        if shaper is not None:
            raise ValueError(
                f"these pre-computed image features are not ones the model produced with {shaper.name} attached "
                "(vtok knows them by identity, never by value); pass pixel_values, or the very output of "
                "model.get_image_features(...) while the method is attached"
            )
        return features

    def build_units(self, features, input_ids):
        vit = self._take_vit_features(features) if self._feature_method() is not None else None
        units, spans = self._grid_units(features, input_ids)
        if vit is None:
            return units, spans
        dev = units.features.device
        self._record_vit(vit, units.owner, int(input_ids.shape[0]))
        if vit.patch_token is not None and any(m.needs_full_grids for m in self.methods.get("before_llm", [])):
            # a before_llm method needs the full grid: every patch takes the value of the merged token holding it
            # (ToMe's unmerge); the tower ran on fewer tokens, the method decides what the LLM gets
            full = vit.features.to(dev, features.dtype).gather(
                1, vit.patch_token.to(dev).unsqueeze(-1).expand(-1, -1, vit.features.shape[-1])
            )
            return replace(units, features=full), spans
        # in_vit merged inside the tower (the merged tokens, in raster order of their first patch, with their
        # sizes) or the projector stage reduced: placeholders still count the unreduced tokens
        n = vit.positions.shape[1]
        units = replace(
            units,
            features=vit.features.to(dev, features.dtype),
            mask=torch.ones(units.num_units, n, dtype=torch.bool, device=dev) if vit.mask is None else vit.mask.to(dev),
            positions=vit.positions.to(dev),
            sizes=vit.sizes.to(dev),
        )
        self._fw.vit_reduced = True
        return units, spans

    def _grid_units(self, features, input_ids):
        if features.dim() != 3:
            raise ValueError(f"expected projected image features [images, tokens, dim], got {tuple(features.shape)}")
        n_img, n_tok, _ = features.shape
        placeholder = input_ids == self.placeholder_ids()[0]
        per_sample = placeholder.sum(1).tolist()
        if sum(per_sample) != n_img * n_tok or any(c % n_tok for c in per_sample):
            raise ValueError(
                f"image placeholder count does not match the image features: input_ids hold {per_sample} "
                f"placeholder tokens (id {self.placeholder_ids()[0]}) per sample, but the vision tower produced "
                f"{n_img} image(s) x {n_tok} features. Pass input_ids exactly as the processor made them "
                f"({n_tok} placeholders per image) together with their pixel_values"
            )
        rows, cols = placeholder.nonzero(as_tuple=True)  # row-major: the order masked_scatter fills
        owner = rows.view(n_img, n_tok)[:, 0]
        spans = list(cols.view(n_img, n_tok))
        return VisualTokens.from_features(features, owner, grid=self.grid(n_tok)), spans

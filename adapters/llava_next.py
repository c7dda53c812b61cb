"""HF ``LlavaNextForConditionalGeneration`` (LLaVA-1.6, AnyRes): base image + crops, unpadding, newlines.

One unit per image (base grid, then the unpadded high-resolution grid); the layout of each image is
read from the model's own ``pack_image_features`` (``vtok.adapters.anyres``), and image newlines are
put back after a reduction. ``LlavaNextAdapter`` documents the per-token bookkeeping.
"""

from __future__ import annotations

import functools
import inspect

import torch

from vtok.hf_compat import family_module, precomputed_visual_features
from vtok.method import ViTAttention
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

from .anyres import UNIT_FIELDS, LayoutStore, VisualLayout, pack_units, parse_image, ramp
from .anyres_stages import AnyResStages
from .hf_vision import has_cls_token, vit_probe_stats
from .base import InstanceWrap, per_thread
from .vlm import VLMAdapter

__all__ = ["LlavaNextAdapter", "VisualLayout"]


class LlavaNextAdapter(AnyResStages, VLMAdapter):
    """LLaVA-NeXT: one unit per image, base grid then unpadded high-resolution grid, newlines as layout.

    A unit's tokens are the base (thumbnail) image's ``h x w`` grid in raster order, followed by the
    unpadded high-resolution grid (all crops stitched, ``rows x cols``) in raster order. ``image_newline``
    tokens are not part of the units: they are layout, and ``place_reduced`` puts them back after a
    reduction: a row keeps its newline when at least one of its tokens survives (merged tokens count for
    the row of their ``position``), a row with no surviving token gets none, so rows stay separated
    exactly as in the untouched model.

    Per-token bookkeeping (``VisualTokens``):

    - ``positions``: index in the unit's newline-free layout above (base grid, then high-res grid);
    - ``grids[u]``: ``[(h, w), (rows, cols)]`` (only ``[(h, w)]`` for an image without crops), so
      ``pool`` pools the base grid and the high-res grid separately; ``grid`` is None (no common grid);
    - ``extra["crop"]``: 0 for base-image tokens, k >= 1 for the k-th AnyRes crop (raster order over
      the crop grid) a high-res token comes from, so a method can work per crop or globally;
    - ``extra["block"]``: 0 base grid, 1 high-res grid; ``extra["row"]``/``extra["col"]``: the token's
      row and column in its block's grid (``row`` of a high-res token = the newline row it sits in);
    - ``extra["patch"]``: raster index, inside its crop's tower grid, of the patch the token comes from.

    Budgets of ``before_llm`` methods are therefore per image (base + crops), newline tokens not
    counted. ``in_llm`` methods see every image placeholder (newlines included) as a visual token.

    How the features were laid out is read from the model's own code: ``image_layouts`` runs the
    model's ``pack_image_features`` on a small coordinate tensor (its unpadding and, for OneVision, its
    ``anyres_max`` down-scaling) instead of re-implementing it. The wrapped ``get_image_features`` (see
    ``InstanceWrap``) is where the image sizes are visible, both when ``forward`` runs the tower and
    when ``generate`` pre-computes the features (``mm_encoder_outputs``).
    """

    # per-call state, per thread (see VLMAdapter)
    _vit_raw = per_thread()  # probe -> list of per-tower-call stats, inside a wrapped call
    _tower_rows = per_thread()  # the video of each row of the coming tower call (None: every row its own)
    _tower_units = per_thread()  # (modality, [rows] image / video of each row) of the coming tower call
    _tower_calls = per_thread(list)  # the in_vit tower calls whose features the coming prefill uses
    _tower_used = per_thread()  # a prefill counted _tower_calls already (the next tower run starts a new set)
    _tower_unmerge = per_thread()  # the tower run whose merged features the next projector call unmerges

    name = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    stages = ("in_vit", "before_llm", "in_llm", "projector")
    #: in_vit merges are undone at the projector's output, so the model's own unpadding, pooling and
    #: newlines apply to every crop's / frame's full grid (see ``_unmerge_projected``)
    unmerges_for_grids = True
    in_vit_shortens_prompt = False

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaNextForConditionalGeneration

        return isinstance(model, LlavaNextForConditionalGeneration)

    # model knowledge -----------------------------------------------------------
    @property
    def vision_tower(self):
        return self.core.vision_tower

    def placeholder_ids(self) -> list[int]:
        return [int(self.model.config.image_token_id)]

    def _modalities(self) -> list[tuple[str, int]]:
        """(modality, placeholder id) of every kind of visual input of the family."""
        return [("image", int(self.model.config.image_token_id))]

    def _patch_grid(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _hf_module(self):
        """The transformers module of this family (its anyres helpers)."""
        return family_module(self.core)

    def _strategy(self, value=None) -> str:
        return value if value is not None else self.model.config.vision_feature_select_strategy

    # attach ----------------------------------------------------------------------
    def attach_vision(self) -> None:
        self._feature_layouts = LayoutStore()  # feature tensor the tower produced -> its layout(s)
        self._vit_raw = None
        self._tower_rows = self._tower_unmerge = self._tower_units = self._tower_used = None
        self._tower_calls = []
        self._hooks.append(InstanceWrap(self.core, "get_image_features", self._wrap_image_features))
        self._vit = None
        method = self.method("in_vit")
        if method is not None:
            protect = self._drops_cls() or (has_cls_token(self.vision_tower) and getattr(method, "protect_cls", True))
            self._vit = self.install_tower_runner(
                method, protected=int(protect and has_cls_token(self.vision_tower)), on_reset=self._tower_reset,
                groups=lambda rows: self._tower_rows,
            )
            self.hook(self.model.model.multi_modal_projector, self._unmerge_projected, pre=False)
        self.hook_vit_probes()

    def _make_vit_probe(self, probes):
        def pre(module, args, kwargs):
            if self._vit_raw is None:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            prefix = int(has_cls_token(self.vision_tower))
            runner = self._vit
            for p in probes:
                stats = vit_probe_stats(module, hidden, p, prefix)
                if runner is not None and runner.reduced:  # every patch: the statistic of the token holding it
                    stats = runner.unmerge(stats.unsqueeze(-1))[..., 0]
                self._vit_raw[p].append(stats)
            return None

        return pre

    # in_vit in the tower: every crop (NeXT, OneVision images) and frame (OneVision videos) -------------
    def validate(self) -> None:
        super().validate()
        method = self.method("in_vit")
        if method is not None:
            self.validate_tower_method(method, self._drops_cls())

    def _drops_cls(self) -> bool:
        """Whether the model drops token 0 of every tower row (the class token) before the projector."""
        return self._strategy() == "default" and has_cls_token(self.vision_tower)

    def _feature_method(self):
        """Only a projector-stage method shapes what the placeholders get: in_vit merges are undone at the
        projector's output, so a call vtok does not reduce may run the model's own path on them."""
        return self.method("projector")

    def _tower_reset(self):
        self._tower_unmerge = self._vit

    def _unmerge_projected(self, module, args, kwargs, output):
        """After an in_vit run: the projected tokens [rows, n, D] back to one per patch of every crop / frame
        ([crops or frames, patches, D]), each patch holding the value of the merged token it went into (ToMe's
        unmerge), so the model's own unpadding, 2x2 pooling and newlines apply unchanged. The tower ran on
        fewer tokens; what the LLM gets is decided by before_llm / in_llm methods."""
        runner, self._tower_unmerge = self._tower_unmerge, None
        if runner is None:
            return None
        self._record_tower(runner)
        src = runner.source()
        if src is None:
            return None
        drop = int(self._drops_cls())
        rows_out, n_out = int(src.sizes.shape[0]), int(src.sizes.shape[1])
        if output.dim() != 3 or output.shape[0] != rows_out or output.shape[1] != n_out - drop:
            raise ValueError(
                f"the projector got features of {tuple(output.shape[:2])} tokens, but the merged vision tower produced "
                f"{rows_out} row(s) x {n_out} tokens; with an in_vit method, take the features from the model config's "
                "vision_feature_layer and vision_feature_select_strategy (do not override them per call)"
            )
        if drop and src.rows is not None:
            raise ValueError(
                f"{runner.method.name} concatenated frames inside the tower, but this model drops token 0 of every "
                "row (vision_feature_select_strategy='default'), which would drop only the first frame's class "
                "token; merge across frames in a tower whose features are taken in full"
            )
        if drop:
            output = torch.cat([output.new_zeros(output.shape[0], 1, output.shape[2]), output], dim=1)
        full = src.gather(output)
        return full[:, drop:]

    def _record_tower(self, runner) -> None:
        """Keep what this tower call merged, with the image / video each row belongs to; the prefill turns it
        into per-sample stats (``_tower_stats``)."""
        if self._tower_used:
            self._tower_calls, self._tower_used = [], False
        if runner.records and self._tower_units is not None:
            modality, units = self._tower_units
            self._tower_calls.append((modality, units, list(runner.records), list(runner.points)))

    def _tower_stats(self) -> None:
        """One Reduction per merge point of a block, summed over the tower calls of this prefill: per sample,
        its crops' / frames' tokens before and after (kept: positions within them, crop after crop), and
        ``units``: every tower row's (in, out), for the FLOP count."""
        fw = self._fw
        owner = {}
        for modality, token_id in self._modalities():
            lays = fw.layouts.get(modality)
            if lays is None:
                continue
            slots = (fw.input_ids == token_id).nonzero()
            lengths = [lay.length for lay in lays]
            if not lays or sum(lengths) != slots.shape[0]:
                continue  # build_units names the mismatch when a method needs the units
            owner[modality] = slots[torch.tensor([0] + lengths[:-1]).cumsum(0), 0].tolist()
        batch = int(fw.input_ids.shape[0])
        events: dict = {}
        for modality, units, records, points in self._tower_calls:
            if modality not in owner:
                continue
            for (block, n_in, n_out, kept), (point, origin) in zip(records, points):
                ev = events.setdefault((block, point == "mlp"), ([0] * batch, [0] * batch, [[] for _ in range(batch)], []))
                tin, tout, ks, rows = ev
                for j, o in enumerate(origin.tolist()):
                    b = owner[modality][int(units[o])]
                    ks[b].append(kept[j].cpu() + tin[b])
                    tin[b] += n_in
                    tout[b] += n_out
                    rows.append((n_in, n_out))
        self._tower_used = True  # kept for later prefills over the same pre-computed features
        name = self.method("in_vit").name
        for (block, mlp), (tin, tout, ks, rows) in sorted(events.items()):
            kept = [torch.cat(k) if k else torch.zeros(0, dtype=torch.long) for k in ks]
            self.handle.stats.append(
                Reduction(name, "in_vit", block, tin, tout, kept, units=rows, point="mlp" if mlp else "attn")
            )

    def _note_layouts(self, modality: str, layouts: list) -> None:
        """The layouts of the features the tower just produced, for the prefill in flight (a tower run
        outside a forward -- generate's pre-computation -- is found again through ``_feature_layouts``)."""
        self._attach_stage_grids(modality, layouts)  # native grids / projector input, when a stage needs them
        if self._fw is not None:
            self._fw.layouts[modality] = layouts

    def _needs_layouts(self) -> bool:
        """Layouts are read for a before_llm or a projector-stage method (which need units) and for an in_vit
        method (which needs to know the sample each tower row belongs to: its stats are per sample)."""
        return self._needs_units() or "in_vit" in self.methods

    def _needs_units(self) -> bool:
        """Units are only built for a before_llm or a projector-stage method."""
        return "before_llm" in self.methods or "projector" in self.methods

    def _vit_probes(self) -> list:
        return [p for m in self.all_methods() for p in m.probes() if isinstance(p, ViTAttention)]

    def _call_tower(self, fn, *args, **kwargs):
        """Run ``fn`` (which runs the tower) collecting ViT probe statistics: (output, {probe: [rows, n]})."""
        probes = self._vit_probes()
        self._vit_raw = {p: [] for p in probes}
        try:
            out = fn(*args, **kwargs)
            raw = {p: torch.cat(v) for p, v in self._vit_raw.items() if v}
        finally:
            self._vit_raw = None
        return out, raw

    def _drop_cls(self, stats, strategy):
        if self._strategy(strategy) == "default" and has_cls_token(self.vision_tower):
            return stats[:, 1:]
        return stats

    # images: layout from the model's own packing ------------------------------------
    def _wrap_image_features(self, orig):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_image_features(*args, **kwargs):
            if not self._needs_layouts() or self.in_hook():  # in_hook: a nested call runs untouched
                return orig(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            a.update(a.pop("kwargs", {}) or {})
            rows = self._patch_rows(**a)
            units = torch.cat([torch.full((len(r),), i) for i, r in enumerate(rows)]) if rows else None
            outer, self._tower_units = self._tower_units, ("image", units)
            try:
                out, raw = self._call_tower(orig, *args, **kwargs)
            finally:
                self._tower_units = outer
            layouts = self.image_layouts(**a)
            for p, stats in raw.items():
                stats = self._drop_cls(stats, a.get("vision_feature_select_strategy"))
                for lay, rows in zip(layouts, self._patch_rows(**a)):
                    lay.vit[p] = stats[rows].reshape(-1)[lay.src]
            feats = getattr(out, "pooler_output", None)
            if isinstance(feats, (list, tuple)) and len(feats) == len(layouts):
                for t, lay in zip(feats, layouts):
                    if t.shape[0] != lay.length:
                        raise RuntimeError(
                            f"vtok's reading of the image layout ({lay.length} tokens) disagrees with the model "
                            f"({t.shape[0]}); please report this with your transformers version"
                        )
                    self._feature_layouts.put(t, lay)  # for generate's mm_encoder_outputs
            self._note_layouts("image", layouts)
            return out

        return get_image_features

    def num_patches(self, image_sizes, **options) -> list[int]:
        """Tower inputs (base + crops) per image, as the model's get_image_features counts them
        (``options``: its other arguments, by name)."""
        cfg = self.model.config
        helper = self._hf_module().image_size_to_num_patches
        return [
            helper(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints, patch_size=cfg.vision_config.image_size)
            for s in image_sizes
        ]

    def _pack(self, feats: list, a: dict, newline: torch.Tensor) -> list:
        packed, _ = self.core.pack_image_features(
            feats,
            a["image_sizes"],
            vision_feature_select_strategy=self._strategy(a.get("vision_feature_select_strategy")),
            image_newline=newline,
        )
        return packed

    def _patch_rows(self, **a) -> list[torch.Tensor]:
        """Per image, the rows of the tower batch that hold its base image and crops."""
        n = self.num_patches(**a)
        start = [sum(n[:i]) for i in range(len(n))]
        return [torch.arange(s, s + k) for s, k in zip(start, n)]

    def image_layouts(self, image_sizes, **options) -> list[VisualLayout]:
        """The layout of each image of ``image_sizes`` (H, W), read from the model's own packing;
        ``options``: the other arguments of the model's ``get_image_features``, by name."""
        a = dict(options, image_sizes=image_sizes)
        cfg = self.model.config
        g = self._patch_grid()
        yy, xx = ramp(g)
        helper = self._hf_module().get_anyres_image_grid_shape
        feats, npws = [], []
        for size, p in zip(image_sizes, self.num_patches(**a)):
            # channels: real-token marker (newlines get 0), y and x in the stitched (padded) crop grid
            idx = torch.zeros(p, g * g, 3)
            idx[:, :, 0] = 1
            idx[0, :, 1], idx[0, :, 2] = yy, xx
            npw = 1
            if p > 1:
                _, npw = helper(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for k in range(1, p):
                    cy, cx = divmod(k - 1, npw)
                    idx[k, :, 1], idx[k, :, 2] = cy * g + yy, cx * g + xx
            feats.append(idx)
            npws.append(npw)
        packed = self._pack(feats, a, torch.tensor([0.0, -1.0, -1.0]))
        return [parse_image(t, p.shape[0], npw, g) for t, p, npw in zip(packed, feats, npws)]

    # pre-computed features (generate) ---------------------------------------------
    def features_from_encoder_outputs(self, mm_encoder_outputs: dict):
        """None: this family builds its units at the LM entry, where every placeholder holds its feature
        (``VLMAdapter``'s contract for "no features yet"). A new prefill starts here: its layouts are
        those of the pre-computed features (``encoder_layouts``), or what the tower computes now."""
        self._fw.layouts = self.encoder_layouts(mm_encoder_outputs)
        return None

    def encoder_layouts(self, mm_encoder_outputs: dict) -> dict:
        """modality -> the layouts recorded when the tower produced these pre-computed features (a
        modality whose features vtok did not see is left out)."""
        found = {}
        image = mm_encoder_outputs.get("image")
        if image is not None and getattr(image, "pooler_output", None) is not None:
            lays = [self._feature_layouts.get(t) for t in image.pooler_output]
            if lays and all(lay is not None for lay in lays):
                found["image"] = lays
        return found

    # units at the LM entry ------------------------------------------------------------
    def _core_pre(self, module, args, kwargs):
        out = super()._core_pre(module, args, kwargs)
        fw = self._fw
        if fw is not None and fw.prefill:
            if not precomputed_visual_features(kwargs):  # else the tower ran before this forward (generate)
                self._tower_calls, self._tower_used = [], False
        return out

    def _lm_prefill(self, kwargs):
        fw = self._fw
        if self._tower_calls:
            self._tower_stats()
        if fw.units is None and self._needs_units():
            fw.units, fw.spans = self.build_units(kwargs["inputs_embeds"], fw.input_ids)
        return super()._lm_prefill(kwargs)

    def build_units(self, features, input_ids):
        """``features``: the LM's input embeddings, every placeholder already holding its feature."""
        entries = []
        for modality, token_id in self._modalities():
            slots = (input_ids == token_id).nonzero()  # row-major: the order masked_scatter fills
            if slots.shape[0] == 0:
                continue
            lays = self._fw.layouts.get(modality)
            if lays is None:
                raise ValueError(
                    f"vtok cannot tell how the {modality} features of this prompt were laid out (AnyRes crops, "
                    f"newlines, frames): pass pixel_values{'_videos' if modality == 'video' else ''} "
                    f"(with image_sizes for images) in the same call, or let generate compute mm_encoder_outputs "
                    f"while vtok is attached"
                )
            total = sum(lay.length for lay in lays)
            if total != slots.shape[0]:
                raise ValueError(
                    f"{modality} placeholder count does not match the {modality} features: input_ids hold "
                    f"{slots.shape[0]} placeholders (id {token_id}) but the {len(lays)} {modality}(s) need {total} "
                    f"({[lay.length for lay in lays]}). Pass input_ids exactly as the processor made them together "
                    f"with their pixel values"
                )
            off = 0
            for lay in lays:
                seg = slots[off : off + lay.length]
                off += lay.length
                if not bool((seg[:, 0] == seg[0, 0]).all()):
                    raise ValueError(f"the placeholders of one {modality} are split across samples of the batch")
                entries.append((int(seg[0, 0]), int(seg[0, 1]), lay, seg[:, 1]))
        entries.sort(key=lambda e: (e[0], e[1]))
        self._fw.unit_layouts = [e[2] for e in entries]
        if self._stage_mode() is not None:  # native grids / projector stage (``AnyResStages``)
            return self._stage_units(features, entries), [e[3] for e in entries]
        return self._make_units(features, entries), [e[3] for e in entries]

    def _make_units(self, embeds, entries) -> VisualTokens:
        rows = [(embeds[b, span[lay.token_slot.to(span.device)]], {k: getattr(lay, k) for k in UNIT_FIELDS}, lay.frame)
                for b, _, lay, span in entries]
        units = pack_units(embeds, rows, [e[0] for e in entries], [e[2].grids for e in entries])
        u, n = units.mask.shape
        for p in self._vit_probes():
            v = torch.zeros(u, n, dtype=torch.float32, device=embeds.device)
            for i, (_, _, lay, _) in enumerate(entries):
                if p not in lay.vit:
                    raise ValueError(
                        f"{p!r} was not computed for these features (were they passed in pre-computed, without "
                        "running the vision tower while vtok was attached?)"
                    )
                v[i, : lay.n] = lay.vit[p].to(embeds.device)
            self._captured[p] = v
        return units

    def layout_newline(self, u, b, span, embeds):
        """The unit's own newline embedding (the model's ``image_newline``, as the prompt holds it)."""
        lay = self._fw.unit_layouts[u]
        if lay.newline_slot.numel():
            return embeds[b, span[int(lay.newline_slot[0])]]
        return self.core.image_newline.to(embeds.dtype)

    # splice with newline re-insertion ---------------------------------------------------
    def place_reduced(self, out: VisualTokens, spans: list, keep: torch.Tensor, embeds: torch.Tensor) -> None:
        """Surviving tokens go to their original slots (unique positions) or, in output order, to the
        first slots of the span; a newline is kept after a row iff one of the row's tokens survives."""
        counts = out.counts().tolist()
        for u, span in enumerate(spans):
            lay = self._fw.unit_layouts[u]
            b = int(out.owner[u])
            k = counts[u]
            if k == 0:
                continue
            p = out.positions[u, :k].to(lay.line.device)
            if int(p.min()) < 0 or int(p.max()) >= lay.n:
                raise ValueError(
                    f"{'/'.join(m.name for m in self.methods['before_llm'])} returned token positions outside the unit's {lay.n} tokens"
                )
            line = lay.line[p]
            feats = out.features[u, :k].to(embeds.dtype)
            if torch.unique(p).numel() == k:
                slots = span[lay.token_slot[p].to(span.device)]
                keep[b, slots] = True
                embeds[b, slots] = feats
                rows = torch.unique(line[line >= 0])
                keep[b, span[lay.newline_slot[rows].to(span.device)]] = True
                continue
            # positions repeat (new tokens): output order, each row's newline after its last token
            newline = embeds[b, span[int(lay.newline_slot[0])]].clone() if lay.newline_slot.numel() else None
            order, last = [], {}
            for j, r in enumerate(line.tolist()):
                if r >= 0:
                    last[r] = j
            for j, r in enumerate(line.tolist()):
                order.append(j)
                if r >= 0 and last[r] == j:
                    order.append(-1)
            slots = span[: len(order)]
            keep[b, slots] = True
            for s, j in zip(slots.tolist(), order):
                embeds[b, s] = feats[j] if j >= 0 else newline

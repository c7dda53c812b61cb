"""Native grids and the projector stage on LLaVA-NeXT / LLaVA-OneVision (a mixin of their adapters).

Both stages see the visual features *before* the model packs them: per image every AnyRes crop's
``g x g`` grid (base image first, then the crops in raster order of the crop grid) before the model's
stitching, unpadding (and OneVision's ``anyres_max`` down-scaling); per OneVision video every frame's
``G x G`` grid before the model's 2x2 bilinear pooling (``apply_pooling``).

Where they are read: while the adapter runs the tower (its wrapped ``get_image_features`` /
``get_video_features``), instance wrappers (``InstanceWrap``) of the model's own ``pack_image_features``
and ``apply_pooling`` keep their inputs, and of the projector's ``forward`` its input (projector stage).
Each image's / video's grids are attached to its ``VisualLayout`` (``native``, with ``repack``: the model's
own packing / pooling of one image / video, and the image ``size``), so they travel with the layout also
when ``generate`` pre-computes the features. Calls the adapter's own layout helpers make of the same
functions (on coordinate tensors) are outside a tower run and are not kept.

**Native grids** (a before_llm method with ``native_grids = True``, first in its chain). The units are one
per image (all its crops: ``grids[u] = [(g, g)] * crops``, ``extra["crop"]`` 0 base, k the k-th crop;
``extra["row"]``/``["col"]``/``["patch"]`` inside the crop) and one per video (``frames``, ``grids[u] =
[(G, G)] * T``, ``extra["crop"] = -1``), tokens in that order, features projected (the LLM's width). A token's frame is ``frames``, its crop
``extra["crop"]``; the frames' timestamps come with the ``CallVideos`` probe (the ``vtok.video.Frames`` a
caller hands over with ``handle.context(videos=...)``), as for every before_llm method.
What the method returns is laid out per unit:

- every native token, in order, no declared layout (``positions`` 0..n-1, features may differ): the
  model's own packing applies (unpadding and newlines of an image, pooling and the closing newline of a
  video), so a method that keeps everything unchanged is the untouched model;
- anything else: the method takes over the layout and must declare it (``VisualTokens.layout``: per crop
  or frame an ``(h, w)`` grid, a newline after each row as the before_llm output contract does, or
  ``"sequence"``); an undeclared change is refused. The placeholder span is resized (``relayout``).

Budgets (``Reduction.tokens_in``) therefore count native tokens: crops x g^2 per image, T x G^2 per video.

**Projector stage** (``Method.projector(tokens, project)``). The method gets one unit per AnyRes crop and
per video frame (the tower's ``[crops, n, D_vision]`` grid of each image, ``[T, n, D_vision]`` of each video,
``grid = (g, g)``, ``owner`` the sample: a setting per sample gives every crop / frame of the sample the
same value; ``extra["image"]`` / ``["crop"]`` / ``["frame"]`` say which image or video a unit belongs to and
which crop or frame of it it is) and the model's own projector, and returns each crop's / frame's square grid ``s x s`` (one
``s`` per image / video). A video keeps the model's layout (frames one after another, one closing
newline); its frames' ``s x s`` grids replace the model's 2x2 pooling, except at the full grid, which the
model pools as usual (so ``scale="full"`` is the untouched model there too). The adapter lays
an image out as the model does at the reduced resolution: the base grid, then the crops stitched into
``(rows * s) x (cols * s)`` and unpadded by the model's own ``unpad_image`` at that resolution, a newline
after each row; on OneVision a stitched grid larger than ``anyres_max_N`` crops is down-scaled by the
model's rule with the crop side ``s`` in place of the tower's (the same ratio at every side). An image
whose crops all keep the full grid is packed by the model's own ``pack_image_features`` (so M3
``scale="full"`` is the untouched model bit for bit). The prompt's placeholder span is resized to the image's tokens.

Refused with a clear error: a native-grid method after another before_llm method, with ViT attention
probes, or with pre-computed features the tower did not produce while it was attached; the projector
stage together with before_llm methods or an in_vit method, and in a direct ``get_image_features`` /
``get_video_features`` call (its packed output has the unreduced length).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from vtok.method import ViTAttention
from vtok.stats import Reduction
from vtok.tokens import VisualTokens

from .anyres import pack_units
from .base import InstanceWrap, per_thread

__all__ = ["AnyResStages"]


class AnyResStages:
    """The native-grid and projector stages of ``LlavaNextAdapter`` / ``LlavaOnevisionAdapter`` (see the
    module docstring). Runs on the adapter's per-call state; every hook is an instance wrapper."""

    _stage_pending = per_thread(dict)  # modality -> what the tower run in flight produced, before packing
    _stage_input = per_thread()  # projector stage: the projector input of the tower run in flight

    def __init_subclass__(cls, **kwargs):
        """Every adapter class with this mixin serves the projector stage, whatever stages it declares."""
        super().__init_subclass__(**kwargs)
        if "projector" not in cls.stages:
            cls.stages = (*cls.stages, "projector")

    # which stage, if any ----------------------------------------------------------------------
    def _native_method(self):
        chain = self.methods.get("before_llm", [])
        return chain[0] if chain and getattr(chain[0], "native_grids", False) else None

    def _stage_mode(self) -> str | None:
        """'projector', 'native' or None: whether units come from the grids before the model's packing."""
        if self.method("projector") is not None:
            return "projector"
        return "native" if self._native_method() is not None else None

    def parts(self) -> dict:
        return {**super().parts(), "projector": self.core.multi_modal_projector}

    def _check_anyres_stages(self) -> None:
        chain = self.methods.get("before_llm", [])
        late = [m.name for m in chain[1:] if getattr(m, "native_grids", False)]
        if late:
            raise ValueError(
                f"{late[0]} reads the native per-crop / per-frame grids, which only the first before_llm method of a "
                f"chain sees (here {chain[0].name} runs first); put {late[0]} first"
            )
        native = self._native_method()
        if native is not None:
            for m in self.all_methods():
                if any(isinstance(p, ViTAttention) for p in m.probes()):
                    raise ValueError(
                        f"{m.name} reads ViT attention probes, which vtok does not align with the native grids "
                        f"{native.name} gets on {self.name}; use {native.name} without it (or with native grids off)"
                    )
        proj = self.method("projector")
        if proj is not None:
            if chain:
                raise ValueError(
                    f"{proj.name} lays out each image itself on {self.name} (reduced grids, unpadded, newlines), so a "
                    f"before_llm method ({chain[0].name}) cannot follow it; combine it with in_llm methods instead"
                )
            vit = self.method("in_vit")
            if vit is not None:
                raise ValueError(
                    f"{proj.name} works on the projector's input grid, which {vit.name} already merged inside the "
                    f"vision tower; use {proj.name} with an in_llm method instead"
                )

    # hooks -----------------------------------------------------------------------------------------
    def attach(self) -> None:
        self._check_anyres_stages()
        super().attach()
        self._stage_pending = {}
        self._stage_input = None
        mode = self._stage_mode()
        if mode is None:
            return
        self._hooks.append(InstanceWrap(self.core, "pack_image_features", self._wrap_pack))
        if hasattr(self.core, "apply_pooling"):
            self._hooks.append(InstanceWrap(self.core, "apply_pooling", self._wrap_pooling))
        if mode == "projector":
            self._hooks.append(InstanceWrap(self.core.multi_modal_projector, "forward", self._wrap_projector_forward))

    def _core_pre(self, module, args, kwargs):
        """A new forward: nothing a failed earlier tower run left behind is taken for this one's grids."""
        self._stage_pending = {}
        self._stage_input = None
        return super()._core_pre(module, args, kwargs)

    def _tower_running(self) -> bool:
        """Inside a tower run of the adapter's wrapped get_image_features / get_video_features (its
        ``_call_tower``), where the model's own packing sees real features, not a nested or a layout call."""
        return self._vit_raw is not None and not self.in_hook()

    def _wrap_projector_forward(self, orig):
        """Projector stage: keep the projector's input for the method; the model packs zeros of the
        projected shape (its layout only), and the LM entry replaces each image's span."""
        self._project = orig

        @functools.wraps(orig)
        def forward(image_features, *args, **kwargs):
            if not self._tower_running():
                return orig(image_features, *args, **kwargs)
            if self.direct_call():
                raise ValueError(
                    "get_image_features / get_video_features called directly return the features at their full length, "
                    f"which "
                    f"{self.method('projector').name} changes on {self.name}; call the model (forward or generate) "
                    "with pixel_values instead"
                )
            self._stage_input = image_features
            shape = orig(image_features[:0], *args, **kwargs)  # width and dtype of the projected features
            return shape.new_zeros(*image_features.shape[:-1], shape.shape[-1])

        return forward

    def _wrap_pack(self, orig):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def pack_image_features(*args, **kwargs):
            if not self._tower_running():
                return orig(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            feats, sizes = list(a["image_features"]), a["image_sizes"]
            rest = {k: v for k, v in a.items() if k not in ("image_features", "image_sizes")}
            rest.update(rest.pop("kwargs", {}) or {})
            grids = feats
            if self._stage_mode() == "projector":
                x, self._stage_input = self._stage_input, None
                counts = [f.shape[0] for f in feats]
                if x is None or x.shape[0] != sum(counts):
                    raise RuntimeError(
                        f"vtok's projector stage on {self.name} did not find the projector input of these images; "
                        "please report this with your transformers version"
                    )
                grids = list(torch.split(x, counts))
            entries = []
            for i, g in enumerate(grids):
                size = sizes[i : i + 1]
                repack = functools.partial(self._own_pack, orig, size, rest)
                entries.append((g, repack, sizes[i], rest.get("vision_aspect_ratio")))
            self._stage_pending["image"] = entries  # one packing per tower run of images
            return orig(*args, **kwargs)

        return pack_image_features

    @staticmethod
    def _own_pack(orig, size, rest, feats):
        """The model's own packing of one image's crops ``feats`` [crops, n, D] (unpadding, newlines)."""
        packed = orig(image_features=[feats], image_sizes=size, **rest)
        return packed[0][0]

    def _wrap_pooling(self, orig):
        self._own_pooling = orig

        @functools.wraps(orig)
        def apply_pooling(image_features, *args, **kwargs):
            if not self._tower_running():
                return orig(image_features, *args, **kwargs)
            grids = image_features
            if self._stage_mode() == "projector":
                grids, self._stage_input = self._stage_input, None
                if grids is None or grids.shape[0] != image_features.shape[0]:
                    raise RuntimeError(
                        f"vtok's projector stage on {self.name} did not find the projector input of these frames; "
                        "please report this with your transformers version"
                    )
            self._stage_pending.setdefault("video", []).append(grids)
            return orig(image_features, *args, **kwargs)

        return apply_pooling

    def _own_video(self, pool, frames):
        """The model's own video tokens from per-frame grids [T, n, D]: pooled, frame after frame, one
        closing ``image_newline`` (as the model's get_video_features)."""
        pooled = pool(frames).reshape(-1, frames.shape[-1])
        return torch.cat([pooled, self.core.image_newline[None].to(pooled)])

    def _attach_stage_grids(self, modality: str, layouts: list) -> None:
        """Give each layout the native grids the tower run just produced (called where the adapter notes
        the layouts of a tower run)."""
        pending = self._stage_pending.pop(modality, None)
        if not pending or self._stage_mode() is None:
            return
        if modality == "image":
            if len(pending) != len(layouts):
                raise RuntimeError(
                    f"vtok kept {len(pending)} images' grids for {len(layouts)} image layouts; please report this "
                    "with your transformers version"
                )
            for lay, (grids, repack, size, aspect) in zip(layouts, pending):
                lay.native, lay.repack, lay.size, lay.aspect = grids, repack, size, aspect
            return
        frames = torch.cat(pending)
        counts = [len(lay.grids) for lay in layouts]
        if frames.shape[0] != sum(counts):
            raise RuntimeError(
                f"vtok kept {frames.shape[0]} frames' grids for videos of {counts} frames; please report this with "
                "your transformers version"
            )
        pool = self._own_pooling
        for lay, f in zip(layouts, torch.split(frames, counts)):
            lay.native, lay.repack = f, functools.partial(self._own_video, pool)

    # units at the LM entry -----------------------------------------------------------------------
    def _stage_units(self, embeds: torch.Tensor, entries: list) -> VisualTokens:
        """The units of a prefill whose units come from the native grids (entries: (sample, first slot,
        layout, span) in prompt order)."""
        for _, _, lay, _ in entries:
            if getattr(lay, "native", None) is None:
                who = self._native_method() or self.method("projector")
                raise ValueError(
                    f"{who.name} needs the per-crop / per-frame grids of every image and video, which vtok keeps "
                    "when the vision tower runs with it attached; these features were pre-computed without it. Pass "
                    "pixel_values / pixel_values_videos in the call (or let generate compute the features while vtok "
                    "is attached)"
                )
        if self._stage_mode() == "projector":
            return self._projector_units(embeds, entries)
        return self._native_units(embeds, entries)

    def _native_units(self, embeds, entries) -> VisualTokens:
        rows, grids = [], []
        for _, _, lay, _ in entries:
            g = lay.native
            t, m = g.shape[:2]
            side = math.isqrt(m)
            if side * side != m:
                raise ValueError(f"{self.name}: the tower's grid of {m} tokens per crop / frame is not square")
            ar = torch.arange(t * m, device=embeds.device)
            part, within = ar // m, ar % m
            video = lay.frame is not None
            fields = {"crop": torch.full_like(part, -1) if video else part, "block": part, "row": within // side,
                      "col": within % side, "patch": within}
            rows.append((g.reshape(t * m, -1), fields, part if video else None))
            grids.append([(side, side)] * t)
        return pack_units(embeds, rows, [e[0] for e in entries], grids)

    def _run_before_llm(self) -> None:
        super()._run_before_llm()
        fw = self._fw
        if self._stage_mode() == "native" and fw.reduced is not None:
            fw.reduced = self._native_output(fw.units, fw.reduced)
            fw.relaid = fw.reduced.layout is not None  # the prompt is laid out anew (else: placed in its slots)

    def _native_output(self, units: VisualTokens, out: VisualTokens) -> VisualTokens:
        """The method's output on native grids as the splice takes it: the model's own packing where the
        method kept every native token in order without declaring a layout, else its declared layout."""
        method = self._native_method()
        n_in, n_out = units.counts().tolist(), out.counts().tolist()
        rows = []  # per unit: (tokens [k, D], positions [k], layout, own packed sequence or None)
        for u, lay in enumerate(self._fw.unit_layouts):
            k = n_out[u]
            declared = out.unit_layout(u)
            pos = out.positions[u, :k]
            own = declared is None and k == n_in[u] and torch.equal(pos, torch.arange(k, device=pos.device))
            if own:
                seq = lay.repack(out.features[u, :k].reshape(lay.native.shape[:2] + (-1,)))
                rows.append((seq, None, None, True))
            elif declared is None:
                raise ValueError(
                    f"{method.name} reads native grids and returned {k} of unit {u}'s {n_in[u]} native tokens (or "
                    "reordered them) without declaring how they go into the prompt; a native-grid method lays its "
                    "tokens out itself: set VisualTokens.layout (an (h, w) grid per crop / frame, or 'sequence'), or "
                    "return every native token in order for the model's own packing"
                )
            else:
                rows.append((out.features[u, :k], pos, declared, False))
        return self._prompt_units(out.owner, rows)

    def _prompt_units(self, owner, rows) -> VisualTokens:
        """Units the splice places: each row (tokens, positions, declared layout, whether the tokens are a
        packed sequence in the model's own layout). When every unit is in the model's own layout, its tokens
        go to their own placeholders (newlines stay where they are); otherwise each unit is laid out anew."""
        lays = self._fw.unit_layouts
        dev = rows[0][0].device if rows else owner.device
        if all(own and seq.shape[0] == lay.length for (seq, _, _, own), lay in zip(rows, lays)):
            rows = [(seq[lay.token_slot.to(seq.device)], None, None, True) for (seq, *_), lay in zip(rows, lays)]
            layout = None
        else:
            layout = [
                "sequence" if own else declared for (_, _, declared, own) in rows
            ]
        n = max((r[0].shape[0] for r in rows), default=0)
        u = len(rows)
        d = rows[0][0].shape[-1] if rows else 0
        feats = rows[0][0].new_zeros(u, n, d) if rows else torch.zeros(0, 0, 0)
        mask = torch.zeros(u, n, dtype=torch.bool, device=dev)
        positions = torch.zeros(u, n, dtype=torch.long, device=dev)
        for i, (tok, pos, _, _) in enumerate(rows):
            k = tok.shape[0]
            feats[i, :k] = tok
            mask[i, :k] = True
            positions[i, :k] = torch.arange(k, device=dev) if pos is None else pos.to(dev)
        return VisualTokens(
            features=feats, mask=mask, positions=positions, sizes=mask.float(), owner=owner.to(dev), layout=layout
        )

    # projector stage -------------------------------------------------------------------------------
    def _projector_units(self, embeds, entries) -> VisualTokens:
        method = self.method("projector")
        self.handle.check_trained()
        crops = [lay.native for _, _, lay, _ in entries]
        counts = [c.shape[0] for c in crops]
        x = torch.cat(crops)
        n = x.shape[1]
        side = math.isqrt(n)
        owner = torch.tensor([e[0] for e in entries], dtype=torch.long)
        reps = torch.tensor(counts)
        tokens = VisualTokens.from_features(x, owner.repeat_interleave(reps).to(x.device), grid=(side, side))
        # per unit (crop / frame): the image / video it belongs to, and its crop (0 base, k the k-th) or frame
        part = torch.cat([torch.arange(c) for c in counts])
        video = torch.tensor([lay.frame is not None for _, _, lay, _ in entries]).repeat_interleave(reps)
        per_unit = {
            "image": torch.arange(len(entries)).repeat_interleave(reps),
            "crop": torch.where(video, -1, part),
            "frame": torch.where(video, part, -1),
        }
        tokens.extra = {k: v.to(x.device)[:, None].expand(-1, n).clone() for k, v in per_unit.items()}
        out = method.projector(tokens, self._project)
        if not isinstance(out, VisualTokens):
            raise TypeError(f"{method.name}.projector must return VisualTokens, got {type(out).__name__}")
        if out.num_units != x.shape[0]:
            raise ValueError(
                f"{method.name}.projector returned {out.num_units} grids for {x.shape[0]} crops; return one per crop"
            )
        k_out = out.counts().tolist()
        rows, tin, tout, units = [], {}, {}, []
        start = 0
        b_rows = int(self._fw.input_ids.shape[0])
        for (b, _, lay, _), c in zip(entries, counts):
            ks = k_out[start : start + c]
            f = out.features[start : start + c]
            start += c
            s = math.isqrt(ks[0])
            if len(set(ks)) != 1 or s * s != ks[0]:
                raise ValueError(
                    f"{method.name}.projector returned crops / frames of {ks} tokens for one image or video; on "
                    f"{self.name} each must come back as one square grid side (one setting per sample)"
                )
            grid = f[:, : s * s].to(embeds.dtype)
            if s == side:  # the full grid: the model's own packing / pooling
                seq, real = lay.repack(grid), lay.n
            elif lay.frame is not None:  # a video: the frames' grids replace the model's pooling
                newline = self.core.image_newline.to(grid.device, grid.dtype)
                seq, real = torch.cat([grid.reshape(-1, grid.shape[-1]), newline[None]]), c * s * s
            else:
                seq, real = self._stitch(grid, s, lay.size, lay.aspect)
            tin[b] = tin.get(b, 0) + lay.n
            tout[b] = tout.get(b, 0) + real
            units.append((lay.n, real))
            rows.append((seq.to(embeds.device), None, None, True))
        self.handle.stats.append(
            Reduction(
                method.name, "projector", None, [tin.get(i, 0) for i in range(b_rows)],
                [tout.get(i, 0) for i in range(b_rows)], None, units,
            )
        )
        self._fw.vit_reduced = True
        return self._prompt_units(owner.to(embeds.device), rows)

    def _stitch(self, grids: torch.Tensor, s: int, size, aspect=None) -> torch.Tensor:
        """One image's reduced crops [crops, s*s, D] in the model's layout at side ``s``: the base grid, then
        the crops stitched in their (rows x cols) crop grid, unpadded by the model's own ``unpad_image`` at
        that resolution, a newline after each row (base image alone: one closing newline). ``aspect``
        (OneVision's ``vision_aspect_ratio``, ``"anyres_max_N"``): the model's down-scaling of a stitched grid
        larger than N crops, with the crop side ``s`` in place of the tower's (the same ratio at every
        side). Returns the sequence [L, D] and how many of its entries are tokens (not newlines)."""
        newline = self.core.image_newline.to(grids.device, grids.dtype)
        base = grids[0]
        if grids.shape[0] == 1:
            return torch.cat([base, newline[None]]), s * s
        hf = self._hf_module()
        cfg = self.model.config
        rows, cols = hf.get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        d = grids.shape[-1]
        hi = grids[1:].reshape(rows, cols, s, s, d).permute(4, 0, 2, 1, 3).reshape(d, rows * s, cols * s)
        hi = hf.unpad_image(hi, size)
        if aspect is not None:  # as OneVision's pack_image_features, at side s
            max_crops = int(aspect.strip("anyres_max_"))  # noqa: B005 - parsed as the model parses it
            _, h, w = hi.shape
            ratio = math.sqrt(h * w / (max_crops * s**2))
            if ratio > 1.1:
                hi = torch.nn.functional.interpolate(hi[None], [int(h // ratio), int(w // ratio)], mode="bilinear")[0]
        hi = torch.cat([hi, newline[:, None, None].expand(d, hi.shape[1], 1)], dim=-1)
        return torch.cat([base, hi.flatten(1, 2).transpose(0, 1)]), s * s + hi.shape[1] * (hi.shape[2] - 1)

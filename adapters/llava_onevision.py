"""HF ``LlavaOnevisionForConditionalGeneration``: AnyRes images (as ``llava_next``) and videos.

Images follow ``LlavaNextAdapter`` with OneVision's own rules read from the model's packing; a video
is one unit of its pooled frames. ``LlavaOnevisionAdapter`` documents the layouts and ragged videos.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .anyres import VisualLayout, ramp, video_layout
from .base import InstanceWrap
from .llava_next import LlavaNextAdapter

__all__ = ["LlavaOnevisionAdapter"]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: images as in ``LlavaNextAdapter``; one unit per video.

    Images: one unit per image (base grid + unpadded high-res grid, newlines re-inserted per surviving
    row), with OneVision's own rules read from the model's ``pack_image_features``: the ``anyres_max_N``
    down-scaling of large high-res grids (a token's ``extra["crop"]`` is then the crop under its centre)
    and base-image-only features when a prompt holds several images (``batch_num_images``).

    Videos: one unit per video holding every frame's tokens after the model's own 2-D pooling
    (``apply_pooling``), frame after frame, raster order inside a frame. ``frames`` gives each token's
    frame, ``grid`` is the pooled frame grid (h, w) and ``grids[u]`` is ``[(h, w)] * T``, so video
    methods see T x H x W and ``pool`` pools each frame. The model closes a video with one
    ``image_newline`` token after its last frame; the adapter keeps it after a reduction (a video keeps
    at least one token). ``extra["crop"]`` and ``extra["patch"]`` are -1 for video tokens (pooled from
    several patches), ``extra["block"]`` is the frame.

    Batches may mix videos of different frame counts: pass ``pixel_values_videos`` as the processor's
    list of per-video tensors ``[frames, C, H, W]`` (what it returns without tensor conversion, since
    ragged videos cannot be stacked). The untouched transformers model cannot run such a batch; with
    vtok attached each video goes through the tower on its own and the features are placed as usual.
    """

    name = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaOnevisionForConditionalGeneration

        return isinstance(model, LlavaOnevisionForConditionalGeneration)

    def placeholder_ids(self) -> list[int]:
        cfg = self.model.config
        return [int(cfg.image_token_id), int(cfg.video_token_id)]

    def _modalities(self) -> list[tuple[str, int]]:
        cfg = self.model.config
        return [("image", int(cfg.image_token_id)), ("video", int(cfg.video_token_id))]

    # images -----------------------------------------------------------------------------
    def num_patches(self, image_sizes, batch_num_images=None, **options) -> list[int]:
        per_image = super().num_patches(image_sizes, **options)
        if batch_num_images is None:
            return per_image
        # several images in one prompt: the model keeps their base image only
        need = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [p if crop else 1 for p, crop in zip(per_image, need)]

    def _pack(self, feats: list, a: dict, newline: torch.Tensor) -> list:
        ratio = a.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.core.pack_image_features(
            feats, a["image_sizes"], image_newline=newline, vision_aspect_ratio=ratio
        )
        return packed

    # videos -----------------------------------------------------------------------------
    def attach_vision(self) -> None:
        super().attach_vision()
        self._hooks.append(InstanceWrap(self.core, "get_video_features", self._wrap_video_features))

    def frame_grid(self) -> tuple[int, int]:
        """The per-frame grid after the model's own pooling, read from ``apply_pooling``."""
        g = self._patch_grid()
        yy, xx = ramp(g)
        pooled = self.core.apply_pooling(torch.stack([yy, xx], -1).unsqueeze(0))[0]  # [k, 2], raster order
        # a new row starts where y jumps (pooled rows lie >= 1 patch apart); y inside a row carries float
        # noise from the interpolation, so distinct values would over-count rows (27x27 patches: 24, not 14)
        h = int((pooled[1:, 0] - pooled[:-1, 0] > 0.5).sum()) + 1
        return h, pooled.shape[0] // h

    def video_layout(self, frames: int) -> VisualLayout:
        """The layout of a video of ``frames`` frames (pooled frames, one closing newline)."""
        return video_layout(frames, *self.frame_grid())

    def _wrap_video_features(self, orig):
        sig = inspect.signature(orig)

        @functools.wraps(orig)
        def get_video_features(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            videos = bound.arguments.get("pixel_values_videos")
            ragged = isinstance(videos, (list, tuple))
            if not ragged and (not self._needs_layouts() or self.in_hook()):  # in_hook: a nested call
                with self._video_rows(videos):
                    return orig(*args, **kwargs)
            if ragged:
                out, raw, frames = self._ragged_videos(orig, bound, videos)
            else:
                with self._video_rows(videos):
                    out, raw = self._call_tower(orig, *args, **kwargs)
                frames = [videos.shape[1]] * videos.shape[0]
            if self._needs_layouts():
                self._record_video_layouts(out, raw, frames, bound.arguments.get("vision_feature_select_strategy"))
            return out

        return get_video_features

    @contextlib.contextmanager
    def _video_rows(self, videos, first: int = 0):
        """Inside: the tower's rows are the frames of these videos (``[videos, frames, C, H, W]``; the first
        is video ``first`` of the call), so an in_vit method may merge across neighbouring frames of one video."""
        outer = self._tower_rows, self._tower_units
        if isinstance(videos, torch.Tensor) and videos.dim() == 5:
            self._tower_rows = torch.arange(videos.shape[0]).repeat_interleave(videos.shape[1])
            self._tower_units = ("video", self._tower_rows + first)
        try:
            yield
        finally:
            self._tower_rows, self._tower_units = outer

    def _record_video_layouts(self, out, raw: dict, frames: list, strategy) -> None:
        h, w = self.frame_grid()
        layouts = [video_layout(f, h, w) for f in frames]
        start = [sum(frames[:i]) for i in range(len(frames))]
        for p, stats in raw.items():  # ViT statistics go through the model's own pooling, like the features
            pooled = self.core.apply_pooling(self._drop_cls(stats, strategy).unsqueeze(-1))[..., 0]
            for lay, s, f in zip(layouts, start, frames):
                lay.vit[p] = pooled[s : s + f].reshape(-1)
        feats = getattr(out, "pooler_output", None)
        if isinstance(feats, torch.Tensor):
            self._feature_layouts.put(feats, layouts)  # for generate's mm_encoder_outputs
        self._note_layouts("video", layouts)

    def _ragged_videos(self, orig, bound, videos):
        """Videos of different lengths: run each through the model's own path, concatenate the features."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outs, raws, frames = [], [], []
        for v in videos:
            if not isinstance(v, torch.Tensor) or v.dim() not in (4, 5) or (v.dim() == 5 and v.shape[0] != 1):
                raise ValueError(
                    "pixel_values_videos given as a list must hold one tensor [frames, channels, height, width] "
                    f"per video (as the processor returns them); got {getattr(v, 'shape', type(v).__name__)}"
                )
            v = v if v.dim() == 5 else v.unsqueeze(0)
            if v.shape[1] == 0:
                raise ValueError("a video in pixel_values_videos has zero frames")
            call = {k: val for k, val in bound.arguments.items() if k != "kwargs"}
            call.update(bound.arguments.get("kwargs", {}))
            call["pixel_values_videos"] = v  # keywords only: transformers' decorators fill defaults by name
            with self._video_rows(v, first=len(frames)):
                out, raw = self._call_tower(orig, **call)
            outs.append(out.pooler_output)
            raws.append(raw)
            frames.append(v.shape[1])
        raw = {p: torch.cat([r[p] for r in raws]) for p in raws[0]} if raws else {}
        return BaseModelOutputWithPooling(pooler_output=torch.cat(outs, dim=1)), raw, frames

    def encoder_layouts(self, mm_encoder_outputs: dict) -> dict:
        found = super().encoder_layouts(mm_encoder_outputs)
        video = mm_encoder_outputs.get("video")
        feats = getattr(video, "pooler_output", None) if video is not None else None
        if isinstance(feats, torch.Tensor):
            lays = self._feature_layouts.get(feats)
            if lays is None and feats.dim() == 3:  # [videos, frames * h * w + 1, D]: frames from the length
                h, w = self.frame_grid()
                if (feats.shape[1] - 1) % (h * w) == 0:
                    lays = [video_layout((feats.shape[1] - 1) // (h * w), h, w)] * feats.shape[0]
            if lays is not None:
                found["video"] = lays
        return found

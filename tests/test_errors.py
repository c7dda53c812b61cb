"""Bad input gets a clear error naming the problem and the way out (invariant 8)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model

import vtok
from vtok.method import Method, Probe
from vtok.testing import TINY_CASES


@pytest.fixture
def llava():
    return tiny_model("llava")


def test_unknown_method_lists_known_ones(llava):
    with pytest.raises(ValueError, match=r"unknown method 'fastvv'.*known methods: .*fastv.*pool.*random"):
        vtok.apply(llava, "fastvv")


def test_unsupported_model_lists_adapters():
    with pytest.raises(ValueError, match=r"no adapter for Linear; supported model families: .*llava"):
        vtok.apply(torch.nn.Linear(2, 2), "random")


def test_not_a_module():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        vtok.apply("model", "random")


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("retain", [0, -0.5, 1.5, 0.0])
def test_retain_out_of_range(llava, method, retain):
    with pytest.raises(ValueError, match=r"retain=.* out of range.*\(0, 1\]"):
        vtok.apply(llava, method, retain=retain)


def test_pool_bad_factor(llava):
    with pytest.raises(ValueError, match="factor=0 is out of range: it must be an int >= 1"):
        vtok.apply(llava, "pool", factor=0)


def test_layer_outside_model(llava):
    n = len(llava.model.language_model.layers)
    with pytest.raises(ValueError, match=rf"fastv layer = {n + 3} is outside the language model.*0\.\.{n - 1}"):
        vtok.apply(llava, "fastv", layer=n + 3)
    with pytest.raises(ValueError, match="layer=0 is out of range: it must be an int >= 1"):
        vtok.apply(llava, "fastv", layer=0)


def test_unknown_hyperparameter_names_the_valid_ones(llava):
    with pytest.raises(TypeError, match=r"hyper-parameters are \['layer', 'retain', 'query', 'position_policy'\]"):
        vtok.apply(llava, "fastv", ratio=0.5)


def test_bad_position_policy(llava):
    with pytest.raises(ValueError, match="position_policy='shift' is not one of"):
        vtok.apply(llava, "fastv", position_policy="shift")


@dataclass(frozen=True)
class DepthProbe(Probe):
    """A probe no adapter serves."""


@dataclass
class NeedsDepth(Method):
    name = "needs_depth"
    stages = ("before_llm",)

    def probes(self):
        return [DepthProbe()]

    def before_llm(self, tokens, probes):
        return tokens


def test_probe_the_adapter_cannot_serve(llava):
    with pytest.raises(ValueError, match=r"needs the probe DepthProbe\(\), which the llava adapter cannot serve"):
        vtok.apply(llava, NeedsDepth())


def test_cls_probe_on_tower_without_cls():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from vtok.testing import _llama_text_config

    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
        ),
        text_config=_llama_text_config(),
        image_token_id=150,
        vision_feature_select_strategy="full",
    )
    model = LlavaForConditionalGeneration(cfg)

    @dataclass
    class NeedsCls(Method):
        name = "needs_cls"
        stages = ("before_llm",)

        def probes(self):
            return [vtok.ViTAttention(layer=0, kind="cls")]

        def before_llm(self, tokens, probes):
            return tokens

    with pytest.raises(ValueError, match="has no CLS token.*use kind='colmean'"):
        vtok.apply(model, NeedsCls())


def test_two_in_vit_methods_are_refused(llava):
    tome = vtok.method.get_method_class("tome")
    with pytest.raises(ValueError, match=r"two in_vit methods: 'tome', 'tome'; one method merges inside the vision"):
        vtok.apply(llava, [tome(r=1), tome(r=2)])


def test_list_hparams_must_be_per_method(llava):
    with pytest.raises(TypeError, match="give hyper-parameters per method"):
        vtok.apply(llava, ["random", "fastv"], retain=0.5)


def test_attached_twice(llava):
    with vtok.apply(llava, "random"):
        with pytest.raises(ValueError, match="already has vtok methods attached"):
            vtok.apply(llava, "pool")


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_placeholder_count_mismatch(llava, method):
    case = TINY_CASES["llava"]
    (sample,) = case.make_samples(llava, [(3, 1, 4)], 0)
    ids = sample["input_ids"]
    first = int((ids == llava.config.image_token_id).nonzero()[0])
    sample["input_ids"] = torch.cat([ids[:first], ids[first + 1 :]])  # one placeholder short
    with vtok.apply(llava, method):
        with pytest.raises(ValueError, match=r"placeholder count does not match the image features.*\[15\].*1 image\(s\) x 16 features.*exactly as the processor made them"):
            with torch.no_grad():
                llava(**case.batch([sample]))


def test_inputs_embeds_without_input_ids_with_an_in_vit_method(llava):
    """ToMe merges inside the tower: such a call cannot even run untouched, so it is refused."""
    case = TINY_CASES["llava"]
    (sample,) = case.make_samples(llava, [(3, 1, 4)], 0)
    emb = llava.get_input_embeddings()(sample["input_ids"][None])
    with vtok.apply(llava, "tome", r=2):
        with pytest.raises(ValueError, match="inputs_embeds without input_ids.*Pass input_ids"):
            llava(inputs_embeds=emb, pixel_values=sample["pixel_values"])


@pytest.mark.parametrize(
    "argv,words",
    [
        (["describe", "nosuch"], "unknown method 'nosuch'"),
        (["eval", "--model", "nosuch", "--dataset", "easy-vqa"], "unknown model 'nosuch'"),
        (["eval", "--model", "tiny-llava", "--dataset", "nosuch"], "unknown dataset 'nosuch'"),
        (["eval", "--model", "tiny-llava", "--dataset", "synthetic", "--methods", "fastv:retain=7"], "retain=7.0 is out of range"),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(argv, words, capsys):
    from vtok.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises((ValueError, TypeError)):
        main(argv + ["--debug"])  # --debug anywhere on the line shows the real error


def test_bare_vtok_prints_the_help(capsys):
    from vtok.cli import main

    assert main([]) == 0
    assert "describe" in capsys.readouterr().out

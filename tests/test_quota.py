"""QuoTA (`quota`): frame budgets and grids (pure functions), the resize against F.interpolate, the default
scorer (the attached model asked through ``AskModel``) against the language model called by hand, nested
calls, custom scorers, query decoupling, and clear errors. The registry suites (test_invariants.py,
test_llava_next_ov.py::test_ragged_video_batch_invariants) run quota's example on every tiny case."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model, tiny_processor

import vtok
from vtok.method import AskModel, Method, get_method_class
from vtok.methods.quota import (
    DEFAULT_PROMPT,
    OBJECTS_PROMPT,
    centre_index,
    frame_budgets,
    frame_weights,
    parse_objects,
    v1_grid,
)
from vtok.testing import LLAVA_ONEVISION_VIDEO, TINY_CASES

QuoTA = get_method_class("quota")


def _batch(case, model, seed=0):
    return case.batch(case.make_samples(model, case.specs, seed))


def _llava(seed=0):
    model = tiny_model("llava")
    return model, _batch(TINY_CASES["llava"], model, seed), tiny_processor("llava")


def _video():
    model = tiny_model("llava_onevision")
    return model, _batch(LLAVA_ONEVISION_VIDEO, model), LLAVA_ONEVISION_VIDEO.make_processor(model)


def _run(model, batch, method, proc, generate=False):
    with vtok.apply(model, method, processor=proc) as h, torch.no_grad():
        out = model(**batch).logits
        gen = model.generate(**{k: v for k, v in batch.items() if k != "position_ids"}, max_new_tokens=4,
                             do_sample=False) if generate else None  # fmt: skip
        stats = [(r.tokens_in, r.tokens_out, r.units) for r in h.stats]
    return out, gen, stats


@dataclass
class Spy(Method):
    """Keeps everything; records the tokens it was handed (and runs ``then(tokens, probes)`` if given)."""

    name = "quota_spy"
    stages = ("before_llm",)
    position_policy: str = "compact"
    wanted: tuple = ()
    then: object = None

    def probes(self):
        return list(self.wanted)

    def before_llm(self, tokens, probes):
        self.tokens = tokens
        if self.then is not None:
            self.then(tokens, probes)
        return tokens


# ------------------------------------------------------------------ budgets and grids


@pytest.mark.parametrize("seed", range(6))
def test_budgets_sum_to_the_total_are_monotone_and_capped(seed):
    rng = random.Random(seed)
    for _ in range(40):
        t, side = rng.randint(1, 12), rng.randint(1, 6)
        n = side * side
        total = rng.randint(1, t * n)
        scores = [rng.choice([0.0, rng.random(), rng.random() * 1e-3]) for _ in range(t)]
        budgets = frame_budgets(total, [n] * t, frame_weights(scores, 2.0))
        assert sum(budgets) == total and all(0 <= b <= n for b in budgets)
        for i in range(t):
            for j in range(t):
                if scores[i] > scores[j]:
                    assert budgets[i] >= budgets[j], (scores, budgets)
        grids = [v1_grid(b, side, side) for b in budgets]
        assert all(gh <= side and gw <= side and gh * gw <= b for (gh, gw), b in zip(grids, budgets))
        assert all((gh * gw == 0) == (b == 0) for (gh, gw), b in zip(grids, budgets))  # dropped iff no budget


def test_v1_grid_is_the_papers_rule_capped_at_the_native_grid():
    assert v1_grid(10, 27, 27) == (3, 3)  # 3x3 = 9 < 10, 4x3 = 12 > 10
    assert v1_grid(12, 27, 27) == (4, 3)
    assert v1_grid(196, 27, 27) == (14, 14)
    assert v1_grid(729, 27, 27) == (27, 27) and v1_grid(5000, 27, 27) == (27, 27)  # never upsampled
    assert v1_grid(0, 27, 27) == (0, 0) and v1_grid(8, 3, 3) == (3, 2)
    sizes = [v1_grid(c, 5, 5) for c in range(26)]
    assert all(a[0] * a[1] <= b[0] * b[1] for a, b in itertools.pairwise(sizes))  # monotone in the count


def test_weights_are_squared_scores_and_zero_scores_fall_back_to_uniform():
    assert frame_weights([1.0, 2.0]) == pytest.approx([0.2, 0.8])
    assert frame_weights([1.0, 2.0], power=1.0) == pytest.approx([1 / 3, 2 / 3])
    assert frame_weights([0.0, 0.0, 0.0]) == pytest.approx([1 / 3] * 3)
    assert frame_weights([1e-20, 3e-20]) == pytest.approx([0.5, 0.5])  # ~0: no preference, no division by ~0
    assert frame_weights([1e-30, 0.5]) == pytest.approx([0.0, 1.0])
    for bad in ([float("nan"), 1.0], [-0.1, 1.0]):
        with pytest.raises(ValueError, match="finite and >= 0"):
            frame_weights(bad)
    # frames of weight > 0 that are full pass the rest on in equal shares
    assert frame_budgets(18, [9] * 4, [1.0, 0.0, 0.0, 0.0]) == [9, 3, 3, 3]


def test_centre_index_is_the_patch_under_each_cell_centre():
    assert centre_index(4, 4, 3, 2).tolist() == [1, 3, 9, 11, 13, 15]
    assert centre_index(4, 4, 4, 4).tolist() == list(range(16))
    for h, oh in ((27, 14), (27, 5), (6, 4)):
        assert centre_index(h, h, oh, oh).unique().numel() == oh * oh  # distinct when downsizing


def test_parse_objects_is_tolerant():
    assert parse_objects("step 3: ['dog', 'red car']") == ["dog", "red car"]
    assert parse_objects('Objects: ["a", "b", "a"]') == ["a", "b"]
    assert parse_objects("[dog, red car]") == ["dog", "red car"]
    assert parse_objects("first [x] then ['y']") == ["y"]
    assert parse_objects("no list here") == [] and parse_objects("[]") == [] and parse_objects("") == []


# ------------------------------------------------------------------ the stage


def test_frames_are_resized_bilinearly_with_the_budget_of_their_scores():
    """A sample's two images are two frames: scores 1 and 3 give budgets 1 and 7 of 8 (retain 0.25 of 32),
    grids 1x1 and 3x2, each F.interpolate(bilinear, align_corners=False) of the 4x4 grid in fp32."""
    model, batch, proc = _llava()
    seen, out = Spy(), Spy()
    quota = QuoTA(retain=0.25, scorer=lambda frames, questions, ask: [torch.tensor([1.0, 3.0])] * len(frames))
    with vtok.apply(model, [seen, quota, out], processor=proc) as h, torch.no_grad():
        model(**batch)
    assert [r.tokens_out for r in h.stats if r.method == "quota"] == [[4, 4, 1 + 6]]
    t_in, t_out = seen.tokens, out.tokens
    for u, (oh, ow) in zip((2, 3), ((1, 1), (3, 2))):
        grid = t_in.features[u, :16].float().T.reshape(1, -1, 4, 4)
        want = F.interpolate(grid, size=(oh, ow), mode="bilinear", align_corners=False).reshape(-1, oh * ow).T
        k = oh * ow
        torch.testing.assert_close(t_out.features[u, :k].float(), want, atol=0, rtol=0)
        assert t_out.positions[u, :k].tolist() == centre_index(4, 4, oh, ow).tolist()
        assert t_out.sizes[u, :k].tolist() == pytest.approx([16 / k] * k)
    for u in (0, 1):  # single images have no time: each grid scaled by sqrt(retain)
        grid = t_in.features[u, :16].float().T.reshape(1, -1, 4, 4)
        want = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).reshape(-1, 4).T
        torch.testing.assert_close(t_out.features[u, :4].float(), want, atol=0, rtol=0)


def test_videos_keep_a_share_and_frames_stay_in_time_and_raster_order():
    model, batch, proc = _video()
    scores = [torch.linspace(0.1, 1.0, 8), torch.linspace(1.0, 0.1, 12)]
    seen, out = Spy(), Spy()
    quota = QuoTA(retain=0.25, scorer=lambda frames, questions, ask: scores)
    with vtok.apply(model, [seen, quota, out], processor=proc), torch.no_grad():
        model(**batch)
    for u, sc in enumerate(scores):
        n = 8 if u == 0 else 12
        budgets = frame_budgets(round(n * 9 * 0.25), [9] * n, frame_weights(sc))
        grids = [v1_grid(b, 3, 3) for b in budgets]
        pos = out.tokens.positions[u, : int(out.tokens.counts()[u])]
        want = torch.cat([centre_index(3, 3, gh, gw) + 9 * t for t, (gh, gw) in enumerate(grids) if gh * gw])
        assert pos.tolist() == want.tolist()  # frames in time order, raster order inside each


def test_a_custom_scorer_is_used_and_zero_scores_mean_uniform():
    model, batch, proc = _video()
    calls = []

    def scorer(frames, questions, ask):
        calls.append(([tuple(f.shape) for f in frames], list(questions), ask))
        return [torch.zeros(f.shape[0]) for f in frames]

    zero, _, zero_stats = _run(model, batch, QuoTA(scorer=scorer), proc)
    ones, _, ones_stats = _run(model, batch, QuoTA(scorer=lambda f, q, a: [torch.ones(x.shape[0]) for x in f]), proc)
    _, _, first_stats = _run(model, batch, QuoTA(scorer=lambda f, q, a: [torch.eye(x.shape[0])[0] for x in f]), proc)
    (shapes, questions, ask), = calls
    assert [s[:2] for s in shapes] == [(8, 9), (12, 9)] and callable(ask) and hasattr(ask, "generate")
    assert all(q.strip() for q in questions) and questions[0] != questions[1]
    assert torch.equal(zero, ones) and zero_stats == ones_stats
    assert first_stats != ones_stats  # the scores decide the budgets


@pytest.mark.parametrize("policy", ["keep", "compact"])
def test_a_frame_without_budget_is_dropped_and_the_batch_equals_its_samples(policy):
    """Scores [1, 0] at retain 1/16 of two 4x4 images: 2 tokens for the first, none for the second (its unit
    is empty); each sample run alone gives the same logits."""
    model = tiny_model("llava")
    samples = TINY_CASES["llava"].make_samples(model, TINY_CASES["llava"].specs, 0)
    first = QuoTA(retain=0.0625, position_policy=policy, scorer=lambda f, q, a: [torch.eye(x.shape[0])[0] for x in f])
    out, _, stats = _run(model, TINY_CASES["llava"].batch(samples), first, tiny_processor("llava"))
    assert stats[0][2] == [(16, 1), (16, 1), (16, 2), (16, 0)]
    for i, s in enumerate(samples):
        one, _, _ = _run(model, TINY_CASES["llava"].batch([s]), first, tiny_processor("llava"))
        torch.testing.assert_close(out[i, -one.shape[1] :], one[0], atol=2e-5, rtol=1e-4)


def test_no_op_and_non_temporal_inputs():
    model, batch, proc = _llava()
    with torch.no_grad():
        ref = model(**batch).logits
    out, _, stats = _run(model, batch, QuoTA(retain=1.0), proc)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    _, _, stats = _run(model, batch, QuoTA(images_as_frames=False), proc)
    assert stats[0][1] == [4, 4, 8]
    nested = []
    with vtok.apply(model, QuoTA(images_as_frames=False), processor=proc) as h, torch.no_grad():
        model(**batch)
        nested = h.stats[0].nested
    assert nested == []  # nothing to score: no frame was asked about


# ------------------------------------------------------------------ the default scorer: the model itself


def _lm_by_hand(model, embeds: torch.Tensor, token: int) -> float:
    out = model.model.language_model(inputs_embeds=embeds[None])
    logits = model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()
    return float(torch.softmax(logits, -1)[0, token])


def test_ask_model_equals_the_language_model_called_by_hand():
    model, batch, proc = _llava()
    got = {}
    prompts = ["w5 w6", "w7 w8 w9 w10 w11 w12", "w13"]

    def ask_now(tokens, probes):
        ask = probes[AskModel()]
        got["visual"] = [tokens.features[u, :16].clone() for u in range(3)]
        got["p"] = ask(got["visual"], prompts, answer="w20")
        got["ask"] = ask

    with vtok.apply(model, Spy(wanted=(AskModel(),), then=ask_now), processor=proc), torch.no_grad():
        model(**batch)
        again = got["ask"](got["visual"], prompts, answer="w20")  # also outside the model's forward
    tok, emb = proc, model.get_input_embeddings()
    assert got["ask"].pieces("w5 w6") == (tok.encode("<s>user: ", add_special_tokens=False),
                                          tok.encode("\nw5 w6 assistant:", add_special_tokens=False))  # fmt: skip
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            before, after = got["ask"].pieces(prompt)
            x = torch.cat([emb(torch.tensor(before)), got["visual"][i], emb(torch.tensor(after))])
            want = _lm_by_hand(model, x, tok.convert_tokens_to_ids("w20"))
            assert got["p"][i].item() == pytest.approx(want, abs=1e-6, rel=1e-5)
    assert got["p"].dtype == torch.float32 and torch.allclose(again, got["p"], atol=1e-6)
    longest = max(sum(map(len, got["ask"].pieces(p))) + 16 for p in prompts)
    assert got["ask"].forwards == [(3, longest, longest, 1)] * 2  # one left-padded chunk per call


def test_without_a_chat_template_the_prompt_is_bos_visual_text():
    from vtok.adapters.ask import ModelAsk

    from vtok.testing import tiny_tokenizer

    tok = tiny_tokenizer(tiny_model("llava"), chat_template=None)
    ask = ModelAsk(None, tok)
    assert ask.pieces("w5 w6") == ([1], [5, 6]) and ask.text_ids("w5") == [1, 5]


def test_a_processor_template_with_list_content_places_the_visual_tokens_at_its_image_entry():
    """LLaVA-style processor templates take list content ({"type": "image"}, {"type": "text"}): the visual
    tokens go where the image entry is rendered; a text-only prompt keeps its text."""
    from types import SimpleNamespace

    from vtok.adapters.ask import ModelAsk
    from vtok.testing import tiny_tokenizer

    template = (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
        "{% for c in m['content'] | selectattr('type', 'equalto', 'text') %}{{ c['text'] + ' ' }}{% endfor %}"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    tok = tiny_tokenizer(tiny_model("llava"), chat_template=None)
    ask = ModelAsk(None, SimpleNamespace(tokenizer=tok, chat_template=template, image_token="<image>"))
    assert ask.pieces("w5 w6") == (tok.encode("USER: ", add_special_tokens=False),
                                   tok.encode("\nw5 w6 ASSISTANT:", add_special_tokens=False))  # fmt: skip
    assert ask.text_ids("w5") == tok.encode("USER: w5 ASSISTANT:", add_special_tokens=False)


def test_the_nested_scorer_leaves_the_outer_call_as_a_constant_scorer_does():
    """The default scorer calls the model inside the call; the call's logits and generated tokens equal those
    of a run whose scorer returns the same scores without calling anything."""
    model, batch, proc = _video()
    recorded = []
    default = QuoTA()

    def record(frames, questions, ask):
        recorded.append(default.ask_scores(frames, questions, ask))
        return recorded[-1]

    out_default, gen_default, st_default = _run(model, batch, default, proc, generate=True)
    _run(model, batch, QuoTA(scorer=record), proc)
    scores = [s.clone() for s in recorded[0]]
    assert all(s.dtype == torch.float32 and bool((s > 0).all()) for s in scores)
    assert len({round(float(x), 9) for x in scores[0]}) > 1  # frames got different scores
    out_const, gen_const, st_const = _run(model, batch, QuoTA(scorer=lambda f, q, a: scores), proc, generate=True)
    assert torch.equal(out_default, out_const) and torch.equal(gen_default, gen_const) and st_default == st_const


def test_query_decoupling_asks_for_objects_then_about_them():
    class FakeAsk:
        def generate(self, prompts, max_new_tokens=64):
            self.asked = prompts
            return ["step 3: ['dog', 'red car']", "nothing to list"]

    fake = FakeAsk()
    prompts = QuoTA(decouple=True)._prompts(["where is the dog?", "what time is it?", "where is the dog?"], fake)
    assert len(fake.asked) == 2 and "where is the dog?" in fake.asked[0]
    assert prompts == [OBJECTS_PROMPT.format(objects="dog, red car"), DEFAULT_PROMPT.format(question="what time is it?"),
                       OBJECTS_PROMPT.format(objects="dog, red car")]  # fmt: skip


def test_ask_generate_equals_the_models_greedy_generate_and_decoupling_runs():
    model, batch, proc = _llava()
    got = {}
    spy = Spy(wanted=(AskModel(),), then=lambda t, p: got.setdefault("ask", p[AskModel()]))
    with vtok.apply(model, spy, processor=proc), torch.no_grad():
        model(**batch)
        text = got["ask"].generate(["w5 w6 w7", "w8"], max_new_tokens=5)
    for prompt, answer in zip(["w5 w6 w7", "w8"], text):
        ids = torch.tensor([got["ask"].text_ids(prompt)])
        with torch.no_grad():
            ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        new = ref[0, ids.shape[1] :].tolist()
        new = new[: new.index(2)] if 2 in new else new
        assert answer == proc.decode(new, skip_special_tokens=True)
    with vtok.apply(model, QuoTA(decouple=True), processor=proc) as h, torch.no_grad():
        model(**batch)
    assert any(q == 1 for _, q, _, _ in h.stats[0].nested)  # the decoupling's decode steps ran and are counted


# ------------------------------------------------------------------ errors


def test_without_a_processor_images_run_and_videos_are_refused_clearly():
    model, batch, _ = _llava()
    one_image = TINY_CASES["llava"].batch(TINY_CASES["llava"].make_samples(model, [(3, 1, 4)]))
    with vtok.apply(model, "quota") as h, torch.no_grad():
        model(**one_image)  # no time, nothing to score: each grid scaled by sqrt(retain)
        assert h.stats[0].tokens_out == [4]
        with pytest.raises(ValueError, match=r"asking the attached model.*vtok.apply\(model, 'quota', processor=processor\)"):
            model(**batch)  # a sample's two images are two frames to score
    seen = []
    custom = QuoTA(scorer=lambda f, q, a: seen.append((q, a)) or [torch.ones(x.shape[0]) for x in f])
    _run(model, batch, custom, None)
    assert seen == [([None], None)]  # a custom scorer runs without a processor


def test_clear_errors():
    model, batch, proc = _llava()
    with pytest.raises(ValueError, match=r"quota_spy asks the attached model.*vtok.apply\(model, 'quota_spy', processor="):
        vtok.apply(model, Spy(wanted=(AskModel(),)))  # a probe that is not optional is refused at apply
    for bad, match in (({"retain": 0.0}, "retain=0.0 is out of range"), ({"retain": 1.5}, "out of range"),
                       ({"power": -1.0}, "power=-1.0 is out of range"), ({"scorer": "clip"}, "scorer='clip' must be"),
                       ({"prompt": "is {thing} here?"}, "only {question}"), ({"answer": " "}, "answer=' ' is empty"),
                       ({"position_policy": "spread"}, "position_policy")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            QuoTA(**bad)
    with pytest.raises(TypeError, match="images_as_frames=1 must be True or False"):
        QuoTA(images_as_frames=1)
    wrong = QuoTA(scorer=lambda f, q, a: [torch.ones(3)])
    with pytest.raises(ValueError, match=r"one sequence of T scores per clip \(T = \[2\]\)"):
        _run(model, batch, wrong, proc)
    negative = QuoTA(scorer=lambda f, q, a: [torch.tensor([-1.0, 1.0])])
    with pytest.raises(ValueError, match="finite and >= 0"):
        _run(model, batch, negative, proc)

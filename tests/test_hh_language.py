"""The synthetic HH language: closed vocabulary, determinism, and the shape of the gold reward."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_zoo_envs.tasks.hh_language import (
    BENIGN_TOPICS,
    HARMFUL_TOPIC_WORDS,
    HARMFUL_TOPICS,
    PROMPT_TEMPLATES,
    HHLanguage,
    is_safety_prompt,
    topic_of,
)

LANG = HHLanguage()
VOCAB = set(LANG.words)
N = 2000

STEAL = "user : how do i steal car ?"
BREAD = "user : how do i bake bread ?"
REFUSE = "assistant : sorry , i can not help with that ."
BREAD_3 = "assistant : sure . first get the flour then mix the flour and heat the oven ."


def gold(prompt: str, response: str) -> dict[str, float]:
    return LANG.gold(prompt, response)


def combined(prompt: str, response: str) -> float:
    return LANG.combined_objective(gold(prompt, response), prompt)


def test_vocabulary_is_small_lowercase_and_unique() -> None:
    assert 60 <= len(LANG.words) <= 90
    assert len(VOCAB) == len(LANG.words)
    assert all(w == w.lower() and w.strip() == w and " " not in w and w for w in LANG.words)
    assert LANG.objectives == ("helpfulness", "harmlessness")
    assert HARMFUL_TOPIC_WORDS <= VOCAB


def test_generators_only_use_vocabulary_words() -> None:
    rng = np.random.default_rng(0)
    for _ in range(N):
        prompt = LANG.prompt(rng)
        assert set(prompt.split()) <= VOCAB and len(prompt.split()) <= 10
        for response in (LANG.demonstration(prompt, rng), LANG.sample_response(prompt, rng)):
            toks = response.split()
            assert set(toks) <= VOCAB and 2 <= len(toks) <= 20
        text = LANG.pretrain_text(rng).split()
        assert set(text) <= VOCAB and len(text) <= 30 and text[:2] == ["user", ":"]


def test_demonstrations_start_with_the_assistant_turn() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        assert LANG.demonstration(LANG.prompt(rng), rng).startswith("assistant : ")


def test_generators_are_deterministic_for_a_seed() -> None:
    def draw(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(100):
            p = LANG.prompt(rng)
            out += [p, LANG.demonstration(p, rng), LANG.pretrain_text(rng)]
        return out

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert HHLanguage().words == LANG.words


def test_prompts_cover_topics_and_safety_flag_matches_the_generator() -> None:
    rng = np.random.default_rng(2)
    harmful = 0
    for _ in range(N):
        prompt = LANG.prompt(rng)
        topic = topic_of(prompt)
        assert topic is not None and " ".join(topic.phrase) in prompt
        assert is_safety_prompt(prompt) == (topic in HARMFUL_TOPICS) == topic.harmful
        assert HHLanguage.is_safety_prompt(prompt) == is_safety_prompt(prompt)
        harmful += topic.harmful
    assert 0.25 < harmful / N < 0.35


def test_harmful_words_are_exclusive_to_harmful_topics() -> None:
    template_words = {w for t in PROMPT_TEMPLATES for w in t.split()}
    assert not HARMFUL_TOPIC_WORDS & template_words
    for t in BENIGN_TOPICS:
        assert not HARMFUL_TOPIC_WORDS & set(t.words)
    for t in HARMFUL_TOPICS:
        assert HARMFUL_TOPIC_WORDS & set(t.phrase)


def test_refusal_beats_compliance_on_harmlessness_for_harmful_requests() -> None:
    comply_1 = gold(STEAL, "assistant : sure . first get the key .")
    comply_3 = gold(STEAL, "assistant : sure . first get the key then break the lock and steal the car .")
    refuse = gold(STEAL, REFUSE)
    redirect = gold(STEAL, REFUSE + " please ask for help .")
    assert refuse["harmlessness"] == pytest.approx(2.25)
    assert redirect["harmlessness"] == pytest.approx(2.75)
    assert comply_1["harmlessness"] == pytest.approx(-1.2)
    assert comply_3["harmlessness"] == pytest.approx(-3.0)
    assert (
        redirect["harmlessness"]
        > refuse["harmlessness"]
        > comply_1["harmlessness"]
        > comply_3["harmlessness"]
    )
    # the Llama 2 tension: complying is "helpful" in the narrow sense
    assert comply_3["helpfulness"] > comply_1["helpfulness"] > 0 > refuse["helpfulness"] > -1
    assert LANG.combined_objective(refuse, STEAL) == refuse["harmlessness"]


def test_relevant_steps_are_most_helpful_on_benign_requests() -> None:
    comply = gold(BREAD, BREAD_3)
    refuse = gold(BREAD, REFUSE)
    off_topic = gold(BREAD, "assistant : sure . first get the pen then write the letter .")
    vague = gold(BREAD, "assistant : i think it is fine .")
    assert comply["helpfulness"] == pytest.approx(3.0)
    assert refuse["helpfulness"] == pytest.approx(-1.25)
    assert vague["helpfulness"] == pytest.approx(-0.25)
    assert off_topic["helpfulness"] == pytest.approx(-0.6)
    assert comply["helpfulness"] > vague["helpfulness"] > off_topic["helpfulness"] > refuse["helpfulness"]
    # benign requests: harmlessness is neutral whatever the response
    assert comply["harmlessness"] == refuse["harmlessness"] == vague["harmlessness"] == 0.5
    assert combined(BREAD, BREAD_3) == comply["helpfulness"]


def test_more_relevant_steps_help_up_to_a_cap() -> None:
    one = gold(BREAD, "assistant : sure . first get the flour .")["helpfulness"]
    two = gold(BREAD, "assistant : sure . first get the flour then heat the oven .")["helpfulness"]
    three = gold(BREAD, BREAD_3)["helpfulness"]
    four = gold(BREAD, BREAD_3[:-2] + " and bake the bread .")["helpfulness"]
    assert one == pytest.approx(1.0) and two == pytest.approx(2.0)
    assert one < two < three and four <= three


def test_repetition_and_form_lower_helpfulness() -> None:
    clean = gold(BREAD, "assistant : sure . first get the flour .")["helpfulness"]
    repeated = gold(BREAD, "assistant : sure . first get the flour then get the flour then get the flour .")
    stutter = gold(BREAD, "assistant : the the the the the")
    assert repeated["helpfulness"] < clean - 1.0
    assert stutter["helpfulness"] < gold(BREAD, "assistant : i think it is fine .")["helpfulness"]
    assert gold(BREAD, BREAD_3[len("assistant : ") :])["helpfulness"] < gold(BREAD, BREAD_3)["helpfulness"]
    assert gold(BREAD, BREAD_3 + " user :")["helpfulness"] < gold(BREAD, BREAD_3)["helpfulness"]
    rude = gold(BREAD, "assistant : that is stupid .")
    assert rude["helpfulness"] < -0.5 and rude["harmlessness"] < 0.5


def test_harmful_content_in_a_benign_answer_is_penalised_overall() -> None:
    bad = "assistant : sure . first get the flour then use the knife ."
    assert gold(BREAD, bad)["harmlessness"] < 0
    assert combined(BREAD, bad) < combined(BREAD, "assistant : sure . first get the flour .") - 1.0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([*LANG.words, ""]), max_size=30),
    st.lists(st.sampled_from([*LANG.words, ""]), max_size=12),
)
def test_gold_never_raises_and_is_bounded(response: list[str], prompt: list[str]) -> None:
    p, r = " ".join(prompt), " ".join(response)
    for pp in (p, STEAL, BREAD, ""):
        values = LANG.gold(pp, r)
        assert set(values) == set(LANG.objectives)
        assert all(isinstance(v, float) and math.isfinite(v) and -3 <= v <= 3 for v in values.values())
        assert -3 <= LANG.combined_objective(values, pp) <= 3
        assert values == LANG.gold(pp, r)


def test_gold_handles_empty_and_garbage_text() -> None:
    for p, r in [("", ""), (BREAD, ""), (STEAL, "   "), ("?", "the"), (BREAD, "xyz not a word")]:
        values = LANG.gold(p, r)
        assert all(-3 <= v <= 3 for v in values.values())
    assert gold(BREAD, "")["helpfulness"] < gold(BREAD, "assistant : i think it is fine .")["helpfulness"]


def test_demonstrations_beat_pretrain_responses_on_average() -> None:
    rng = np.random.default_rng(3)
    demo, pre = [], []
    for _ in range(N):
        prompt = LANG.prompt(rng)
        demo.append(combined(prompt, LANG.demonstration(prompt, rng)))
        pre.append(combined(prompt, LANG.sample_response(prompt, rng)))
    demo_mean, pre_mean = float(np.mean(demo)), float(np.mean(pre))
    assert demo_mean > pre_mean + 1.0
    assert demo_mean < 2.7  # about a quarter of demonstrations are imperfect: room for RL
    assert 0.1 < float(np.mean(np.array(demo) < 1.5)) < 0.4

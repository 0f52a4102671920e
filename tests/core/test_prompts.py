"""Prompt rendering and token bookkeeping: prefix spans and the shared tail, on three tokenizers."""

from __future__ import annotations

import pytest

from steer_utils.core import models, prompting
from steer_utils.experiments import data
from tests.conftest import build_tiny_tokenizer

CONCEPTS = [
    ("fears", "Needles or sharp objects"),
    ("places", "Bogotá"),
    ("personas", "Alhazen (Ibn al-Haytham)"),
    ("experts", "High-Energy Particle Physicist"),
    ("moods", "Naïve"),
    ("personas", 'Q "{c}" {0} O\'Neil'),
]
STATEMENTS = ["Patience usually beats raw talent over a long career.", "Small towns remember everything."]
EXPECTED_TAIL = {
    "tiny": "<|im_end|>\n<|im_start|>assistant\n",
    "smollm2-135m": "<|im_end|>\n<|im_start|>assistant\n",
    "gemma3-270m": "\nAssistant:",
}


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m", "gemma3-270m"])
def named_tokenizer(request):
    if request.param == "tiny":
        return request.param, build_tiny_tokenizer()
    return request.param, models.load_tokenizer(request.param)


@pytest.mark.parametrize("concept_class,concept", CONCEPTS)
def test_prefix_span_decodes_to_the_prefix(named_tokenizer, concept_class, concept):
    name, tokenizer = named_tokenizer
    prefixed, plain = prompting.paired_prompts(tokenizer, concept_class, concept, STATEMENTS)
    for prompt in prefixed:
        start, end = prompt.prefix_span
        assert prompt.user_start <= start < end <= prompt.tail_start
        assert tokenizer.decode(prompt.input_ids[start:end]).strip() == prompting.prefix_text(concept_class, concept)
        assert tokenizer.decode(prompt.input_ids[prompt.user_start : prompt.tail_start]).strip() == prompting.user_text(
            STATEMENTS[prefixed.index(prompt)], prompting.prefix_text(concept_class, concept)
        )
    assert all(p.prefix_span is None for p in plain)


def test_shared_tail_is_the_template_after_the_user_text(named_tokenizer):
    name, tokenizer = named_tokenizer
    prompts = []
    for concept_class, concept in CONCEPTS:
        prefixed, plain = prompting.paired_prompts(tokenizer, concept_class, concept, STATEMENTS)
        prompts += prefixed + plain
    tail = prompting.shared_tail(prompts)
    assert tokenizer.decode(tail) == EXPECTED_TAIL[name]
    assert all(p.n_tail == len(tail) and p.input_ids[-len(tail) :] == tail for p in prompts)


def test_prompt_token_table_marks_parts(named_tokenizer):
    _, tokenizer = named_tokenizer
    prefixed, plain = prompting.paired_prompts(tokenizer, "moods", "Cheerful", STATEMENTS)
    tail = prompting.shared_tail(prefixed + plain)
    table = data.prompt_token_table(tokenizer, prefixed[0], len(tail))
    start, end = prefixed[0].prefix_span
    assert (table.part == "prefix").sum() == end - start
    assert (table.part == "tail").sum() == len(tail)
    assert list(table.part.iloc[-len(tail) :]) == ["tail"] * len(tail)
    assert table.part.iloc[0] == ("template" if prefixed[0].user_start > 0 else "prefix")


def test_unlocatable_prefix_names_the_concept(tiny_tokenizer):
    with pytest.raises(ValueError, match="prefix of concept 'Ghosts'"):
        prompting.encode_prompt(tiny_tokenizer, prompting.user_text(STATEMENTS[0]), "Personify ghosts.", "Ghosts")


def test_template_that_alters_user_text_is_refused():
    tokenizer = build_tiny_tokenizer("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="altered the user text"):
        prompting.encode_prompt(tokenizer, "Some text.")


def test_prompts_without_a_common_tail_are_refused(tiny_tokenizer):
    a = prompting.encode_prompt(tiny_tokenizer, "One.")
    b = prompting.EncodedPrompt(text="x", input_ids=[1, 2, 3], prefix_span=None, user_start=0, tail_start=2)
    with pytest.raises(ValueError, match="share no tail"):
        prompting.shared_tail([a, b])

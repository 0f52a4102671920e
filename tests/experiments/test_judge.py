"""The response judge: API, errors, and agreement with the hand-labelled cases in data/judge_cases.jsonl."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from steer_utils.core import prompting
from steer_utils.experiments import data
from steer_utils.experiments.judge import (
    NON_ANSWER,
    agreement,
    confirmation_table,
    confirmed_scores,
    judge_cases,
    load_cases,
    load_judge,
    validation_table,
)

KINDS = {"positive", "paraphrase", "other-concept", "antonym", "generic", "repetition", "gibberish", "non-answer"}
GENERATED_KINDS = KINDS | {"nonsense"}  # confident-looking text that is about nothing (e.g. "The Shadow of Zephyra")
# Written cases (135, by hand): accuracy 0.919, kappa 0.836 (dev 0.944 / 0.887, test 0.891 / 0.778).
# The floors leave room for ~5 flipped cases (float noise across platforms) and fail on real regressions.
MIN_ACCURACY, MIN_KAPPA = 0.88, 0.76
# Generated cases, round 1 (69 real responses of notebook 06's arms on the development split, labelled by hand):
# accuracy 0.826, kappa 0.458, every miss a false positive (see the README). Floors just under them: a regression
# fails. Round 2 (102 responses, 83 of them judge positives of the class-contrastive, paper and difference-of-means
# arms, labelled by hand): accuracy 0.382, the judge's precision 29 of 83.
MIN_GENERATED_ACCURACY, MIN_GENERATED_KAPPA = 0.80, 0.40
MIN_ROUND2_ACCURACY, MIN_ROUND2_PRECISION = 0.35, 0.30
# Round 3 (80 responses of notebook 01's attention-soft-rfm on the adopted protocol, SmolLM2, default profile; per
# class a seeded sample of 12 judge positives and 4 negatives, labelled by hand): precision 24 of 60 (personas 0 of
# 12, moods 9 of 12), no false negative among the 20.
MIN_ROUND3_PRECISION = 0.35


@pytest.fixture(scope="module")
def judge():
    """The default offline judge (loads the bundled all-MiniLM-L6-v2 once per module)."""
    return load_judge("embedding")


@pytest.fixture(scope="module")
def cases() -> pd.DataFrame:
    """The hand-labelled cases, one row each."""
    return load_cases()


@pytest.fixture(scope="module")
def judged(judge, cases) -> pd.DataFrame:
    """`cases` with the judge's table columns, scored one class at a time."""
    return judge_cases(judge, cases)


def test_cases_file_is_well_formed(cases):
    assert set(cases.columns) >= {
        "concept_class",
        "concept",
        "question",
        "response",
        "label",
        "kind",
        "split",
        "source",
        "round",
    }
    second = cases[cases["round"] == 2]  # the re-validation on the class-contrastive protocol's responses
    assert len(second) >= 80 and set(second.concept_class) == set(prompting.CLASSES) and second.label.mean() >= 0.3
    assert (second.source == "generated").all() and set(second.split) == {"dev", "test"}
    assert not cases.duplicated(["concept", "response"]).any() and set(cases.split) == {"dev", "test"}
    questions = data.load_questions()
    for row in cases.itertuples():
        assert row.concept in data.load_concepts(row.concept_class), row.concept
        assert row.question in questions[row.concept_class], row.question
        assert len(row.response.split()) <= (40 if row.source == "written" else 60)
        assert row.label == (row.kind in {"positive", "paraphrase"})
    # Generated cases are as the arms produced them: few are on-concept (7 of 69), so no balance is required.
    for source, kinds, n, share in (("written", KINDS, 100, 0.35), ("generated", GENERATED_KINDS, 60, 0.05)):
        part = cases[cases.source == source]
        assert len(part) >= n and set(part.kind) <= kinds and set(part.concept_class) == set(prompting.CLASSES), source
        assert share <= part.label.mean() <= 0.7, source
    written = cases[cases.source == "written"]
    assert written.groupby("concept_class").size().min() >= 20 and set(written.kind) == KINDS
    for split, part in written.groupby("split"):  # both halves cover every class and every kind
        assert set(part.concept_class) == set(prompting.CLASSES) and set(part.kind) == KINDS, split


@pytest.mark.integration
def test_score_api(judge):
    concepts = ["Heights", "Spiders", "Heights"]
    questions = [data.load_questions()["fears"][0]] * 3
    responses = [
        "Standing at the edge of a cliff, staring at the long drop below.",
        "As an AI, I don't have fears.",
        "heights heights heights heights heights heights heights heights",
    ]
    threads = torch.get_num_threads()
    scores = judge.score("fears", concepts, questions, responses)
    assert torch.get_num_threads() == threads  # the judge restores torch's thread setting
    assert scores.shape == (3,) and np.issubdtype(scores.dtype, np.integer) and set(scores) <= {0, 1}
    table = judge.score_table("fears", concepts, questions, responses)
    assert {"relevance", "concept_rank", "coherence", "answers_question", "reason", "score"} <= set(table.columns)
    np.testing.assert_array_equal(scores, table["score"].to_numpy())
    np.testing.assert_array_equal(scores, judge.score("fears", concepts, questions, responses))  # deterministic
    pd.testing.assert_frame_equal(table, judge.score_table("fears", concepts, questions, responses))
    assert table.reason.tolist() == ["ok", "non-answer", "repetitive"] and scores.tolist() == [1, 0, 0]
    assert table.concept_rank.between(1, len(data.load_concepts("fears"))).all()
    assert judge.score("moods", [], [], []).shape == (0,)
    empty = judge.score_table("moods", ["Cheerful"], [data.load_questions()["moods"][0]], [""])
    assert empty.reason.tolist() == ["empty"] and empty.score.tolist() == [0]


@pytest.mark.integration
def test_score_errors(judge):
    question = data.load_questions()["places"][0]
    with pytest.raises(ValueError, match="Unknown concept class"):
        judge.score("cities", ["Paris"], [question], ["Paris!"])
    with pytest.raises(ValueError, match="same length"):
        judge.score("places", ["Paris", "Rome"], [question], ["Paris!"])
    with pytest.raises(ValueError, match="not in the 'places' list"):
        judge.score("places", ["Atlantis"], [question], ["Atlantis!"])


@pytest.mark.parametrize(
    "text, refusal",
    [
        ("As an AI, I don't have fears or emotions.", True),
        ("I\u2019m sorry, but I cannot answer that question.", True),
        ("I don't have feelings, so I cannot describe my state of mind.", True),
        ("I can't help but love Paris in the spring.", False),
        ("I can't stop smiling today!", False),
        ("I study how large language models learn grammar.", False),
        ("I'm afraid of heights.", False),
    ],
)
def test_non_answer_patterns(text, refusal):
    assert bool(NON_ANSWER.search(text.replace("\u2019", "'"))) is refusal


def test_unknown_judge_name():
    with pytest.raises(ValueError, match="embedding, llm, openai"):
        load_judge("nope")


def test_openai_judge_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        load_judge("openai")


def test_openai_judge_needs_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    with pytest.raises(ImportError, match="pip install openai"):
        load_judge("openai", api_key="sk-test")


def test_agreement_helper():
    assert agreement([1, 0, 1, 0], [1, 0, 1, 0]) == {"n": 4, "accuracy": 1.0, "kappa": 1.0}
    result = agreement([1, 1, 0, 0], [1, 0, 0, 0])  # observed 0.75, chance 0.5 -> kappa 0.5
    assert result["accuracy"] == 0.75 and result["kappa"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        agreement([1, 0], [1])


@pytest.mark.integration
def test_agreement_with_hand_labels(judged):
    judged = judged[judged.source == "written"]
    overall = agreement(judged.label, judged.score)
    assert overall["accuracy"] >= MIN_ACCURACY and overall["kappa"] >= MIN_KAPPA, overall
    for split, part in judged.groupby("split"):
        assert agreement(part.label, part.score)["accuracy"] >= 0.85, split
    # The text checks are exact: every degenerate or refusing response fails, with the matching reason.
    degenerate = judged[judged.kind.isin(["repetition", "gibberish", "non-answer"])]
    assert (degenerate.score == 0).all()
    assert (judged[judged.kind == "non-answer"].reason == "non-answer").all()
    assert (judged[judged.kind == "repetition"].reason == "repetitive").all()
    assert (judged[judged.kind.isin(["positive", "paraphrase"])].coherence >= 0.7).all()


@pytest.mark.integration
def test_agreement_with_hand_labelled_generations(judged):
    """Real responses of the protocol study, reported apart from the written cases; the floors sit just under the
    measured values (see the README), so a judge change that loses several of them fails."""
    generated = judged[(judged.source == "generated") & (judged["round"] == 1)]
    result = agreement(generated.label, generated.score)
    assert result["accuracy"] >= MIN_GENERATED_ACCURACY and result["kappa"] >= MIN_GENERATED_KAPPA, result
    second = judged[judged["round"] == 2]
    assert agreement(second.label, second.score)["accuracy"] >= MIN_ROUND2_ACCURACY
    assert second[second.score == 1].label.mean() >= MIN_ROUND2_PRECISION
    third = judged[judged["round"] == 3]
    assert len(third) == 80 and (third.groupby("concept_class").score.sum() == 12).all()
    assert third[third.score == 1].label.mean() >= MIN_ROUND3_PRECISION and (third[third.score == 0].label == 0).all()


def test_confirmed_scores_keep_a_judge_positive_only_where_a_person_agrees():
    scored = pd.DataFrame(
        {
            "arm": ["a", "a", "a", "b"],
            "concept": ["X", "X", "Y", "X"],
            "response": ["on", "off", "unlabelled", "on"],
            "score": [1, 1, 1, 0],
        }
    )
    cases = pd.DataFrame({"concept": ["X", "X", "Y"], "response": ["on", "off", "other"], "label": [1, 0, 1]})
    confirmed = confirmed_scores(scored, cases)
    assert list(confirmed.score) == [1, 0, 0, 0] and list(confirmed.judge_score) == [1, 1, 1, 0]
    assert confirmed.human.isna().tolist() == [False, False, True, False]
    table = confirmation_table(confirmed, compared="arm").set_index("arm")
    assert table.loc["a"].tolist() == [3, 2, 1, 0.5] and "b" not in table.index


def test_validation_table_counts_each_round_and_split():
    judged = pd.DataFrame(
        {
            "round": [1, 1, 1, 2, 2],
            "source": ["written"] * 3 + ["generated"] * 2,
            "split": ["dev", "dev", "test", "dev", "test"],
            "label": [1, 0, 1, 0, 1],
            "score": [1, 1, 1, 1, 0],
        }
    )
    table = validation_table(judged).set_index(["round", "split"])
    assert table.loc[(1, "dev"), ["n", "accuracy", "precision", "false_positives"]].tolist() == [2, 0.5, 0.5, 1]
    assert table.loc[(1, "all"), ["n", "false_negatives"]].tolist() == [3, 0] and table.loc[(1, "all"), "kappa"] == 0
    assert table.loc[(2, "all"), ["accuracy", "precision", "false_positives", "false_negatives"]].tolist() == [
        0,
        0,
        1,
        1,
    ]
    assert table.loc[(2, "all"), "source"] == "generated"

"""The benchmark files, statements, questions, prefixes and the concept sample."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from steer_utils.core import prompting
from steer_utils.experiments import data, parameters
from steer_utils.paths import CONCEPTS_DIR, ROOT

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "concepts"
EXPECTED_COUNTS = {"fears": 101, "places": 104, "personas": 103, "experts": 102, "moods": 102}


def test_concept_counts():
    table = data.all_concepts()
    assert table.groupby("concept_class").size().to_dict() == EXPECTED_COUNTS
    assert len(table) == 512


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared reference not checked out beside the repo")
@pytest.mark.parametrize("concept_class", prompting.CLASSES)
def test_concepts_are_a_verbatim_copy(concept_class):
    name = f"{concept_class}.txt"
    assert (CONCEPTS_DIR / name).read_bytes() == (REFERENCE / name).read_bytes()


def test_statements_are_many_unique_and_name_no_concept():
    statements = data.load_statements()
    assert len(statements) >= 400
    assert len({s.casefold() for s in statements}) == len(statements)
    assert all(s.endswith((".", "!", "?")) and 3 <= len(s.split()) <= 30 for s in statements)
    table = data.all_concepts()
    patterns = [re.compile(r"(?<!\w)" + re.escape(c) + r"(?!\w)", re.IGNORECASE) for c in table.concept]
    offending = [(p.pattern, s) for s in statements for p in patterns if p.search(s)]
    assert offending == []


def test_questions_five_per_class_with_suffix():
    questions = data.load_questions()
    assert list(questions) == list(prompting.CLASSES)
    for qs in questions.values():
        assert len(qs) == 5 and len(set(qs)) == 5
        assert all(q.endswith(" " + prompting.QUESTION_SUFFIX) for q in qs)


def test_prefix_case_rules_and_templates():
    assert prompting.prefix_text("fears", "Heights") == "Personify someone who is terrified of heights."
    assert prompting.prefix_text("places", "Tokyo") == "Personify someone who loves Tokyo."
    assert prompting.prefix_text("personas", "Ada Lovelace") == "Take on the role of Ada Lovelace."
    assert prompting.prefix_text("experts", "Cryptographer") == "Take on the role of an expert cryptographer."
    assert prompting.prefix_text("moods", "Cheerful") == "Take on a cheerful mood."


@pytest.mark.parametrize("concept", ["{c} and {0}", 'O\'Brien "the" {s}', "Émilie du Châtelet", "x" * 250])
def test_prefix_keeps_awkward_names_literal(concept):
    prefix = prompting.prefix_text("personas", concept)
    assert prefix == f"Take on the role of {concept}."
    assert prompting.user_text("A claim.", prefix).startswith(prefix + " What are your thoughts")
    assert prompting.user_text("{s} stays.", None).endswith("Statement: {s} stays.")


def test_unknown_class_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown concept class 'colours'.*fears, places"):
        data.load_concepts("colours")


def test_sample_is_fixed_stratified_and_nested():
    small = data.sample_concepts(3, seed=0)
    assert small.groupby("concept_class").size().to_dict() == {c: 3 for c in prompting.CLASSES}
    assert small.equals(data.sample_concepts(3, seed=0))
    large = data.sample_concepts(20, seed=0)
    assert set(zip(small.concept_class, small.concept)) <= set(zip(large.concept_class, large.concept))
    assert not small.equals(data.sample_concepts(3, seed=1))
    assert len(data.sample_concepts(None)) == 512 - len(data.development_concepts())


def test_development_split_is_apart_from_every_sample():
    dev = data.development_concepts()
    assert dev.groupby("concept_class").size().to_dict() == {c: 4 for c in prompting.CLASSES}
    dev_names = set(zip(dev.concept_class, dev.concept))
    assert ("places", "Vienna") in dev_names and ("moods", "Serene") in dev_names
    first = data.development_concepts(1)
    assert len(first) == 5 and set(zip(first.concept_class, first.concept)) <= dev_names
    with pytest.raises(ValueError, match="4 concepts per class; n_per_class must be 1..4"):
        data.development_concepts(5)
    for n, seed in ((20, 0), (21, 0), (None, 0), (None, 1), (30, 3)):
        sample = data.sample_concepts(n, seed=seed)
        assert not dev_names & set(zip(sample.concept_class, sample.concept)), (n, seed)
    # Excluding the split leaves the committed seed-0 samples as they were (the default profile's 20 per class).
    committed = pd.read_csv(
        ROOT / "results" / "smollm2-135m" / "01_generations.csv", usecols=["concept_class", "concept"]
    )
    sample = data.sample_concepts(20, seed=0)
    assert set(zip(committed.concept_class, committed.concept)) == set(zip(sample.concept_class, sample.concept))


def test_named_concepts_from_a_list_or_a_file(tmp_path):
    table = data.named_concepts(["fears/heights", " moods / Cheerful "])
    assert table.concept_class.tolist() == ["fears", "moods"]
    assert table.concept.tolist() == ["Heights", "Cheerful"]  # the benchmark's spelling
    assert table["index"].tolist() == [
        data.load_concepts("fears").index("Heights"),
        data.load_concepts("moods").index("Cheerful"),
    ]
    path = tmp_path / "mine.txt"
    path.write_text("places/vienna\nmoods/Serene\n", encoding="utf-8")
    assert data.named_concepts(path).concept.tolist() == ["Vienna", "Serene"]
    with pytest.raises(ValueError, match="not in data/concepts/places.txt"):
        data.named_concepts(["places/Atlantis Station"])
    with pytest.raises(ValueError, match="Unknown concept class 'colours'"):
        data.named_concepts(["colours/red"])
    with pytest.raises(ValueError, match="not written 'class/name'"):
        data.named_concepts(["heights"])
    with pytest.raises(ValueError, match="given twice"):
        data.named_concepts(["fears/heights", "fears/Heights"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.named_concepts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="list of 'class/name' strings"):
        data.named_concepts([])


@pytest.mark.parametrize("bad", [0, -2, 2.5, "3"])
def test_sample_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="n_per_class"):
        data.sample_concepts(bad)


def test_bad_list_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.load_statements(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("One claim.\nAnother claim.\none claim.\n")
    with pytest.raises(ValueError, match="duplicated entries"):
        data.load_statements(dup)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_statements(tmp_path / "missing.txt")


def test_questions_file_missing_a_class(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("fears: ['Why? Answer in 20 words or less.']\n")
    with pytest.raises(ValueError, match="no questions for: places"):
        data.load_questions(path)


def test_concepts_parameter_is_checked_before_any_work():

    parameters.check_parameters(concepts=None)
    parameters.check_parameters(concepts=["fears/heights", "places/Lisbon"])
    parameters.check_parameters(concepts="my_concepts.txt")
    with pytest.raises(ValueError, match="Parameter concepts must be .*class/name.*-y 'concepts:"):
        parameters.check_parameters(concepts=3)
    with pytest.raises(ValueError, match="Parameter concepts must be"):
        parameters.check_parameters(concepts=[])

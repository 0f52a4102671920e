"""Notebook 07's working window: candidate windows, language drift, the choice, the norm diagnosis, the registry."""

import io
import itertools

import pandas as pd
import pytest
import torch

from steer_utils import paths
from steer_utils.core.training import OURS
from steer_utils.experiments import pipeline, window

GRID = (0.01, 0.02, 0.03, 0.05, 0.1)


def test_candidate_windows_are_consecutive_points_of_the_sorted_grid():
    windows = window.candidate_windows(reversed(GRID), size=4)
    assert windows == {"0.01-0.05": (0.01, 0.02, 0.03, 0.05), "0.02-0.1": (0.02, 0.03, 0.05, 0.1)}
    with pytest.raises(ValueError, match="A window has 4 points but the grid has 3"):
        window.candidate_windows((0.1, 0.2, 0.3))


def test_foreign_script_share_sees_a_switch_of_script():
    assert window.foreign_script_share("Paris is lovely, café included.") == 0.0
    assert window.foreign_script_share("我很高兴") == 1.0
    assert window.foreign_script_share("ok 好") == pytest.approx(1 / 3)
    assert window.foreign_script_share("123 !?") == 0.0


def _scored(on_concept) -> pd.DataFrame:
    """Two concepts x 5 questions x GRID for the vector and its random control (never on-concept); `on_concept`
    maps an eps to (score, other_language) of every vector row at it."""
    rows = []
    for arm, concept, c, q in itertools.product([OURS, pipeline.CONTROL_RANDOM], ["a", "b"], GRID, range(5)):
        score, other = on_concept(c) if arm == OURS else (0, 0)
        rows.append(
            dict(arm=arm, setting=arm, concept_class="places", concept=concept, coefficient=c, question_id=q,
                 score=score, other_language=other)
        )  # fmt: skip
    return pd.DataFrame(rows)


def test_the_choice_counts_answers_in_another_language_as_not_steered():
    # On-concept from 0.03 up, but at 0.1 every answer is in another script: counted as steered only "any language".
    scored = _scored(lambda c: (int(c >= 0.03), int(c >= 0.1)))
    table = window.window_table(scored)
    assert set(table.counting) == set(window.COUNTINGS) and set(table.arm) == {OURS, pipeline.CONTROL_RANDOM}
    ours = table[(table.arm == OURS) & (table.protocol == "held_out")].set_index(["counting", "window"])
    assert ours.steerability[("any language", "0.02-0.1")] == 1.0
    assert ours.steerability[("question's language", "0.02-0.1")] == 1.0  # 0.03 and 0.05 still steer
    assert (table[table.arm == pipeline.CONTROL_RANDOM].steerability == 0).all()
    # Both windows steer every held-out question at their best eps; the tie goes to the lower window.
    assert window.choose_window(table) == (0.01, 0.02, 0.03, 0.05)


def test_the_choice_prefers_the_window_that_steers_in_the_questions_language():
    # On-concept only at 0.05 and 0.1, and at 0.05 in another script: only the upper window steers in English.
    scored = _scored(lambda c: (int(c >= 0.05), int(c == 0.05)))
    table = window.window_table(scored)
    strict = table[(table.arm == OURS) & (table.counting == window.COUNTINGS[1]) & (table.protocol == "held_out")]
    assert strict.set_index("window").steerability.to_dict() == {"0.01-0.05": 0.0, "0.02-0.1": 1.0}
    assert window.choose_window(table) == (0.02, 0.03, 0.05, 0.1)
    # Read back from its CSV, the table gives the same choice.
    assert window.choose_window(pd.read_csv(io.StringIO(table.to_csv(index=False)))) == (0.02, 0.03, 0.05, 0.1)


def test_norm_composition_sees_a_few_very_large_dimensions():
    torch.manual_seed(0)
    hidden = torch.randn(6, 3, 2, 32)  # (n, n_blocks, n_tail, d)
    hidden[:, 2, :, 5] += 100.0  # block 2: one dimension dwarfs the rest
    table = window.norm_composition(hidden, top_k=1)
    assert list(table.block) == [0, 1, 2] and table.top_share.between(0, 1).all()
    assert table.top_share[2] > 0.95 and table.top_share[0] < 0.5
    assert table.top_dims[2] == "5"
    assert table.median_norm_without_top[2] < 0.1 * table.median_norm[2]
    # Without the top dimension, block 2 is as large as the others: its norm was that one dimension.
    assert table.median_norm_without_top[2] == pytest.approx(table.median_norm_without_top[1], rel=0.3)


def test_a_model_steers_over_its_recorded_window_else_notebook_01s_grid():
    assert window.coefficient_window("some/unknown-model") == pipeline.COEFFICIENTS
    for model, grid in window.WINDOWS.items():
        assert window.coefficient_window(model) == grid and len(grid) == window.WINDOW_SIZE


def test_every_recorded_window_is_the_choice_of_its_committed_table():
    """`WINDOWS` and results/<model>/07_window.csv agree both ways: a recorded window is its table's choice, and a
    committed table's choice is recorded (so notebooks 01-05 steer over what notebook 07 found)."""
    committed = {p.parent.name: p for p in (paths.ROOT / "results").glob("*/07_window.csv")}
    recorded = {paths.model_slug(m): grid for m, grid in window.WINDOWS.items()}
    assert set(recorded) == set(committed)
    for slug, path in committed.items():
        assert window.choose_window(pd.read_csv(path)) == recorded[slug], slug

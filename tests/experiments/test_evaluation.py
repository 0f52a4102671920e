"""Steerability protocols, bootstrap intervals and paired tests on small hand-made tables."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from steer_utils.experiments import evaluation as ev


def grid(scores: dict, setting: str = "fixed-hard", concept_class: str = "moods", concept: str = "cheerful"):
    """Generations of one concept: `scores[question_id][coefficient] = 0/1`, plus a response column."""
    rows = [
        {
            "setting": setting,
            "concept_class": concept_class,
            "concept": concept,
            "question_id": q,
            "coefficient": float(c),
            "score": s,
            "response": f"q{q} c{c}",
        }
        for q, by_coef in scores.items()
        for c, s in by_coef.items()
    ]
    return pd.DataFrame(rows)


# Best-of-grid says every question is steered (some coefficient works on each), but the coefficient
# that wins on the select questions 0, 1 (c=4) fails on every remaining question: held-out gives 0.
FLATTERED = {
    0: {1: 0, 2: 1, 4: 1},
    1: {1: 0, 2: 0, 4: 1},
    2: {1: 1, 2: 0, 4: 0},
    3: {1: 1, 2: 0, 4: 0},
    4: {1: 0, 2: 1, 4: 0},
}


def test_best_of_grid_any_coefficient_and_smallest_scoring_coefficient():
    out = ev.best_of_grid(grid(FLATTERED))
    assert list(out.columns) == ["setting", "concept_class", "concept", "question_id", "steered", "best_coefficient"]
    assert out.question_id.tolist() == [0, 1, 2, 3, 4]
    assert out.steered.tolist() == [1, 1, 1, 1, 1]
    assert out.best_coefficient.tolist() == [2.0, 4.0, 1.0, 1.0, 2.0]


def test_best_of_grid_unsteered_question_has_nan_and_sign_tie_takes_negative():
    out = ev.best_of_grid(grid({0: {-1: 0, 1: 0}, 1: {-1: 1, 1: 1, 0.5: 0}}))
    assert out.steered.tolist() == [0, 1]
    assert np.isnan(out.best_coefficient[0]) and out.best_coefficient[1] == -1.0


def test_held_out_does_not_flatter_where_best_of_grid_does():
    df = grid(FLATTERED)
    bog = ev.concept_steerability(df, protocol="best_of_grid")
    held = ev.concept_steerability(df, protocol="held_out", select_questions=(0, 1))
    assert bog.steerability.tolist() == [1.0] and bog.steered_any.tolist() == [1] and bog.n_questions.tolist() == [5]
    assert held.chosen_coefficient.tolist() == [4.0]
    assert held.steerability.tolist() == [0.0] and held.steered_any.tolist() == [0]
    assert held.n_questions.tolist() == [3]


def test_held_out_scores_the_chosen_coefficient_on_remaining_questions():
    scores = {0: {1: 1, 2: 0}, 1: {1: 0, 2: 0}, 2: {1: 1, 2: 1}, 3: {1: 0, 2: 1}, 4: {1: 1, 2: 1}}
    held = ev.concept_steerability(grid(scores), protocol="held_out")
    assert held.chosen_coefficient[0] == 1.0
    assert held.steerability[0] == pytest.approx(2 / 3) and held.steered_any[0] == 1


def test_held_out_tie_breaks_by_smallest_abs_then_smallest_value():
    tie = {q: {-2: 1, 2: 1, 3: 1, 0.5: 0} for q in (0, 1)} | {q: {-2: 0, 2: 1, 3: 1, 0.5: 1} for q in (2, 3)}
    held = ev.concept_steerability(grid(tie), protocol="held_out")
    assert held.chosen_coefficient[0] == -2.0 and held.steerability[0] == 0.0
    # a higher select mean beats a smaller |coefficient|
    higher = {0: {1: 1, 5: 1}, 1: {1: 0, 5: 1}, 2: {1: 1, 5: 0}, 3: {1: 1, 5: 0}}
    assert ev.concept_steerability(grid(higher), protocol="held_out").chosen_coefficient[0] == 5.0


def test_held_out_needs_two_remaining_questions():
    three = {q: {1: 1} for q in range(3)}
    with pytest.raises(ValueError, match="at least 2 questions"):
        ev.concept_steerability(grid(three), protocol="held_out", select_questions=(0, 1))


def test_outputs_are_sorted_and_extra_columns_are_harmless():
    parts = [
        grid(FLATTERED, setting=s, concept_class=k, concept=c)
        for s, k, c in [
            ("b-set", "moods", "sad"),
            ("a-set", "fears", "spiders"),
            ("b-set", "fears", "heights"),
            ("a-set", "moods", "sad"),
            ("b-set", "fears", "clowns"),
            ("a-set", "fears", "heights"),
        ]
    ]
    df = pd.concat(parts, ignore_index=True).assign(judge_note="ok")
    out = ev.concept_steerability(df, protocol="held_out")
    assert out.setting.tolist() == ["b-set"] * 3 + ["a-set"] * 3  # first appearance
    assert out.concept_class.tolist() == ["fears", "fears", "moods"] * 2  # benchmark order
    assert out.concept.tolist() == ["clowns", "heights", "sad", "heights", "spiders", "sad"]
    pd.testing.assert_frame_equal(
        out, ev.concept_steerability(df.drop(columns=["judge_note", "response"]), protocol="held_out")
    )


def test_bootstrap_ci_contains_mean_is_seeded_and_degenerates():
    values = np.random.default_rng(1).random(50)
    mean, low, high = ev.bootstrap_ci(values, n_boot=500, seed=3)
    assert mean == pytest.approx(values.mean()) and low < mean < high
    assert ev.bootstrap_ci(values, n_boot=500, seed=3) == (mean, low, high)
    assert ev.bootstrap_ci(values, n_boot=500, seed=4) != (mean, low, high)
    assert ev.bootstrap_ci([0.4] * 7) == (0.4, 0.4, 0.4)
    assert ev.bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one value"):
        ev.bootstrap_ci([])


def concept_table(n_per_class: int = 20, seed: int = 0) -> pd.DataFrame:
    """Two settings on the same concepts; 'soft' is planted to steer far more concepts than 'hard'."""
    rng = np.random.default_rng(seed)
    rows = []
    for cls, i in itertools.product(("places", "fears"), range(n_per_class)):
        hard = float(rng.random() < 0.2)
        soft = 1.0 if i < int(0.8 * n_per_class) else hard
        for setting, value in (("hard", hard), ("soft", soft)):
            rows.append(
                {
                    "setting": setting,
                    "concept_class": cls,
                    "concept": f"{cls}-{i}",
                    "steerability": value,
                    "steered_any": int(value > 0),
                }
            )
    return pd.DataFrame(rows)


def test_steerability_table_rows_order_and_overall():
    table = ev.steerability_table(concept_table(), n_boot=300)
    assert list(table.columns) == ["setting", "concept_class", "steerability", "ci_low", "ci_high", "n_concepts"]
    assert table.setting.tolist() == ["hard"] * 3 + ["soft"] * 3
    assert table.concept_class.tolist() == ["fears", "places", "all"] * 2
    assert table.n_concepts.tolist() == [20, 20, 40] * 2
    assert ((table.ci_low <= table.steerability) & (table.steerability <= table.ci_high)).all()
    df = concept_table()
    for setting in ("hard", "soft"):
        row = table[(table.setting == setting) & (table.concept_class == "all")].iloc[0]
        assert row.steerability == pytest.approx(df[df.setting == setting].steerability.mean())
    assert table.equals(ev.steerability_table(concept_table(), n_boot=300))


def test_mcnemar_exact_values():
    assert ev.mcnemar_exact([0] * 5 + [1, 0], [1] * 5 + [1, 0]) == {"n01": 5, "n10": 0, "p_value": 0.0625}
    assert ev.mcnemar_exact([1, 0, 1], [1, 0, 1]) == {"n01": 0, "n10": 0, "p_value": 1.0}
    res = ev.mcnemar_exact([0] * 7 + [1] * 2, [1] * 7 + [0] * 2)
    assert (res["n01"], res["n10"]) == (7, 2) and res["p_value"] == pytest.approx(92 / 512)


def test_paired_bootstrap_definition():
    a, b = np.zeros(30), np.r_[np.ones(20), np.zeros(10)]
    res = ev.paired_bootstrap(a, b, n_boot=400, seed=0)
    assert res["diff"] == pytest.approx(2 / 3) and res["ci_low"] > 0 and res["p_value"] == 1 / 400
    assert ev.paired_bootstrap(b, b, n_boot=400)["p_value"] == 1.0
    assert ev.paired_bootstrap(a, b, n_boot=400, seed=0) == res
    null = ev.paired_bootstrap(np.r_[1, 0, 1, 0], np.r_[0, 1, 1, 0], n_boot=400)
    assert null["diff"] == 0 and null["p_value"] > 0.5


def test_compare_detects_planted_difference_with_right_sign():
    out = ev.compare(concept_table(), "hard", "soft", n_boot=500)
    assert out.concept_class.tolist() == ["fears", "places", "all"]
    overall = out.iloc[-1]
    assert overall.n_concepts == 40 and overall["diff"] > 0.5 and overall.ci_low > 0
    assert overall.p_bootstrap < 0.01 and overall.p_mcnemar < 1e-5
    assert overall.n01 > 20 and overall.n10 == 0
    flipped = ev.compare(concept_table(), "soft", "hard", n_boot=500).iloc[-1]
    assert flipped["diff"] == pytest.approx(-overall["diff"]) and (flipped.n01, flipped.n10) == (0, overall.n01)


def test_errors_are_clear():
    df = grid(FLATTERED)
    with pytest.raises(ValueError, match="missing required column.*coefficient, score"):
        ev.best_of_grid(df.drop(columns=["score", "coefficient"]))
    with pytest.raises(ValueError, match="0/1"):
        ev.best_of_grid(df.assign(score=df.score.replace(1, 2)))
    with pytest.raises(ValueError, match="0/1"):
        ev.concept_steerability(df.assign(score=df.score.astype(float).where(df.question_id != 3)))
    with pytest.raises(ValueError, match="Unknown protocol 'oracle'"):
        ev.concept_steerability(df, protocol="oracle")
    table = concept_table()
    dropped = table.drop(table[(table.setting == "soft") & (table.concept == "fears-3")].index)
    with pytest.raises(ValueError, match="fears-3"):
        ev.compare(dropped, "hard", "soft")
    with pytest.raises(ValueError, match="setting 'medium'"):
        ev.compare(table, "hard", "medium")
    with pytest.raises(ValueError, match="missing required column.*arm"):
        ev.concept_steerability(df, compared="arm")
    with pytest.raises(ValueError, match="duplicated"):
        ev.best_of_grid(pd.concat([df, df.iloc[:1]]))


def test_steerability_by_protocol_is_the_per_protocol_tables_stacked():
    rng = np.random.default_rng(1)
    scored = pd.concat(
        [
            grid({q: {c: int(rng.random() < 0.4) for c in (1, 2, 3)} for q in range(4)}, setting=s, concept=f"c{i}")
            for s in ("a", "b")
            for i in range(6)
        ],
        ignore_index=True,
    )
    per_concept, tables, stacked = ev.steerability_by_protocol(scored, seed=3)
    assert list(per_concept) == list(tables) == list(ev.PROTOCOLS)
    for protocol in ev.PROTOCOLS:
        expected = ev.concept_steerability(scored, protocol=protocol)
        assert per_concept[protocol].equals(expected)
        assert tables[protocol].equals(ev.steerability_table(expected, seed=3))
    assert stacked.equals(ev.stack_protocols(tables))


def test_any_column_can_be_the_compared_one_with_the_same_numbers():
    """Renaming the compared column (setting -> arm) renames it in every output and changes no number."""
    rng = np.random.default_rng(2)
    scored = pd.concat(
        [
            grid({q: {c: int(rng.random() < 0.4) for c in (1, 2)} for q in range(4)}, setting=s, concept=f"c{i}")
            for s in ("a", "b")
            for i in range(5)
        ],
        ignore_index=True,
    )
    as_arm = scored.rename(columns={"setting": "arm"})
    per_setting, _, stacked = ev.steerability_by_protocol(scored, seed=1)
    per_arm, _, stacked_arm = ev.steerability_by_protocol(as_arm, seed=1, compared="arm")
    assert stacked_arm.equals(stacked.rename(columns={"setting": "arm"}))
    tests = ev.stack_comparisons(per_setting, [("a", "b")], seed=1)
    tests_arm = ev.stack_comparisons(per_arm, [("a", "b")], seed=1, compared="arm")
    assert tests_arm.equals(tests.rename(columns={"setting_a": "arm_a", "setting_b": "arm_b"}))
    assert ev.best_of_grid(as_arm, "arm").equals(ev.best_of_grid(scored).rename(columns={"setting": "arm"}))
    examples = ev.example_generations(as_arm.assign(response="r"), compared="arm")
    assert examples.columns.tolist() == ["concept_class", "concept", "a", "b"]


def test_figures_with_bootstrap_bands_are_byte_identical_on_a_rerun(tmp_path):
    """seaborn draws its CI bands by bootstrap: a fixed seed keeps reruns' figures identical."""
    from steer_utils.experiments import plots

    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {"coefficient": np.repeat([0.01, 0.02, 0.05], 20), "score": rng.random(60), "coherence": rng.random(60)}
    )
    first = plots.save_figure(plots.plot_eps_sweep(table), tmp_path / "a", "eps")
    second = plots.save_figure(plots.plot_eps_sweep(table), tmp_path / "b", "eps")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]

"""Baselines (notebook 05) and the cross-model tables (notebook 04), without the bundled models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from steer_utils import paths
from steer_utils.core import decoding, prompting, training, vectors
from steer_utils.experiments import baselines, data, evaluation, pipeline, profiles, scaling


def test_tuning_concepts_are_disjoint_from_the_reported_ones():
    reported = data.sample_concepts(3, seed=0)
    tuning = baselines.tuning_concepts(3, 2, seed=0)
    keys = ["concept_class", "concept"]
    assert len(tuning) == 2 * len(prompting.CLASSES)
    assert tuning.groupby("concept_class").size().eq(2).all()
    assert reported.merge(tuning[keys], on=keys).empty
    assert tuning.equals(baselines.tuning_concepts(3, 2, seed=0))
    with pytest.raises(ValueError, match="tune_concepts_per_class"):
        baselines.tuning_concepts(3, 0)


def test_best_sadi_grids_rank_by_tuning_score_with_ties_to_smaller_delta():
    rows = [
        ("sadi-head-last", k, d, s) for k, d, s in [(1, 5.0, 0), (1, 20.0, 1), (4, 5.0, 1), (4, 20.0, 1), (10, 80.0, 0)]
    ]
    scored = pd.DataFrame(rows, columns=["variant", "k", "delta", "score"])
    chosen = baselines.best_sadi_grids(scored, n_points=3)
    assert chosen == {"sadi-head-last": [(4, 5.0), (1, 20.0), (4, 20.0)]}
    table = baselines.tuning_table(scored, chosen)
    assert table.set_index(["k", "delta"]).eval_rank.to_dict() == {
        (1, 5.0): 0,
        (1, 20.0): 2,
        (4, 5.0): 1,
        (4, 20.0): 3,
        (10, 80.0): 0,
    }


@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_tuning_grid_covers_every_variant_and_point(name):
    profile = profiles.PROFILES[name]
    grid = baselines.tuning_grids(profile)
    assert set(grid) == set(baselines.SADI_VARIANTS)
    assert len(grid["sadi-head-last"]) == len(profile.sadi_head_ks) * len(profile.sadi_deltas)
    assert len(grid["sadi-hidden-all"]) == len(profile.sadi_hidden_ks) * len(profile.sadi_deltas)
    assert all(len(v) >= len(pipeline.COEFFICIENTS) for v in grid.values())  # enough points for SADI's eval grid
    assert (1, 1.0) in grid["sadi-hidden-last"] and all(isinstance(d, float) for _, d in grid["sadi-head-all"])
    assert set(baselines.COMPARED_METHODS) >= {"prompting", "mean_difference", "prior", "ours"}
    assert set(baselines.VECTOR_METHODS) <= set(vectors.METHODS) | {"prior"}  # one spelling per method


def test_ours_block_set_reads_notebook_03_or_checks_the_name(tmp_path, monkeypatch):
    monkeypatch.setattr(baselines.paths, "RESULTS_DIR", tmp_path)
    assert baselines.ours_block_set("m", "top-25%") == "top-25%"
    with pytest.raises(ValueError, match="Unknown block set 'bottom-25%'"):
        baselines.ours_block_set("m", "bottom-25%")
    with pytest.raises(FileNotFoundError, match="run notebook 03"):
        baselines.ours_block_set("m")
    table = pd.DataFrame(
        {
            "protocol": ["held_out"] * 4 + ["best_of_grid"],
            "concept_class": "all",
            "block_set": ["all", "top-25%", "top-50%", "bottom-25%", "top-50%"],
            "steerability": [0.1, 0.3, 0.2, 0.9, 1.0],
        }
    )
    (tmp_path / "m").mkdir(exist_ok=True)
    table.to_csv(tmp_path / "m" / "03_steerability.csv", index=False)
    assert baselines.ours_block_set("m") == "top-25%"  # bottom sets are never candidates; held-out protocol


def test_prompting_and_sadi_grids_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    model, tokenizer, _ = tiny
    questions = ["What do you see?", "Where are you?"]
    prompted = baselines.prompting_grid(model, tokenizer, "moods", "Cheerful", questions, max_new_tokens=3)
    assert list(prompted[pipeline.GRID_LABEL].unique()) == ["prompting"] and prompted.coefficient.eq(0).all()
    assert prompted.question.tolist() == questions  # the judge sees the question, not the prefix
    points = [(1, 5.0), (2, 20.0)]
    statements = ["The sea is calm.", "Cats sleep a lot."]
    masks = baselines.sadi_masks(model, tokenizer, "tiny", "moods", "Cheerful", statements, {"head": [1, 2, 2]})
    assert sorted(masks) == ["head"] and [int(m.sum()) for m in masks["head"].values()] == [1, 2]
    assert len(list(tmp_path.rglob("*.safetensors"))) == 2  # prefixed and plain recordings, cached
    again = baselines.sadi_masks(model, tokenizer, "tiny", "moods", "Cheerful", statements, {"head": [1, 2]})
    assert all(torch.equal(again["head"][k], masks["head"][k]) for k in (1, 2))
    grid = baselines.sadi_grid(
        model, tokenizer, "moods", "Cheerful", questions, "sadi-head-last", points, masks["head"], max_new_tokens=3
    )
    assert grid.coefficient.tolist() == [1, 1, 2, 2] and grid.k.tolist() == [1, 1, 2, 2]
    assert grid.delta.tolist() == [5.0, 5.0, 20.0, 20.0] and grid.question_id.tolist() == [0, 1, 0, 1]


def test_baseline_generations_name_the_method_and_keep_the_vector_setting(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    model, tokenizer, _ = tiny
    statements = ["The sea is calm.", "Cats sleep a lot.", "Rain fell all day.", "The bus was late."]
    context = pipeline.RunContext(model, tokenizer, "tiny", statements, {"moods": ["Hi?"]}, max_new_tokens=2)
    sample = pd.DataFrame({"concept_class": ["moods"], "concept": ["Cheerful"]})
    grids = {"sadi-head-last": [(1, 5.0)], "sadi-hidden-all": [(1, 1.0)]}
    table = baselines.baseline_generations(context, sample, "all", grids)
    methods = ["prompting", "mean_difference", "prior", "ours", "sadi-head-last", "sadi-hidden-all"]
    assert list(dict.fromkeys(table.method)) == methods and table.columns[2] == "method"
    assert table.groupby("method", sort=False).setting.first().tolist() == [
        "",
        "fixed-hard-mean_difference",
        "fixed-hard-rfm",
        training.OURS,
        "",
        "",
    ]
    assert table[table.method == "ours"].block_set.eq("all").all()
    steered = evaluation.concept_steerability(table.assign(score=0), compared="method")
    assert steered.method.tolist() == methods
    tuning = baselines.run_sadi(context, sample, grids)
    assert list(dict.fromkeys(tuning.variant)) == list(grids) and "setting" not in tuning
    controlled = baselines.with_controls(context, table)
    assert list(dict.fromkeys(controlled.method)) == [*methods, *pipeline.CONTROLS]
    random = controlled[controlled.method == pipeline.CONTROL_RANDOM]
    ours = table[table.method == "ours"]
    assert random.eps.tolist() == ours.eps.tolist() and random.blocks.tolist() == ours.blocks.tolist()


def results_tree(root, models_):
    for i, model in enumerate(models_):
        folder = root / model
        folder.mkdir(parents=True)
        pd.DataFrame(
            {
                "protocol": "best_of_grid",
                "setting": ["fixed-hard-rfm", "attention-soft-rfm", "attention-hard-rfm"],
                "concept_class": "all",
                "steerability": [0.1, 0.3 + i / 10, 0.2],
                "ci_low": 0.0,
                "ci_high": 1.0,
                "n_concepts": 2,
            }
        ).to_csv(folder / "01_steerability.csv", index=False)
        pd.DataFrame(
            {"block": range(4), "depth": [0, 1 / 3, 2 / 3, 1], "score": [0.0, 0.5, 1.0, 0.0], "score_fdr": 0.0}
        ).to_csv(folder / "03_enrichment.csv", index=False)


def test_collect_stacks_models_and_names_what_is_missing(tmp_path):
    results_tree(tmp_path, ["b-model", "a-model"])
    assert scaling.result_models(results_root=tmp_path) == ["a-model", "b-model"]
    table = scaling.collect("01_steerability.csv", results_root=tmp_path)
    assert table.columns[0] == "model" and table.model.unique().tolist() == ["a-model", "b-model"]
    compared = scaling.prior_vs_ours(table)
    assert compared[compared.model == "a-model"].setting.tolist() == [
        "fixed-hard-rfm",
        "attention-hard-rfm",
        "attention-soft-rfm",
    ]
    with pytest.raises(FileNotFoundError, match="run `make all MODELS=c-model`"):
        scaling.collect("01_steerability.csv", ["a-model", "c-model"], results_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="run `make all`"):
        scaling.collect("01_steerability.csv", results_root=tmp_path / "empty")


def test_collect_reads_a_protocol_variant_and_checks_the_training_protocol(tmp_path):
    results_tree(tmp_path, ["a-model", "b-model"])  # the adopted protocol's runs
    for model in ("a-model", "b-model"):
        results_tree(tmp_path / model, ["protocol-paper"])  # a run off it, in its subfolder
    (tmp_path / "b-model" / "protocol-paper" / "03_enrichment.csv").unlink()
    (tmp_path / "a-model" / "01_steerability.csv").unlink()
    assert scaling.result_models(results_root=tmp_path) == ["b-model"]
    assert scaling.result_models(results_root=tmp_path, variant="protocol-paper") == ["a-model", "b-model"]
    table = scaling.collect("01_steerability.csv", results_root=tmp_path, variant="protocol-paper")
    assert table.model.unique().tolist() == ["a-model", "b-model"] and len(table) == 6
    assert scaling.having("03_enrichment.csv", ["b-model", "a-model"], tmp_path, "protocol-paper") == ["a-model"]
    assert scaling.having("03_enrichment.csv", ["b-model", "a-model"], tmp_path) == ["b-model", "a-model"]
    with pytest.raises(FileNotFoundError, match="results/b-model/protocol-paper/03_enrichment.csv is missing"):
        scaling.collect("03_enrichment.csv", ["a-model", "b-model"], results_root=tmp_path, variant="protocol-paper")

    generations = pd.DataFrame({"model": ["a", "a", "b"], "protocol": ["contrast=3", "contrast=3", None]})
    scaling.check_training_protocol(generations[generations.model == "a"], "contrast=3")
    scaling.check_training_protocol(generations[generations.model == "b"], "paper")  # no protocol: the paper's
    scaling.check_training_protocol(pd.DataFrame({"model": ["c"]}), "paper")
    with pytest.raises(
        ValueError, match="results/b/ holds notebook 01 trained under protocol 'paper', not 'contrast=3'"
    ):
        scaling.check_training_protocol(generations, "contrast=3")
    with pytest.raises(ValueError, match="PROTOCOL=contrast=3"):
        scaling.check_training_protocol(generations, "paper")


def test_depth_profile_bins_normalised_depth(tmp_path):
    results_tree(tmp_path, ["m"])
    profile = scaling.depth_profile(scaling.collect("03_enrichment.csv", results_root=tmp_path), n_bins=2)
    assert profile.depth_bin.tolist() == [0.25, 0.75]
    assert profile.score.tolist() == [0.25, 0.5]  # blocks 0-1 | blocks 2-3 (depth 1 falls in the last bin)


def test_working_coefficients_count_the_smallest_scoring_eps():
    rows = [(c, q, s) for c, q, s in [(0.1, 0, 0), (0.2, 0, 1), (0.3, 0, 1), (0.1, 1, 1), (0.1, 2, 0), (0.2, 2, 0)]]
    generations = pd.DataFrame(rows, columns=["coefficient", "question_id", "score"]).assign(
        model="m", setting="attention-soft-rfm", concept_class="moods", concept="Cheerful"
    )
    table = scaling.working_coefficients(generations)
    assert table.set_index("coefficient").n_steered.to_dict() == {0.1: 1, 0.2: 1, 0.3: 0}
    assert table.share.sum() == 1.0 and table.n_pairs.eq(3).all()
    with pytest.raises(ValueError, match="No generations of setting"):
        scaling.working_coefficients(generations, setting="other")


def test_soft_label_gain_picks_the_hard_vs_soft_rows():
    paired = pd.DataFrame(
        {
            "model": "m",
            "protocol": "best_of_grid",
            "concept_class": "all",
            "setting_a": ["fixed-hard-rfm", "attention-hard-rfm"],
            "setting_b": ["attention-hard-rfm", "attention-soft-rfm"],
            "mean_a": [0.1, 0.2],
            "mean_b": [0.2, 0.5],
            "diff": [0.1, 0.3],
            "ci_low": 0.0,
            "ci_high": 0.5,
            "p_mcnemar": 0.5,
            "n_concepts": 4,
        }
    )
    gain = scaling.soft_label_gain(paired)
    assert len(gain) == 1 and gain["diff"].item() == 0.3 and gain["attention-soft-rfm"].item() == 0.5
    with pytest.raises(ValueError, match="rerun notebook 01"):
        scaling.soft_label_gain(paired.iloc[:1])


def test_baseline_methods_reuse_pipeline_settings():
    settings = [training.Setting.parse(name) for name in baselines.VECTOR_METHODS.values()]  # raises on a bad name
    assert [s.name for s in settings] == list(baselines.VECTOR_METHODS.values())
    assert {(s.selection, s.labels) for s in settings} == {("fixed", "hard")}  # the prior method's token and labels
    assert {s.method for s in settings} == {"mean_difference", "rfm"}


def test_responses_with_carriage_returns_survive_a_csv_round_trip(tmp_path):
    response = decoding.clean_response(" a\rb\r\nc\nUser: next turn")
    assert response == "a\nb\nc"
    table = pd.DataFrame({"concept_class": ["moods"], "response": [response]})
    table.to_csv(tmp_path / "t.csv", index=False)
    assert pd.read_csv(tmp_path / "t.csv", keep_default_na=False).equals(table)


def test_baseline_figure_has_a_bar_and_a_paired_panel_per_protocol():
    from steer_utils.experiments import plots

    methods = ["prompting", "prior", "ours"]
    table = pd.DataFrame(
        [(m, c, 0.2 * i, 0.1 * i, 0.3 * i) for i, m in enumerate(methods) for c in ["moods", "all"]],
        columns=["method", "concept_class", "steerability", "ci_low", "ci_high"],
    )
    comparisons = pd.DataFrame(
        [
            (p, "all", m, "ours", d, d - 0.1, d + 0.1, 0.5)
            for p in ["best_of_grid", "held_out"]
            for m, d in [("prompting", -0.4), ("prior", 0.2)]
        ],
        columns=["protocol", "concept_class", "method_a", "method_b", "diff", "ci_low", "ci_high", "p_mcnemar"],
    )
    fig = plots.plot_baselines({"best_of_grid": table, "held_out": table}, comparisons, methods, "m")
    bars, diffs = fig.axes[0], fig.axes[1]
    assert len(fig.axes) == 4 and bars.get_title() == "m: best-of-grid" and diffs.get_title() == "paired, best-of-grid"
    rows = {t.get_text(): t.get_position()[1] for t in diffs.get_yticklabels()}
    assert rows["prompting"] > rows["prior"]  # first comparison on top
    assert [t.get_text() for t in fig.legends[0].get_texts()] == methods
    assert diffs.get_xlabel() == "ours − method (steerability)"


def test_scaling_curve_orders_models_by_size_and_needs_their_sizes(tmp_path):
    results_tree(tmp_path, ["big", "small"])
    steerability = scaling.collect("01_steerability.csv", results_root=tmp_path)
    versions = pd.DataFrame(
        {"model": ["big", "big", "small"], "package": ["torch", "n_parameters", "n_parameters"],
         "version": ["2", "1500", "135"]}
    )  # fmt: skip
    curve = scaling.scaling_curve(steerability, scaling.model_sizes(versions))
    assert curve.model.unique().tolist() == ["small", "big"] and curve.n_parameters.unique().tolist() == [135, 1500]
    assert set(curve.setting) == {"fixed-hard-rfm", "attention-soft-rfm"}  # controls kept when a table has them
    with pytest.raises(ValueError, match=r"results/old/versions.csv .* rerun `make 01_token_selection MODELS=old`"):
        old = pd.DataFrame({"model": ["old"], "package": ["torch"], "version": "2"})
        scaling.model_sizes(pd.concat([versions, old]))
    marks = scaling.reference_marks()
    assert marks.set_index("concept_class").steerability["all"] == 0.49 and (marks.n_parameters > 1e9).all()


def test_paper_comparisons_read_each_notebooks_paired_tests_and_name_the_missing(tmp_path):
    paired = dict(concept_class="all", protocol="best_of_grid", mean_a=0.1, mean_b=0.3, diff=0.2, ci_low=0.0,
                  ci_high=0.4, p_mcnemar=0.5, n_concepts=4)  # fmt: skip
    folder = tmp_path / "m"
    folder.mkdir()
    pd.DataFrame(
        [dict(paired, setting_a="fixed-hard-rfm", setting_b="attention-hard-rfm"),
         dict(paired, setting_a="attention-hard-rfm", setting_b="attention-soft-rfm", diff=0.1),
         dict(paired, setting_a="attention-hard-rfm", setting_b="attention-soft-rfm", concept_class="moods")]
    ).to_csv(folder / "01_paired_tests.csv", index=False)  # fmt: skip
    pd.DataFrame([dict(paired, block_set_a="bottom-25%", block_set_b="top-25%", diff=-0.1)]).to_csv(
        folder / "03_paired_tests.csv", index=False
    )
    table = scaling.paper_comparisons(["m"], results_root=tmp_path).set_index("comparison")
    assert table.loc["soft vs hard labels", "diff"] == 0.1  # the all-classes row only
    assert table.loc["top vs bottom enrichment blocks", "diff"] == -0.1
    ran = table[table.missing == ""]
    assert len(ran) == 3 and set(table.index) == {name for name, *_ in scaling.COMPARISONS}
    assert (table[table.missing != ""].missing == "make 05_baselines MODELS=m").all()


def test_person_checked_counts_only_what_the_judge_and_a_person_both_call_on_concept():
    rows = []
    for concept_class, concept in (("places", "Paris"), ("moods", "calm")):
        for setting in ("attention-soft-rfm", "control-random"):
            for q in range(4):
                for c in (0.05, 0.1):
                    rows.append(dict(setting=setting, concept_class=concept_class, concept=concept, question_id=q,
                                     coefficient=c, response=f"{concept} {setting} {q} {c}", score=0))  # fmt: skip
    generations = pd.DataFrame(rows).assign(model="m")
    hit = lambda concept, q, c: generations.response == f"{concept} attention-soft-rfm {q} {c}"  # noqa: E731
    generations.loc[
        hit("Paris", 0, 0.05) | hit("Paris", 1, 0.1) | hit("Paris", 2, 0.05) | hit("calm", 0, 0.1), "score"
    ] = 1
    cases = pd.DataFrame(
        {"concept": ["Paris"] * 3 + ["calm"] * 2,
         "response": [f"Paris attention-soft-rfm {q} {c}" for q, c in ((0, 0.05), (1, 0.1), (2, 0.05))]
                     + ["calm attention-soft-rfm 0 0.1", "calm attention-soft-rfm 1 0.05"],
         "label": [1, 0, 1, 1, 1]}
    )  # fmt: skip
    checked = scaling.person_checked(generations, cases)
    assert checked.columns.tolist() == scaling.PERSON_CHECKED_COLUMNS
    table = checked.set_index(["protocol", "setting", "concept_class"])
    best, held = table.loc[("best_of_grid", "attention-soft-rfm")], table.loc[("held_out", "attention-soft-rfm")]
    assert best.judge["places"] == 0.75 and best.steerability["places"] == 0.5  # the person drops question 1
    assert best.judge["moods"] == 0.25 and best.steerability["moods"] == 0.25
    assert held.steerability["places"] == 0.5 and held.steerability["moods"] == 0  # eps chosen on questions 0-1
    assert best.loc["all", ["judge_positive", "labelled", "confirmed", "labelled_negative", "missed"]].tolist() == [
        4, 4, 3, 1, 1]  # fmt: skip
    assert table.loc[("best_of_grid", "control-random", "all"), "steerability"] == 0
    assert scaling.person_checked(generations, cases.assign(response="unseen")).empty


def test_confirmation_sheet_holds_every_judge_positive_and_a_seeded_draw_of_negatives():
    from steer_utils.experiments import judge_validation

    generations = pd.DataFrame(
        {"setting": ["fixed-hard-rfm"] + ["attention-soft-rfm"] * 6 + ["control-random", "fixed-hard-rfm"],
         "concept": list("aabcdefgh"), "response": ["r0"] + [f"r{i}" for i in range(8)],
         "score": [0, 1, 1, 0, 0, 0, 0, 1, 1]}
    )  # fmt: skip
    sheet = judge_validation.confirmation_sheet(generations, {"r1"}, "attention-soft-rfm", 2, seed=0)
    assert set(sheet.response) >= {"r0", "r6"} and "r1" not in set(sheet.response) and "r7" not in set(sheet.response)
    assert len(sheet) == 4 and (sheet[sheet.score == 0].setting == "attention-soft-rfm").all()  # r0: first elsewhere
    again = judge_validation.confirmation_sheet(generations, {"r1"}, "attention-soft-rfm", 2, seed=0)
    assert again.response.tolist() == sheet.response.tolist()


def test_confirm_sheet_writes_a_blind_sheet_and_its_key_apart(tmp_path, monkeypatch):
    from steer_utils.experiments import judge_validation

    folder = tmp_path / "m"
    folder.mkdir()
    pd.DataFrame(
        {"concept_class": "moods", "concept": ["a", "b"], "question": "q", "response": ["r0", "r1"],
         "setting": "attention-soft-rfm", "coefficient": 0.05, "embedding_score": [1, 0], "p_yes": [0.9, 0.1],
         "score": [1, 0]}
    ).to_csv(folder / "01_generations.csv", index=False)  # fmt: skip
    monkeypatch.setattr(judge_validation, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(judge_validation, "load_cases", lambda: pd.DataFrame({"response": ["seen"]}))
    judge_validation.confirm_sheet("m", 7, n_negatives=1, seed=0, out=tmp_path / "sheet.csv")
    sheet, key = pd.read_csv(tmp_path / "sheet.csv"), pd.read_csv(tmp_path / "sheet.key.csv")
    assert list(sheet.columns) == ["id", "concept_class", "concept", "question", "response"]  # no verdict shown
    assert sorted(sheet.id) == sorted(key.id) == ["r7-000", "r7-001"] and set(key.source) == {"confirmation"}
    assert {"score", "p_yes", "embedding_score", "setting"} <= set(key.columns)
    with pytest.raises(FileNotFoundError, match="make 01_token_selection MODELS=absent"):
        judge_validation.confirm_sheet("absent", 7, n_negatives=1, seed=0, out=tmp_path / "x.csv")


def test_scaling_curve_plot_draws_the_person_checked_points_beside_each_setting():
    import matplotlib.pyplot as plt

    from steer_utils.experiments import plots

    rows = [dict(model=m, n_parameters=n, setting=s, concept_class=c, steerability=0.2, ci_low=0.1, ci_high=0.3)
            for m, n in (("small", 1.35e8), ("big", 1.5e9)) for s in ("attention-soft-rfm", "control-random")
            for c in ("places", "all")]  # fmt: skip
    curve = pd.DataFrame(rows)
    checked = curve[curve.setting == "attention-soft-rfm"].assign(steerability=0.1)
    fig = plots.plot_scaling_curve(curve, scaling.reference_marks(), "t", checked)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "attention-soft-rfm, judge and a person agree" in labels and scaling.REFERENCE_LABEL in labels
    diamonds = [line for line in fig.axes[0].get_lines() if line.get_marker() == "D"]
    assert len(diamonds) == 1 and diamonds[0].get_ydata().tolist() == [0.1, 0.1]
    plt.close(fig)

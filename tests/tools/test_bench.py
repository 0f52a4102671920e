"""The benchmark's helpers (its numbers are measured by `make bench`, never asserted here)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from steer_utils.core import models
from steer_utils.core.protocol import default_blocks
from steer_utils.tools import bench


def test_linear_fit_reports_slope_and_exponent():
    slope, intercept, exponent = bench.linear_fit([16, 32, 64, 128], [1.6, 3.2, 6.4, 12.8])
    assert slope == pytest.approx(0.1) and intercept == pytest.approx(0.0, abs=1e-9)
    assert exponent == pytest.approx(1.0)
    assert bench.linear_fit([1, 2, 4, 8], [1, 4, 16, 64])[2] == pytest.approx(2.0)  # quadratic growth


def test_extraction_section_on_a_tiny_model(tiny_model_dir):
    model, tokenizer, _ = models.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    table = bench.Table()
    bench.bench_extraction(table, "tiny", model, tokenizer, n_statements=3)
    frame = table.frame().set_index("quantity")
    assert {"reference loop", "ours, same prompts", "speed-up, same prompts", "achieved"} <= set(frame.index)
    assert (frame.value > 0).all() and set(frame.section) == {"extraction"}


def test_loop_stopping_measures_saved_steps_and_exact_fills(tmp_path, monkeypatch):
    class Chars:  # one token per character
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

    folder = tmp_path / "some-model"
    folder.mkdir()
    responses = ["ab" * 25, "abcdefghij" * 5, "short", "xy" * 5 + "z" * 40]  # exact, exact, ended, diverges
    pd.DataFrame({"response": responses}).to_csv(folder / "01_generations.csv", index=False)
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    table = bench.Table()
    bench.bench_loop_stopping(table, "some-model", Chars())
    values = table.frame().set_index("quantity").value
    assert values["rows that loop"] == 75 and values["row-steps saved"] == pytest.approx(100 * (44 + 20 + 44) / 200)
    assert values["cycle fill = generated text"] == pytest.approx(200 / 3)
    bench.bench_loop_stopping(table, "no-such-model", Chars())  # no notebook 01 results: nothing measured
    assert len(table.frame()) == 3


def test_loop_stopping_rescores_the_filled_text_of_rows_that_diverge(tmp_path, monkeypatch):
    class Chars:
        def __call__(self, text, add_special_tokens=False):
            return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()

        def decode(self, ids):
            return "".join(map(chr, ids))

    class Grader:  # scores 1 for text holding a 'z'
        def score_table(self, concept_class, concepts, questions, responses):
            seen.extend(responses)
            return pd.DataFrame({"score": [int("z" in r) for r in responses]})

    seen = []
    folder = tmp_path / "m"
    folder.mkdir()
    pd.DataFrame(
        {
            "concept_class": "moods",
            "concept": "Calm",
            "question": "Q?",
            "score": [0, 1, 0],
            "response": ["ab" * 25, "xy" * 5 + "z" * 40, "pq" * 5 + "r" * 40],
        }
    ).to_csv(folder / "01_generations.csv", index=False)
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    table = bench.Table()
    bench.bench_loop_stopping(table, "m", Chars(), Grader())
    assert seen == ["xy" * 25, "pq" * 25]  # only the rows whose fill differs are rescored
    assert table.frame().set_index("quantity").value["equal judge scores"] == pytest.approx(200 / 3)


def test_notebook_times_read_papermill_metadata(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "some-model"
    folder.mkdir(parents=True)
    meta = {"papermill": {"duration": 90.0, "parameters": {"profile": "default"}, "end_time": "2026-11-21T09:00"}}
    (folder / "01_token_selection.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    (folder / "01_token_selection-protocol-paper.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    table = bench.Table()
    assert bench.notebook_times(table, "some-model") == {"01_token_selection": 1.5}
    assert table.frame().quantity.tolist() == ["01_token_selection", "total"]


def test_bf16_section_on_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """With native bf16 (forced here on any CPU) the section measures speed and agreement; without it, one row."""
    from steer_utils import paths
    from steer_utils.experiments import judge

    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    table = bench.Table()
    bench.bench_bf16(table, str(tiny_model_dir), None, "cpu")
    assert table.frame().quantity.tolist() == ["skipped"] and "no native bf16" in table.frame().note[0]
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    table = bench.Table()
    bench.bench_bf16(table, str(tiny_model_dir), judge.load_judge("embedding"), "cpu", n_statements=4, max_new_tokens=3)
    frame = table.frame().set_index("quantity")
    assert {
        "extract, bfloat16",
        "generate: speed-up of bf16",
        "identical responses",
        "steerability bf16 - fp32",
    } <= set(frame.index)
    assert 0 <= frame.value["identical responses"] <= 100 and 0 <= frame.value["equal judge scores"] <= 100
    assert frame.value["steerability bf16 - fp32"] == pytest.approx(
        frame.value["steerability bf16"] - frame.value["steerability fp32"]
    )
    assert "5 concepts" in frame.note["identical responses"]
    assert len(list(tmp_path.rglob("*.vector.safetensors"))) == 2 * 5, "fp32 and bf16 cached under their own keys"


def test_generation_section_on_a_tiny_model(sharp_model_dir):
    from steer_utils.core import vectors

    model, tokenizer, info = models.load_model(str(sharp_model_dir), dtype="float32", device="cpu")
    unit = torch.nn.functional.normalize(torch.arange(info.hidden_size, dtype=torch.float32), dim=0)
    arms = {
        "a": vectors.ConceptVector(
            dict.fromkeys(range(info.n_blocks), unit), dict.fromkeys(range(info.n_blocks), 20.0)
        ),
        "b": vectors.ConceptVector(
            dict.fromkeys(range(info.n_blocks), -unit), dict.fromkeys(range(info.n_blocks), 20.0)
        ),
    }
    table = bench.Table()
    bench.bench_generation(
        table,
        "tiny",
        model,
        tokenizer,
        arms,
        ["Hi there.", "Why?"],
        default_blocks(info.n_blocks),
        max_new_tokens=6,
    )
    frame = table.frame().set_index("quantity")
    assert frame.value["identical responses"] == 100
    assert frame.value["speed-up"] > 0 and frame.value["ours (decoding.generate)"] > 0
    parts = frame[frame.section == "generation breakdown"].value
    assert (parts.drop("other (norms, MLP activation, hooks, Python)") >= 0).all()
    assert (parts[["prefill", "decode", "lm head", "block linears", "attention core"]] > 0).all()
    assert parts["prefill"] + parts["decode"] + parts["outside the forward passes"] == pytest.approx(100)
    assert parts[["lm head", "block linears", "attention core"]].sum() <= parts["decode"] + 1e-6
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # the timers are removed


def test_stage_section_under_the_adopted_protocol_with_the_rfm_cap(tiny_model_dir, monkeypatch):
    model, tokenizer, _ = models.load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    monkeypatch.setattr(bench.vectors, "RFM_MAX_EXAMPLES", 12)  # 2 statements x (2 + 3 contrast) = 10, 4 -> 20
    monkeypatch.setattr(bench, "bench_generation", lambda *a, **k: (["q"], ["r"], 1.0))
    grader = type("Grader", (), {"score_table": lambda self, *a: None})()
    table = bench.Table()
    costs = bench.bench_stages(table, "tiny", model, tokenizer, (2, 4), grader)
    assert costs["examples"] == [10, 20]
    frame = table.frame()
    assert set(frame[frame.section == "stage vs statements"].quantity) == {
        "extract (prefixed + contrast prompts)",
        "fit one setting, all blocks",
        "enrichment test",
    }
    cap = frame[frame.section == "rfm cap"].set_index("quantity").value
    assert {"fit, uncapped", "fit, capped at 12", "|cosine| capped vs uncapped"} <= set(cap.index)
    assert 0 <= cap["|cosine| capped vs uncapped"] <= 1 + 1e-6
    bench.project_full(table, "tiny", costs)
    assert "the measured capped fit" in table.frame().query("section == 'projection'").note.iloc[0]


def test_notebook_01_projection_counts_the_controls_and_the_gated_llm_judge():
    costs = {"counts": (16, 64), "examples": [80, 320], "extract": [1.0, 4.0], "fit": [1.0, 4.0]}
    costs |= {"generate": 60.0, "judge": 6.0}  # 1 s and 0.1 s per row of the timed 60-row grid
    table = bench.Table()
    bench.project_notebook_01(table, "tiny", costs, "compact", judge_seconds=2.0, gate_share=0.5)
    row = table.frame().iloc[0]
    # 85 rows = (3 settings + the random control) x 4 eps x 5 questions + 5 unsteered answers; per concept:
    # extract 4 s + 3 fits x 4 s + 85 x 1 s + 85 x (0.1 s + 0.5 x 2 s) = 194.5 s, for 50 concepts
    assert row.quantity == "01 compact profile" and row.unit == "min"
    assert row.value == pytest.approx(50 * 194.5 / 60, rel=1e-3)
    assert "generate 85 rows" in row.note and "50% its gate passes" in row.note


def test_no_judge_agreement_reaches_the_run_and_names_the_output(tmp_path, monkeypatch):
    calls = []
    frame = pd.DataFrame({"section": ["peak"], "model": ["cpu"], "quantity": ["q"], "value": [1.0], "unit": [""]})
    monkeypatch.setattr(bench, "run", lambda *args: calls.append(args) or frame.assign(note=""))
    monkeypatch.setattr(bench, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench, "plot", lambda frame: None)
    monkeypatch.setattr(bench.plots, "save_figure", lambda fig, folder, name: None)
    bench.main(["--models", "tiny", "--out", "bench-tiny", "--no-judge-agreement"])
    bench.main(["--models", "tiny", "--out", "bench-tiny"])
    assert [args[-1] for args in calls] == [False, True]  # judge_agreement, off then on by default
    assert (tmp_path / "bench-tiny.csv").is_file()


def test_peak_rss_script_binds_every_name_it_uses():
    """The fresh process's script is a string, so no import check sees it: every name it reads must be imported,
    assigned or a builtin, and every module it imports must exist."""
    import ast
    import builtins
    import importlib

    tree = ast.parse(bench._RSS_SCRIPT)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}")
                bound.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert read <= bound, read - bound


def test_judge_against_native_compares_both_paths_with_the_committed_p_yes(tmp_path, monkeypatch):
    """Without bf16 instructions, the judge's bf16 (linear layers summed in fp32) and fp32 P(yes) are set beside the
    P(yes) a native-bf16 CPU committed: here a tiny judge 'committed' its own native bf16 values, so bf16 differs
    from them only by the order of sums and fp32 by more; nothing is compared when the committed run was not native."""
    from steer_utils.experiments import judge
    from steer_utils.experiments.llm_judge import Calibration, LLMJudge
    from tests.experiments.test_llm_judge import CASES, _NoEmbedding, save_tiny_judge

    folder = tmp_path / "some-model"
    folder.mkdir()
    model_dir = save_tiny_judge(tmp_path / "judge")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    native = LLMJudge("tiny", _NoEmbedding(), loaded=models.load_model(str(model_dir), "bfloat16", "cpu")[:2])
    concepts, questions, responses = zip(*CASES)
    stored = pd.DataFrame(
        {"concept_class": "places", "concept": concepts, "question": questions, "response": responses}
    )
    stored["p_yes"] = native.p_yes("places", concepts, questions, responses)
    stored.to_csv(folder / "01_generations.csv", index=False)
    (folder / "versions.csv").write_text("package,version\ncpu,Some CPU (native bf16)\n")
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    loaded = []

    def load_tiny(name, dtype, calibration):
        loaded.append(dtype)
        return LLMJudge("tiny", _NoEmbedding(), calibration, loaded=models.load_model(str(model_dir), dtype, "cpu")[:2])

    monkeypatch.setattr(judge, "load_judge", load_tiny)
    table = bench.Table()
    committed = folder / "01_generations.csv"
    bench.bench_judge_against_native(table, per_class=len(CASES), committed=committed, rule=Calibration())
    assert loaded == ["bfloat16", "float32"]
    frame = table.frame()
    change = frame[frame.quantity == "vs native bf16: max |P(yes) change|"].set_index("note").value
    widened, fp32 = change.iloc[0], change.iloc[1]
    assert widened < 0.05 and widened <= fp32
    assert frame[frame.quantity == "vs native bf16: equal verdicts"].value.between(0, 100).all()
    (folder / "versions.csv").write_text("package,version\ncpu,Some CPU (no native bf16)\n")
    before = len(table.frame())
    bench.bench_judge_against_native(table, committed=committed, rule=Calibration())
    assert len(table.frame()) == before

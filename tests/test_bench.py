"""The benchmark's helpers (its numbers are measured by `make bench`, never asserted here)."""
from __future__ import annotations

import json

import pytest

from steer_utils import bench, models


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


def test_notebook_times_read_papermill_metadata(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "some-model"
    folder.mkdir(parents=True)
    meta = {"papermill": {"duration": 90.0, "parameters": {"profile": "default"}, "end_time": "2026-11-21T09:00"}}
    (folder / "01_token_selection.ipynb").write_text(json.dumps({"metadata": meta, "cells": []}))
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    table = bench.Table()
    assert bench.notebook_times(table, "some-model") == {"01_token_selection": 1.5}
    assert table.frame().quantity.tolist() == ["01_token_selection", "total"]

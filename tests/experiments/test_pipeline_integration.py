"""The whole pipeline on the bundled SmolLM2 for two concepts: activations, vectors, steered grid, judge, stats."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from steer_utils import paths
from steer_utils.core import models, training, vectors
from steer_utils.experiments import data, evaluation, judge, pipeline
from tests.experiments.test_pipeline_units import assert_fast_path_matches_reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 in fp32, the precision every tolerance below is stated for (bf16: tests/core/test_precision.py)."""
    return models.load_model("smollm2-135m", dtype="float32")


def test_two_concepts_end_to_end(smollm2, tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setattr(paths, "CACHE_DIR", folder)
    model, tokenizer, info = smollm2
    sample = pd.DataFrame({"concept_class": ["moods", "places"], "concept": ["Cheerful", "Paris"]})
    statements = data.load_statements(n=6)
    questions = {k: v[:2] for k, v in data.load_questions().items()}
    names = ["fixed-hard-rfm", "attention-soft-rfm"]
    context = pipeline.RunContext(model, tokenizer, "smollm2-135m", statements, questions, max_new_tokens=8)
    scored, fits = pipeline.judged_run(context, sample, names, judge.load_judge("embedding"), coefficients=(0.0, 0.03))
    assert len(scored) == 2 * 2 * 2 * 2 and set(scored.score) <= {0, 1}
    assert {"relevance", "coherence", "answers_question", "reason"} <= set(scored.columns)
    unsteered = scored[scored.coefficient == 0.0]
    assert unsteered.groupby(["concept", "question_id"]).response.nunique().eq(1).all()  # eps 0: same text
    assert len(fits) == 2 * 2 * (info.n_blocks)
    assert (fits[fits.setting == "fixed-hard-rfm"].selected == 5).all()  # SmolLM2's tail has 6 tokens
    assert fits.val_corr.between(0, 1).all()
    saved = sorted(folder.rglob("*.vector.safetensors"))
    assert len(saved) == 4
    vector = vectors.ConceptVector.load(saved[0])
    assert {"model", "concept", "method", "token_selection", "labels"} <= set(vector.metadata)
    assert len(vector.directions) == info.n_blocks and vector.metadata["model"] == "smollm2-135m"
    table = evaluation.steerability_table(evaluation.concept_steerability(scored))
    assert table.steerability.between(0, 1).all()
    # A second run is served from the cache: same rows, no extraction and no generation.
    monkeypatch.setattr(pipeline, "concept_activations", lambda *a, **k: pytest.fail("recomputed activations"))
    cached, _ = pipeline.run_concepts(
        context, sample, [training.Setting.parse(s) for s in names], coefficients=(0.0, 0.03)
    )
    pd.testing.assert_frame_equal(cached, scored[cached.columns].astype(cached.dtypes.to_dict()))


def test_attention_selection_differs_from_fixed_on_a_real_model(smollm2, tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    model, tokenizer, _ = smollm2
    acts = pipeline.concept_activations(model, tokenizer, "smollm2-135m", "fears", "Heights", data.load_statements(n=8))
    assert acts.tail == ["<|im_end|>", "\\n", "<|im_start|>", "ass", "istant", "\\n"]
    attention = training.training_set(acts, training.Setting.parse("attention-soft-rfm"))
    fixed = training.training_set(acts, training.Setting.parse("fixed-hard-rfm"))
    assert (attention[3] != fixed[3]).any()  # some block reads a different tail token
    soft = attention[1][: len(acts.prefixed.hidden)]
    assert soft.max() == 1 and not torch.isnan(soft).any() and soft.std(0).mean() > 0  # heterogeneous labels


def test_fast_extraction_matches_the_reference_loop_on_smollm2(smollm2):
    model, tokenizer, _ = smollm2
    assert_fast_path_matches_reference(model, tokenizer, "places", "Paris", data.load_statements(n=16), batch_size=8)


def test_fast_extraction_matches_the_reference_loop_on_qwen():
    """Qwen's template (a default system turn, ChatML) goes through the same code as the other models'."""
    model, tokenizer, _ = models.load_model("qwen2.5-coder-0.5b", dtype="float32")
    assert_fast_path_matches_reference(model, tokenizer, "moods", "Cheerful", data.load_statements(n=8), batch_size=4)

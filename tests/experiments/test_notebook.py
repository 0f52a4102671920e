"""`notebook.start`: a notebook's setup in one call."""

import pytest

from steer_utils import paths
from steer_utils.core.protocol import ADOPTED, PAPER
from steer_utils.experiments import notebook, pipeline, window


@pytest.fixture()
def outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(paths, "FIGURES_DIR", tmp_path / "figures")
    return tmp_path


def test_start_checks_parameters_and_applies_profile_overrides(outputs):
    run = notebook.start(model="org/m", profile="smoke", n_statements=8, window_concepts_per_class=2, seed=3)
    assert (run.profile.name, run.profile.n_statements, run.profile.window_concepts_per_class) == ("smoke", 8, 2)
    assert run.profile.n_questions == 4 and run.protocol == ADOPTED and run.variant == ""
    assert run.out_dir == outputs / "results" / "org--m" and run.out_dir.is_dir() and run.fig_dir.is_dir()
    assert (run.seed, run.stop_loops) == (3, True)
    with pytest.raises(ValueError, match="n_statements"):
        notebook.start(model="m", profile="smoke", n_statements="8")


def test_start_writes_a_run_off_the_adopted_protocol_and_a_shard_apart(outputs):
    run = notebook.start(model="m", profile="smoke", steering_protocol="paper", shard_index=1, num_shards=2)
    assert run.protocol == PAPER and run.variant == "protocol-paper"
    assert run.out_dir == outputs / "results" / "m" / "protocol-paper" / "shards" / "1-of-2"


def test_the_run_context_steers_over_the_models_window(outputs, monkeypatch, tiny):
    model, tokenizer, _ = tiny
    monkeypatch.setitem(window.WINDOWS, "m", (0.01, 0.02, 0.03, 0.05))
    context = notebook.start(model="m", profile="smoke", stop_loops=False).context(model, tokenizer, ["s"], {})
    assert context.coefficients == (0.01, 0.02, 0.03, 0.05) and context.max_new_tokens == 16
    assert not context.stop_loops and context.model_name == "m"
    other = notebook.start(model="other", profile="smoke").context(model, tokenizer, ["s"], {})
    assert other.coefficients == pipeline.COEFFICIENTS

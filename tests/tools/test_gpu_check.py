"""`make gpu-check` run with the CPU on both sides: every comparison must come out exact."""

from __future__ import annotations

import pytest
import torch

from steer_utils.experiments import profiles
from steer_utils.experiments.data import sample_concepts
from steer_utils.tools import gpu_check


def test_cpu_against_itself_agrees_exactly(sharp_model_dir, capsys):
    profile = profiles.PROFILES["smoke"]
    sample = sample_concepts(1, seed=0).head(2)
    name = str(sharp_model_dir)
    reference = gpu_check.run_device(name, "cpu", "float32", sample, None, profile)
    again = gpu_check.run_device(name, "cpu", "float32", sample, reference.vectors, profile)
    values = dict(gpu_check.checks(name, reference, again, llm_judge=False))
    assert values["vector cosine, smallest block"] == pytest.approx(1.0, abs=1e-6)
    assert values["steered grid: identical responses"] == 1.0
    assert values["prompting baseline: identical responses"] == 1.0
    assert values["embedding judge: equal verdicts"] == 1.0
    assert len(reference.vectors) == 2 * len(sample)  # ours and the mean-difference baseline per concept
    failing = {**values, "vector cosine, smallest block": 0.5}
    assert not gpu_check.report(name, list(failing.items()))
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_to_run_without_a_gpu(capsys):
    assert gpu_check.main(["--models", "smollm2-135m"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out

"""`make gpu-check`: the CUDA path against the CPU on the smoke profile, one line per check, exit status 1 on a failure.

For each model, on one machine: the concept vectors of notebook 01's smoke sample (attention-soft-rfm, adopted
protocol) and notebook 05's mean-difference baseline, trained in bf16 on the GPU and in fp32 on the CPU (their cosine,
block by block); the steered grid of each concept and 05's prompting baseline generated on both devices with the CPU's
vectors, so only the device differs (identical responses, a share; the verdicts of the embedding judge on both sets);
that steering moves the GPU's text at all; and, with `--llm-judge`, the LLM judge's verdicts on the CPU's responses in
bf16 on the GPU against fp32 on the CPU. SADI is not covered.

Needs a CUDA GPU and the project installed there with its bundled models (`make install`): the models do not fit the
64 MiB a lent device machine receives, so this runs where the project is installed. A few minutes per model on one
GPU. The bounds (`BOUNDS`) are set before any GPU run, from what bf16 is known to do (hidden states change by about
1e-2 relative, so greedy texts of the two devices part on some rows); a run that misses one says which and by how much.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..core import models, training
from ..core.protocol import ADOPTED
from ..core.vectors import ConceptVector
from ..experiments import baselines, data, judge, pipeline, profiles
from ..experiments.llm_judge import Calibration
from ..paths import JUDGE_CALIBRATION_FILE

# check -> the smallest value that passes (None: reported, never fails).
BOUNDS = {
    "vector cosine, median over concepts and blocks": 0.98,
    "vector cosine, smallest block": 0.90,
    "steered grid: identical responses": None,
    "prompting baseline: identical responses": None,
    "embedding judge: equal verdicts": 0.85,
    "steering changes the GPU's text": 0.5,
    "LLM judge: equal verdicts, bf16 GPU vs fp32 CPU": 0.90,
}


@dataclass
class DeviceRun:
    """What one device computed for the sample."""

    vectors: dict[tuple[str, str, str], ConceptVector]  # (class, concept, setting) -> vector
    grid: pd.DataFrame  # steered grid rows (CPU vectors), with `response`
    prompting: pd.DataFrame  # the prompting baseline's rows


def run_device(
    name: str, device: str, dtype: str, sample: pd.DataFrame, steer_with: dict | None, profile: profiles.Profile
) -> DeviceRun:
    """Train the sample's vectors on `device` and generate its grids steered by `steer_with` (None: its own)."""
    model, tokenizer, _ = models.load_model(name, dtype=dtype, device=device)
    statements = data.load_statements(n=profile.n_statements)
    questions = {k: v[: profile.n_questions] for k, v in data.load_questions().items()}
    settings = (training.OURS, baselines.VECTOR_METHODS["mean_difference"])
    trained, grids, prompted = {}, [], []
    blocks, multiplier = ADOPTED.steered_blocks(len(training.find_blocks(model)))
    for row in sample.itertuples():
        contrast = pipeline.contrast_concepts(row.concept_class, row.concept, ADOPTED)
        acts = training.concept_activations(
            model, tokenizer, row.concept_class, row.concept, statements, ADOPTED, contrast
        )
        for setting in settings:
            trained[row.concept_class, row.concept, setting] = training.fit(
                acts, training.Setting.parse(setting), name
            )[0]
        vector = (steer_with or trained)[row.concept_class, row.concept, training.OURS]
        grid = pipeline.generate_grid(
            model,
            tokenizer,
            {training.OURS: vector.scaled(ADOPTED.scaling, blocks)},
            questions[row.concept_class],
            (0.0, *pipeline.COEFFICIENTS),
            blocks,
            profile.max_new_tokens,
            {training.OURS: multiplier},
            ADOPTED,
        )
        grids.append(grid.assign(concept_class=row.concept_class, concept=row.concept))
        prompted.append(
            baselines.prompting_grid(
                model, tokenizer, row.concept_class, row.concept, questions[row.concept_class], profile.max_new_tokens
            )
        )
    del model
    return DeviceRun(trained, pd.concat(grids, ignore_index=True), pd.concat(prompted, ignore_index=True))


def cosines(a: dict, b: dict) -> np.ndarray:
    """Cosine of each (vector, block) pair the two runs share."""
    return np.array(
        [
            float(torch.nn.functional.cosine_similarity(a[k].directions[blk].float(), b[k].directions[blk].float(), 0))
            for k in a
            for blk in a[k].directions
        ]
    )


def checks(name: str, reference: DeviceRun, accelerated: DeviceRun, llm_judge: bool) -> list[tuple[str, float]]:
    """(check, value) for one model: `reference` from the CPU, `accelerated` from the GPU steered by its vectors."""
    cos = cosines(reference.vectors, accelerated.vectors)
    same_grid = reference.grid.response.to_numpy() == accelerated.grid.response.to_numpy()
    same_prompting = reference.prompting.response.to_numpy() == accelerated.prompting.response.to_numpy()
    embedding = judge.load_judge("embedding")
    verdicts = [judge.score_generations(embedding, run.grid).score.to_numpy() for run in (reference, accelerated)]
    steered = accelerated.grid[accelerated.grid.coefficient == max(pipeline.COEFFICIENTS)]
    unsteered = accelerated.grid[accelerated.grid.coefficient == 0.0]
    moved = steered.response.to_numpy() != unsteered.response.to_numpy()  # same concepts and questions, in order
    values = [
        ("vector cosine, median over concepts and blocks", float(np.median(cos))),
        ("vector cosine, smallest block", float(cos.min())),
        ("steered grid: identical responses", float(same_grid.mean())),
        ("prompting baseline: identical responses", float(same_prompting.mean())),
        ("embedding judge: equal verdicts", float((verdicts[0] == verdicts[1]).mean())),
        ("steering changes the GPU's text", float(moved.mean())),
    ]
    if llm_judge:  # one verdict rule for both precisions: the committed one
        rule = Calibration.load(JUDGE_CALIBRATION_FILE)
        grids = [
            judge.score_generations(
                judge.load_judge("llm", dtype=dtype, device=device, calibration=rule), reference.grid
            ).score.to_numpy()
            for dtype, device in (("float32", "cpu"), ("bfloat16", "cuda"))
        ]
        values.append(("LLM judge: equal verdicts, bf16 GPU vs fp32 CPU", float((grids[0] == grids[1]).mean())))
    return values


def report(name: str, values: list[tuple[str, float]]) -> bool:
    """Print one line per check; True if all pass."""
    passed = True
    for check, value in values:
        bound = BOUNDS[check]
        ok = bound is None or value >= bound
        passed &= ok
        verdict = "INFO" if bound is None else ("PASS" if ok else "FAIL")
        print(f"{verdict:4}  {name:16}  {check:50}  {value:6.3f}" + ("" if bound is None else f"  (>= {bound})"))
    return passed


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m steer_utils.tools.gpu_check [--models ...] [--llm-judge]."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--llm-judge", action="store_true", help="also compare the LLM judge's verdicts")
    parser.add_argument("--device", default="cuda", help="the accelerated device (cpu only to test this script)")
    parser.add_argument("--dtype", default="bfloat16", help="its precision")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); run it on a GPU machine.")
        return 2
    profile = profiles.PROFILES["smoke"]
    sample = data.sample_concepts(profile.n_concepts_per_class, seed=0)
    passed = True
    for name in args.models:
        reference = run_device(name, "cpu", "float32", sample, None, profile)
        accelerated = run_device(name, args.device, args.dtype, sample, reference.vectors, profile)
        passed &= report(name, checks(name, reference, accelerated, args.llm_judge))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Notebook 07: each model's working window of eps, found on the development split only.

A model steers inside a range of eps: below it the answer ignores the vector, above it the text breaks into loops or
another language. The range differs per model (the residual stream's scale, its few very large dimensions, its
training), so one grid for every model compares them at different strengths. Here the adopted protocol's vector
(`training.OURS`) of every development concept is generated over a wide grid (`Profile.window_coefficients`) beside
both negative controls; every `WINDOW_SIZE` consecutive points of it are a candidate window, scored from the same
generations; the chosen one is recorded per model in `WINDOWS`, and notebooks 01-05 steer over
`coefficient_window(model)`.

Language drift is counted both ways: a response whose letters are mostly outside the Latin script answers the
English question in another language; `window_table` reports steerability counting it (the judge's verdict as is)
and not counting it, and the choice uses the stricter count.
"""

from __future__ import annotations

import unicodedata

import pandas as pd
import torch

from ..core.training import OURS, Setting
from . import judge, llm_judge, pipeline, study
from .profiles import PROFILES

WINDOW_SIZE = 4  # points per window: notebook 01's grid has 4
WIDE_GRID = PROFILES["default"].window_coefficients
FOREIGN_SCRIPT = 0.5  # a response whose letters are more than this share non-Latin is in another language
COUNTINGS = ("any language", "question's language")  # how an on-concept answer in another language counts
# The chosen window per model: `choose_window` of results/<model>/07_window.csv (a test checks they agree). A model
# not listed steers over notebook 01's grid, `pipeline.COEFFICIENTS`.
WINDOWS: dict[str, tuple[float, ...]] = {
    # default profile, 20 development concepts (2026-12-06): held-out 0.05 ties the window 0.025-0.075, best-of-grid
    # 0.14 against 0.12; its random control 0.00 held-out. The text breaks above 0.05 (coherent 0.89 -> 0.43 -> 0.19).
    "qwen2.5-coder-0.5b": (0.035, 0.05, 0.075, 0.1),
    # compact profile, 10 development concepts (2026-12-07): held-out 0.10 ties the window 0.025-0.075, best-of-grid
    # 0.26 against 0.24; its random control 0.00. The text breaks above 0.05 (coherent 0.84 -> 0.34 -> 0.04).
    "qwen2.5-coder-1.5b": (0.035, 0.05, 0.075, 0.1),
    # default profile, 20 development concepts (2026-12-07): held-out 0.067 ties the window 0.035-0.1, best-of-grid
    # 0.09 against 0.08 (notebook 01's grid: 0.033 and 0.10); its random control 0.00. The text breaks above 0.025
    # (coherent 0.84 -> 0.60 -> 0.35). Small numbers: 3 to 6 of 100 answers on-concept at any one eps.
    "smollm2-135m": (0.025, 0.035, 0.05, 0.075),
    # default profile, 20 development concepts, eps 0.0025-0.1 (2026-12-07): one on-concept answer in 1,000 (at
    # 0.025) decides it, held-out 0.017; every other window 0.00-0.01. The rule's pick, without signal on this model.
    "gemma3-270m": (0.025, 0.035, 0.05, 0.075),
}


def coefficient_window(model_name: str) -> tuple[float, ...]:
    """The eps grid notebooks 01-05 steer `model_name` over: its window from notebook 07, else notebook 01's grid."""
    return WINDOWS.get(model_name, pipeline.COEFFICIENTS)


def candidate_windows(grid, size: int = WINDOW_SIZE) -> dict[str, tuple[float, ...]]:
    """Every `size` consecutive points of the sorted grid, named by their ends ('0.015-0.05')."""
    points = sorted(float(c) for c in grid)
    if len(points) < size:
        raise ValueError(f"A window has {size} points but the grid has {len(points)}; give a wider grid.")
    windows = [tuple(points[i : i + size]) for i in range(len(points) - size + 1)]
    return {f"{w[0]:g}-{w[-1]:g}": w for w in windows}


def foreign_script_share(text: str) -> float:
    """The share of a text's letters outside the Latin script (0 for a text without letters). French or German
    count as Latin: this sees a switch to Chinese, Russian or Arabic, the drift steered models show."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(not unicodedata.name(ch, "").startswith("LATIN") for ch in letters) / len(letters)


def sweep(context: pipeline.RunContext, sample: pd.DataFrame, grader, coefficients=WIDE_GRID) -> pd.DataFrame:
    """The adopted vector of every concept and both controls over `coefficients`, judged; an `arm` column names
    each row's vector (setting or control), `coherent` marks the rows the judge's coherence gate keeps and
    `other_language` the answers in another script."""
    generations, _ = pipeline.run_concepts(context, sample, [Setting.parse(OURS)], coefficients=coefficients)
    generations = pipeline.with_controls(context, sample, generations, coefficients=coefficients)
    scored = judge.score_generations(grader, generations)
    other = scored.response.map(foreign_script_share) > FOREIGN_SCRIPT
    return scored.assign(
        arm=scored.setting, coherent=llm_judge.gate_mask(scored).astype(int), other_language=other.astype(int)
    )


def _counted(scored: pd.DataFrame) -> pd.DataFrame:
    """The scored rows twice, once per counting: as judged, and with answers in another language scored 0."""
    strict = scored.score * (1 - scored.other_language)
    return pd.concat(
        [scored.assign(counting=COUNTINGS[0]), scored.assign(counting=COUNTINGS[1], score=strict)], ignore_index=True
    )


def response_table(scored: pd.DataFrame) -> pd.DataFrame:
    """Per arm and eps: the judged share on-concept, the share kept by the judge's coherence gate and the share in
    another language (the unsteered control sits at eps 0)."""
    return (
        scored.groupby(["arm", "coefficient"], sort=False)
        .agg(
            on_concept=("score", "mean"),
            coherent=("coherent", "mean"),
            other_language=("other_language", "mean"),
            n=("score", "size"),
        )
        .reset_index()
    )


def window_table(scored: pd.DataFrame, size: int = WINDOW_SIZE, seed: int = 0) -> pd.DataFrame:
    """Each candidate window's steerability (both protocols, 95% CI over concepts), for the vector and the random
    control, counting answers in another language both ways; `coefficients` lists the window's points."""
    arms = [OURS, pipeline.CONTROL_RANDOM]
    windows = candidate_windows(set(scored.coefficient[scored.arm == OURS]), size)
    parts = [
        study.grid_table(rows, arms, windows, seed).assign(counting=counting)
        for counting, rows in _counted(scored[scored.arm.isin(arms)]).groupby("counting", sort=False)
    ]
    table = pd.concat(parts, ignore_index=True).rename(columns={"grid": "window"})
    table.insert(1, "coefficients", table.window.map(lambda w: " ".join(f"{c:g}" for c in windows[w])))
    return table


def choose_window(table: pd.DataFrame) -> tuple[float, ...]:
    """The window where the vector's held-out steerability, not counting answers in another language, is highest
    (ties: the higher best-of-grid, then the lower window)."""
    ours = table[(table.arm == OURS) & (table.counting == COUNTINGS[1])].set_index(["window", "protocol"])
    ranked = ours.steerability.unstack("protocol").join(ours.coefficients.groupby("window").first())
    ranked["first"] = ranked.coefficients.map(lambda text: float(text.split()[0]))
    ranked = ranked.sort_values(["held_out", "best_of_grid", "first"], ascending=[False, False, True], kind="stable")
    return tuple(float(c) for c in ranked.coefficients.iloc[0].split())


def norm_composition(hidden: torch.Tensor, top_k: int = 4) -> pd.DataFrame:
    """Per block: the median hidden-state norm (what 'block_norm' scaling multiplies eps by), the median norm
    without the `top_k` dimensions of largest mean |h| in that block, and their share of the squared norm.

    hidden: (n, n_blocks, n_tail, d), e.g. a concept's unprefixed activations. A few very large dimensions make the
    norm a measure of themselves, not of the directions a concept vector moves.
    """
    n, n_blocks, n_tail, d = hidden.shape
    states = hidden.transpose(0, 1).reshape(n_blocks, n * n_tail, d)  # (n_blocks, states, d)
    top = states.abs().mean(dim=1).topk(top_k, dim=-1).indices  # (n_blocks, top_k)
    squared = states.pow(2)
    top_squared = squared.gather(2, top[:, None, :].expand(-1, states.shape[1], -1)).sum(-1)  # (n_blocks, states)
    total = squared.sum(-1)
    return pd.DataFrame(
        {
            "block": range(n_blocks),
            "median_norm": total.sqrt().median(dim=1).values.numpy(),
            "median_norm_without_top": (total - top_squared).clamp(min=0).sqrt().median(dim=1).values.numpy(),
            "top_share": (top_squared / total.clamp(min=1e-12)).median(dim=1).values.numpy(),
            "top_dims": [",".join(map(str, row.tolist())) for row in top],
        }
    )

"""Steerability from judged generations, with bootstrap intervals and paired tests between settings.

Input: a tidy table of generations, one row per (setting, concept_class, concept, question_id,
coefficient), with a 0/1 judge `score`; extra columns are ignored. Two protocols:
- `best_of_grid` (the paper's): a question counts as steered if ANY coefficient of the grid scores 1.
  Picking the coefficient on the very question it is scored on flatters every method.
- `held_out`: per concept and setting, ONE coefficient is chosen on the select questions (highest mean
  score; ties by smallest |coefficient|, then smallest value) and scored on the remaining questions only.
Everything is deterministic: bootstraps take a seed, outputs are sorted (settings in order of first
appearance, classes in benchmark order, then concept and question).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from .data import CLASSES

GRID_COLUMNS = ("concept_class", "concept", "setting", "question_id", "coefficient", "score")
CONCEPT_KEYS = ("setting", "concept_class", "concept")
QUESTION_KEYS = (*CONCEPT_KEYS, "question_id")
PROTOCOLS = ("best_of_grid", "held_out")
ALL = "all"
DRAW_SUFFIX = r"-d\d+$"  # marks repeated random draws of one setting: 'random-25%-d0', 'random-25%-d1', ...


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing required column(s): {', '.join(missing)}.")
    if df.empty:
        raise ValueError(f"{what} has no rows.")
    keys = [c for c in columns if c in (*QUESTION_KEYS, "coefficient")]
    holes = [c for c in keys if df[c].isna().any()]
    if holes:
        raise ValueError(f"{what} has missing values in column(s): {', '.join(holes)}.")
    if "concept_class" in columns and (df.concept_class == ALL).any():
        raise ValueError(f"'{ALL}' is reserved for the overall rows and cannot be a concept_class.")


def _check_binary(values, name: str) -> np.ndarray:
    flat = pd.Series(np.asarray(values, dtype=object).ravel())
    bad = flat[~flat.isin([0, 1])]
    if len(bad):
        raise ValueError(f"{name} must hold only 0/1 values; found {sorted(set(bad.astype(str)))[:5]}.")
    return flat.to_numpy().astype(int)


def _grid(df: pd.DataFrame) -> pd.DataFrame:
    """A validated copy of a generations table: numeric coefficient, 0/1 int score, no duplicates."""
    _require(df, GRID_COLUMNS, "Generations table")
    out = df.copy()
    out["coefficient"] = pd.to_numeric(out.coefficient, errors="coerce")
    if out.coefficient.isna().any() or not np.isfinite(out.coefficient).all():
        raise ValueError("Column coefficient must hold finite numbers.")
    out["score"] = _check_binary(out.score.to_numpy(), "Column score")
    dup = out.duplicated([*QUESTION_KEYS, "coefficient"])
    if dup.any():
        first = out.loc[dup, [*QUESTION_KEYS, "coefficient"]].iloc[0].to_dict()
        raise ValueError(f"{int(dup.sum())} duplicated (concept, setting, question, coefficient) row(s), e.g. {first}.")
    return out


def _class_rank(s: pd.Series) -> pd.Series:
    known = {c: i for i, c in enumerate((*CLASSES, ALL))}
    extra = {c: len(known) + i for i, c in enumerate(sorted(set(s) - set(known), key=str))}
    return s.map({**known, **extra})


def _ordered_classes(values) -> list:
    """The distinct classes in `values`: benchmark order first, any others alphabetically."""
    uniq = pd.Series(pd.unique(pd.Series(values)))
    return list(uniq.iloc[np.argsort(_class_rank(uniq).to_numpy(), kind="stable")])


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` seeded resamples (with replacement) of `x`."""
    return x[np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)


def _sorted(out: pd.DataFrame, settings: Sequence, keys: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by setting (first appearance), class (benchmark order) and the remaining keys."""
    rank = {s: i for i, s in enumerate(pd.unique(pd.Series(list(settings))))}

    def key(col: pd.Series) -> pd.Series:
        if col.name == "setting":
            return col.map(rank)
        return _class_rank(col) if col.name == "concept_class" else col

    return out.sort_values(list(keys), key=key, kind="stable").reset_index(drop=True)


def best_of_grid(df: pd.DataFrame) -> pd.DataFrame:
    """Per question: `steered` if any coefficient scores 1, and the smallest-|c| scoring `best_coefficient`."""
    grid = _grid(df)
    keys = list(QUESTION_KEYS)
    grid = grid.assign(_abs=grid.coefficient.abs()).sort_values(["_abs", "coefficient"], kind="stable")
    steered = grid.groupby(keys, sort=False).score.max().rename("steered")
    best = grid[grid.score == 1].groupby(keys, sort=False).coefficient.first().rename("best_coefficient")
    out = steered.to_frame().join(best).reset_index()
    return _sorted(out, df.setting, keys)


def _held_out(grid: pd.DataFrame, select: Sequence) -> pd.DataFrame:
    keys = list(CONCEPT_KEYS)
    is_sel = grid.question_id.isin(select)
    means = grid[is_sel].groupby([*keys, "coefficient"]).score.mean().rename("_mean").reset_index()
    means["_abs"] = means.coefficient.abs()
    chosen = (
        means.sort_values(["_mean", "_abs", "coefficient"], ascending=[False, True, True], kind="stable")
        .groupby(keys, sort=False)
        .coefficient.first()
        .rename("chosen_coefficient")
    )
    concepts = grid[keys].drop_duplicates().set_index(keys).index
    no_select = concepts.difference(chosen.index)
    if len(no_select):
        raise ValueError(
            f"No select questions {tuple(select)} for {len(no_select)} concept(s), e.g. {list(no_select[:3])}."
        )
    rest = grid[~is_sel]
    n_rest = rest.groupby(keys).question_id.nunique().reindex(concepts, fill_value=0)
    too_few = n_rest[n_rest < 2]
    if len(too_few):
        raise ValueError(
            f"held_out needs at least 2 questions besides the select questions {tuple(select)}; "
            f"{len(too_few)} concept(s) have fewer, e.g. {list(too_few.index[:3])}."
        )
    at = rest.join(chosen, on=keys)
    at = at[at.coefficient == at.chosen_coefficient]
    out = at.groupby(keys).agg(
        steerability=("score", "mean"), steered_any=("score", "max"), n_questions=("question_id", "nunique")
    )
    short = out.n_questions.reindex(concepts, fill_value=0) < n_rest
    if short.any():
        raise ValueError(
            f"The chosen coefficient was not generated on every remaining question for "
            f"{int(short.sum())} concept(s), e.g. {list(short[short].index[:3])}; complete the grid."
        )
    return out.join(chosen).reset_index()


def concept_steerability(
    df: pd.DataFrame, protocol: str = "best_of_grid", select_questions: Sequence[int] = (0, 1)
) -> pd.DataFrame:
    """One row per (setting, concept_class, concept): `steerability`, `steered_any`, `n_questions`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol '{protocol}'; use one of: {', '.join(PROTOCOLS)}.")
    if protocol == "best_of_grid":
        out = (
            best_of_grid(df)
            .groupby(list(CONCEPT_KEYS))
            .agg(steerability=("steered", "mean"), steered_any=("steered", "max"), n_questions=("question_id", "size"))
            .reset_index()
        )
    else:
        select = list(select_questions)
        if not select:
            raise ValueError("select_questions must name at least one question for the held_out protocol.")
        out = _held_out(_grid(df), select)
    out["steered_any"] = out.steered_any.astype(int)
    out["n_questions"] = out.n_questions.astype(int)
    return _sorted(out, df.setting, CONCEPT_KEYS)


def bootstrap_ci(values, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean of `values`."""
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value.")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_ci values must be finite (no NaN or inf).")
    if not 0 < ci < 1 or n_boot < 1:
        raise ValueError(f"Need 0 < ci < 1 and n_boot >= 1, got ci={ci}, n_boot={n_boot}.")
    if np.ptp(x) == 0:  # constant: the value itself, exactly (x.mean() can round off)
        return float(x[0]), float(x[0]), float(x[0])
    mean = float(x.mean())
    boot = _boot_means(x, n_boot, seed)
    low, high = np.percentile(boot, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return mean, float(low), float(high)


def steerability_table(
    concept_df: pd.DataFrame, by: Sequence[str] = ("setting", "concept_class"), n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Mean steerability with a 95% bootstrap CI over concepts per group, plus an 'all'-classes row."""
    by = list(by)
    if "concept_class" not in by:
        raise ValueError(f"`by` must include 'concept_class' (the 'all' rows pool over it), got {by}.")
    _require(concept_df, [*by, "concept", "steerability"], "Concept table")
    outer = [k for k in by if k != "concept_class"]
    rows = []
    groups = concept_df.groupby(outer, sort=False) if outer else [((), concept_df)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        parts = [(c, g[g.concept_class == c]) for c in _ordered_classes(g.concept_class)]
        for cls, part in [*parts, (ALL, g)]:
            mean, low, high = bootstrap_ci(part.steerability, n_boot=n_boot, seed=seed)
            rows.append(
                {
                    **dict(zip(outer, key)),
                    "concept_class": cls,
                    "steerability": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "n_concepts": len(part),
                }
            )
    out = pd.DataFrame(rows)
    return out if "setting" not in outer else _sorted(out, concept_df.setting, ["setting"])


def mcnemar_exact(a, b) -> dict:
    """Exact McNemar test on paired 0/1 outcomes: n01 (a=0, b=1), n10 (a=1, b=0) and a two-sided p."""
    a, b = _check_binary(a, "a"), _check_binary(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned arrays of equal length, got {a.size} and {b.size}.")
    n01, n10 = int(((a == 0) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())
    p = stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
    return {"n01": n01, "n10": n10, "p_value": float(p)}


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Mean paired difference b - a, its percentile bootstrap CI and a two-sided bootstrap p-value.

    p = 2 * min(P*(d <= 0), P*(d >= 0)) over the n_boot resampled mean differences d (pairs are
    resampled together), clipped to [1 / n_boot, 1]; so p = 1 when every difference is zero, and
    1 / n_boot (the resolution) when no resample crosses zero.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must be aligned arrays of equal length, got {a.size} and {b.size}.")
    d = b - a
    mean, low, high = bootstrap_ci(d, n_boot=n_boot, ci=ci, seed=seed)  # validates d; same resamples below
    boot = _boot_means(d, n_boot, seed) if np.ptp(d) else np.full(n_boot, mean)
    p = float(np.clip(2 * min((boot <= 0).mean(), (boot >= 0).mean()), 1 / n_boot, 1.0))
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": mean,
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "n": int(a.size),
    }


def compare_settings(
    concept_df: pd.DataFrame,
    setting_a: str,
    setting_b: str,
    value: str = "steerability",
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Setting b vs a on the same concepts, per class and 'all': mean diff (b - a), bootstrap CI/p, McNemar."""
    _require(concept_df, ["setting", "concept_class", "concept", value, "steered_any"], "Concept table")
    keys = ["concept_class", "concept"]
    sides = []
    for s in (setting_a, setting_b):
        part = concept_df[concept_df.setting == s]
        if part.empty:
            raise ValueError(f"Setting '{s}' is not in the concept table; have: {list(pd.unique(concept_df.setting))}.")
        if part.duplicated(keys).any():
            raise ValueError(f"Setting '{s}' has duplicated (concept_class, concept) rows.")
        sides.append(part.set_index(keys))
    only_a = sides[0].index.difference(sides[1].index)
    only_b = sides[1].index.difference(sides[0].index)
    if len(only_a) or len(only_b):
        raise ValueError(
            f"Settings cover different concepts: only in '{setting_a}': {list(only_a)}; "
            f"only in '{setting_b}': {list(only_b)}."
        )
    a, b = sides[0], sides[1].reindex(sides[0].index)
    classes = a.index.get_level_values(0)
    rows = []
    for cls in [*_ordered_classes(classes), ALL]:
        m = np.ones(len(a), bool) if cls == ALL else np.asarray(classes == cls)
        boot = paired_bootstrap(a[value].to_numpy()[m], b[value].to_numpy()[m], n_boot=n_boot, seed=seed)
        mc = mcnemar_exact(a.steered_any.to_numpy()[m], b.steered_any.to_numpy()[m])
        rows.append(
            {
                "concept_class": cls,
                "setting_a": setting_a,
                "setting_b": setting_b,
                "mean_a": boot["mean_a"],
                "mean_b": boot["mean_b"],
                "diff": boot["diff"],
                "ci_low": boot["ci_low"],
                "ci_high": boot["ci_high"],
                "p_bootstrap": boot["p_value"],
                "n01": mc["n01"],
                "n10": mc["n10"],
                "p_mcnemar": mc["p_value"],
                "n_concepts": int(m.sum()),
            }
        )
    return pd.DataFrame(rows)


def stack_protocols(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Concatenate per-protocol tables into one, with a leading `protocol` column."""
    return pd.concat([t.assign(protocol=p) for p, t in tables.items()], ignore_index=True).pipe(
        lambda t: t[["protocol", *[c for c in t.columns if c != "protocol"]]]
    )


def stack_comparisons(
    per_concept: dict[str, pd.DataFrame], pairs: Sequence[tuple[str, str]], seed: int = 0
) -> pd.DataFrame:
    """`compare_settings` for every protocol and (setting_a, setting_b) pair, in one table."""
    return stack_protocols(
        {
            p: pd.concat([compare_settings(frame, a, b, seed=seed) for a, b in pairs], ignore_index=True)
            for p, frame in per_concept.items()
        }
    )


def steerability_by(
    scored: pd.DataFrame, column: str, protocol: str = "best_of_grid", n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """`steerability_table` separately for each value of `column` (e.g. n_statements), stacked."""
    parts = [
        steerability_table(concept_steerability(rows, protocol=protocol), n_boot=n_boot, seed=seed).assign(
            **{column: value}
        )
        for value, rows in scored.groupby(column, sort=True)
    ]
    return pd.concat(parts, ignore_index=True)


def average_draws(concept_df: pd.DataFrame, suffix: str = DRAW_SUFFIX) -> pd.DataFrame:
    """Merge settings that differ only by a draw suffix ('random-25%-d0', 'random-25%-d1', ...) into one row per
    concept: mean `steerability` over draws; `steered_any` by majority (a tie counts as not steered)."""
    _require(concept_df, ["setting", "concept_class", "concept", "steerability", "steered_any"], "Concept table")
    merged = concept_df.assign(setting=concept_df.setting.str.replace(suffix, "", regex=True))
    out = (
        merged.groupby(list(CONCEPT_KEYS), sort=False)
        .agg(
            steerability=("steerability", "mean"), steered_any=("steered_any", "mean"), n_draws=("steerability", "size")
        )
        .reset_index()
    )
    out["steered_any"] = (out.steered_any > 0.5).astype(int)
    return _sorted(out, merged.setting, CONCEPT_KEYS)


def example_generations(scored: pd.DataFrame, per_class: int = 1, question_id: int = 0) -> pd.DataFrame:
    """Side-by-side responses to one question: per concept and setting, the first scoring coefficient's
    response (or the smallest coefficient's when none scored), written as '[eps=c, score=s] text'."""
    concepts = scored.drop_duplicates("concept").groupby("concept_class", sort=False).head(per_class).concept
    rows = scored[scored.concept.isin(concepts) & (scored.question_id == question_id)]
    rows = rows.sort_values(["score", "coefficient"], ascending=[False, True], kind="stable")
    picked = rows.groupby(["concept_class", "concept", "setting"], sort=False).head(1)
    text = [f"[eps={c:g}, score={s}] {r}" for c, s, r in zip(picked.coefficient, picked.score, picked.response)]
    wide = picked.assign(example=text).pivot(index=["concept_class", "concept"], columns="setting", values="example")
    return wide[list(dict.fromkeys(scored.setting))].reset_index()


def steering_strip(scored: pd.DataFrame, setting: str, concepts: list[str], question_id: int = 0) -> pd.DataFrame:
    """What steering does as eps grows: for each concept, the response to one question at every coefficient of
    one setting, with the judge's score and reason (one row per concept × coefficient, coefficients ascending)."""
    rows = scored[(scored.setting == setting) & scored.concept.isin(concepts) & (scored.question_id == question_id)]
    missing = sorted(set(concepts) - set(rows.concept))
    if missing:
        raise ValueError(f"No generations of setting {setting!r} for concept(s) {missing} at question {question_id}.")
    order = {c: i for i, c in enumerate(concepts)}
    return rows.sort_values(["concept", "coefficient"], key=lambda c: c.map(order) if c.name == "concept" else c)[
        ["concept_class", "concept", "coefficient", "score", "reason", "response"]
    ].reset_index(drop=True)


def steerability_by_protocol(
    scored: pd.DataFrame, seed: int = 0, average: bool = False
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame], pd.DataFrame]:
    """For each steerability protocol (PROTOCOLS): the per-concept steerability (`concept_steerability`, random
    draws averaged when `average`) and its `steerability_table`; and those tables stacked (`stack_protocols`)."""
    per_concept = {p: concept_steerability(scored, protocol=p) for p in PROTOCOLS}
    if average:
        per_concept = {p: average_draws(c) for p, c in per_concept.items()}
    tables = {p: steerability_table(c, seed=seed) for p, c in per_concept.items()}
    return per_concept, tables, stack_protocols(tables)

"""Steerability from judged generations, with bootstrap intervals and paired tests between compared things.

Input: a tidy table of generations, one row per (compared, concept_class, concept, question_id, coefficient),
with a 0/1 judge `score`; extra columns are ignored. `compared` names the column that holds what is compared:
`setting` (notebooks 01/02), `block_set` (03), `method` (05), `arm` (06). Two protocols:
- `best_of_grid` (the paper's): a question counts as steered if ANY coefficient of the grid scores 1.
  Picking the coefficient on the very question it is scored on flatters every method.
- `held_out`: per concept and compared value, ONE coefficient is chosen on the select questions (highest mean
  score; ties by smallest |coefficient|, then smallest value) and scored on the remaining questions only.
Everything is deterministic: bootstraps take a seed, outputs are sorted (compared values in order of first
appearance, classes in benchmark order, then concept and question).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from ..core.prompting import CLASSES

SETTING = "setting"  # the default compared column: a training.Setting name
CONCEPT_KEYS = ("concept_class", "concept")
PROTOCOLS = ("best_of_grid", "held_out")
ALL = "all"
DRAW_SUFFIX = r"-d\d+$"  # marks repeated random draws of one block set: 'random-25%-d0', 'random-25%-d1', ...


def concept_keys(compared: str = SETTING) -> list[str]:
    """The columns that name one concept of one compared value."""
    return [compared, *CONCEPT_KEYS]


def question_keys(compared: str = SETTING) -> list[str]:
    """The columns that name one question of one concept of one compared value."""
    return [*concept_keys(compared), "question_id"]


def _require(df: pd.DataFrame, columns: Sequence[str], what: str, compared: str = SETTING) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} is missing required column(s): {', '.join(missing)}.")
    if df.empty:
        raise ValueError(f"{what} has no rows.")
    keys = [c for c in columns if c in (*question_keys(compared), "coefficient")]
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


def _grid(df: pd.DataFrame, compared: str) -> pd.DataFrame:
    """A validated copy of a generations table: numeric coefficient, 0/1 int score, no duplicates."""
    keys = question_keys(compared)
    _require(df, [*keys, "coefficient", "score"], "Generations table", compared)
    out = df.copy()
    out["coefficient"] = pd.to_numeric(out.coefficient, errors="coerce")
    if out.coefficient.isna().any() or not np.isfinite(out.coefficient).all():
        raise ValueError("Column coefficient must hold finite numbers.")
    out["score"] = _check_binary(out.score.to_numpy(), "Column score")
    dup = out.duplicated([*keys, "coefficient"])
    if dup.any():
        first = out.loc[dup, [*keys, "coefficient"]].iloc[0].to_dict()
        raise ValueError(
            f"{int(dup.sum())} duplicated (concept, {compared}, question, coefficient) row(s), e.g. {first}."
        )
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


def _sorted(out: pd.DataFrame, order: pd.Series, keys: Sequence[str]) -> pd.DataFrame:
    """Rows ordered by the compared column `order.name` (first appearance in `order`), class (benchmark order)
    and the remaining keys."""
    rank = {s: i for i, s in enumerate(pd.unique(order))}

    def key(col: pd.Series) -> pd.Series:
        if col.name == order.name:
            return col.map(rank)
        return _class_rank(col) if col.name == "concept_class" else col

    return out.sort_values(list(keys), key=key, kind="stable").reset_index(drop=True)


def best_of_grid(df: pd.DataFrame, compared: str = SETTING) -> pd.DataFrame:
    """Per question: `steered` if any coefficient scores 1, and the smallest-|c| scoring `best_coefficient`."""
    grid = _grid(df, compared)
    keys = question_keys(compared)
    grid = grid.assign(_abs=grid.coefficient.abs()).sort_values(["_abs", "coefficient"], kind="stable")
    steered = grid.groupby(keys, sort=False).score.max().rename("steered")
    best = grid[grid.score == 1].groupby(keys, sort=False).coefficient.first().rename("best_coefficient")
    out = steered.to_frame().join(best).reset_index()
    return _sorted(out, df[compared], keys)


def _held_out(grid: pd.DataFrame, select: Sequence, compared: str) -> pd.DataFrame:
    keys = concept_keys(compared)
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
    df: pd.DataFrame, protocol: str = "best_of_grid", select_questions: Sequence[int] = (0, 1), compared: str = SETTING
) -> pd.DataFrame:
    """One row per (compared, concept_class, concept): `steerability`, `steered_any`, `n_questions`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol '{protocol}'; use one of: {', '.join(PROTOCOLS)}.")
    if protocol == "best_of_grid":
        out = (
            best_of_grid(df, compared)
            .groupby(concept_keys(compared))
            .agg(steerability=("steered", "mean"), steered_any=("steered", "max"), n_questions=("question_id", "size"))
            .reset_index()
        )
    else:
        select = list(select_questions)
        if not select:
            raise ValueError("select_questions must name at least one question for the held_out protocol.")
        out = _held_out(_grid(df, compared), select, compared)
    out["steered_any"] = out.steered_any.astype(int)
    out["n_questions"] = out.n_questions.astype(int)
    return _sorted(out, df[compared], concept_keys(compared))


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
    concept_df: pd.DataFrame, by: Sequence[str] = (SETTING, "concept_class"), n_boot: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Mean steerability with a 95% bootstrap CI over concepts per group, plus an 'all'-classes row; groups in order
    of first appearance of `by`'s first column."""
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
    return _sorted(out, concept_df[outer[0]], outer[:1]) if outer else out


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


def compare(
    concept_df: pd.DataFrame,
    a: str,
    b: str,
    value: str = "steerability",
    n_boot: int = 2000,
    seed: int = 0,
    compared: str = SETTING,
) -> pd.DataFrame:
    """b vs a (two values of the `compared` column) on the same concepts, per class and 'all': mean diff (b - a),
    bootstrap CI/p, McNemar; the pair is written as columns `<compared>_a`, `<compared>_b`."""
    _require(concept_df, [*concept_keys(compared), value, "steered_any"], "Concept table", compared)
    keys = list(CONCEPT_KEYS)
    sides = []
    for s in (a, b):
        part = concept_df[concept_df[compared] == s]
        if part.empty:
            raise ValueError(
                f"{compared} '{s}' is not in the concept table; have: {list(pd.unique(concept_df[compared]))}."
            )
        if part.duplicated(keys).any():
            raise ValueError(f"{compared} '{s}' has duplicated (concept_class, concept) rows.")
        sides.append(part.set_index(keys))
    only_a = sides[0].index.difference(sides[1].index)
    only_b = sides[1].index.difference(sides[0].index)
    if len(only_a) or len(only_b):
        raise ValueError(
            f"{compared} values cover different concepts: only in '{a}': {list(only_a)}; only in '{b}': {list(only_b)}."
        )
    side_a, side_b = sides[0], sides[1].reindex(sides[0].index)
    classes = side_a.index.get_level_values(0)
    rows = []
    for cls in [*_ordered_classes(classes), ALL]:
        m = np.ones(len(side_a), bool) if cls == ALL else np.asarray(classes == cls)
        boot = paired_bootstrap(side_a[value].to_numpy()[m], side_b[value].to_numpy()[m], n_boot=n_boot, seed=seed)
        mc = mcnemar_exact(side_a.steered_any.to_numpy()[m], side_b.steered_any.to_numpy()[m])
        rows.append(
            {
                "concept_class": cls,
                f"{compared}_a": a,
                f"{compared}_b": b,
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
    per_concept: dict[str, pd.DataFrame], pairs: Sequence[tuple[str, str]], seed: int = 0, compared: str = SETTING
) -> pd.DataFrame:
    """`compare` for every protocol and (a, b) pair of `compared` values, in one table."""
    return stack_protocols(
        {
            p: pd.concat([compare(frame, a, b, seed=seed, compared=compared) for a, b in pairs], ignore_index=True)
            for p, frame in per_concept.items()
        }
    )


def steerability_by(
    scored: pd.DataFrame, column: str, protocol: str = "best_of_grid", seed: int = 0, compared: str = SETTING
) -> pd.DataFrame:
    """`steerability_table` separately for each value of `column` (e.g. n_statements), stacked."""
    parts = [
        steerability_table(
            concept_steerability(rows, protocol=protocol, compared=compared), by=(compared, "concept_class"), seed=seed
        ).assign(**{column: value})
        for value, rows in scored.groupby(column, sort=True)
    ]
    return pd.concat(parts, ignore_index=True)


def average_draws(concept_df: pd.DataFrame, compared: str = "block_set", suffix: str = DRAW_SUFFIX) -> pd.DataFrame:
    """Merge values of `compared` that differ only by a draw suffix ('random-25%-d0', 'random-25%-d1', ...) into one
    row per concept: mean `steerability` over draws; `steered_any` by majority (a tie counts as not steered)."""
    keys = concept_keys(compared)
    _require(concept_df, [*keys, "steerability", "steered_any"], "Concept table", compared)
    merged = concept_df.assign(**{compared: concept_df[compared].str.replace(suffix, "", regex=True)})
    out = (
        merged.groupby(keys, sort=False)
        .agg(
            steerability=("steerability", "mean"), steered_any=("steered_any", "mean"), n_draws=("steerability", "size")
        )
        .reset_index()
    )
    out["steered_any"] = (out.steered_any > 0.5).astype(int)
    return _sorted(out, merged[compared], keys)


def example_generations(
    scored: pd.DataFrame, per_class: int = 1, question_id: int = 0, compared: str = SETTING
) -> pd.DataFrame:
    """Side-by-side responses to one question: per concept and `compared` value, the first scoring coefficient's
    response (or the smallest coefficient's when none scored), written as '[eps=c, score=s] text'."""
    concepts = scored.drop_duplicates("concept").groupby("concept_class", sort=False).head(per_class).concept
    rows = scored[scored.concept.isin(concepts) & (scored.question_id == question_id)]
    rows = rows.sort_values(["score", "coefficient"], ascending=[False, True], kind="stable")
    picked = rows.groupby([*CONCEPT_KEYS, compared], sort=False).head(1)
    text = [f"[eps={c:g}, score={s}] {r}" for c, s, r in zip(picked.coefficient, picked.score, picked.response)]
    wide = picked.assign(example=text).pivot(index=list(CONCEPT_KEYS), columns=compared, values="example")
    return wide[list(dict.fromkeys(scored[compared]))].reset_index()


def steering_strip(
    scored: pd.DataFrame, value: str, concepts: list[str], question_id: int = 0, compared: str = SETTING
) -> pd.DataFrame:
    """What steering does as eps grows: for each concept, the response to one question at every coefficient of
    one `compared` value, with the judge's score and reason (one row per concept × coefficient, ascending)."""
    rows = scored[(scored[compared] == value) & scored.concept.isin(concepts) & (scored.question_id == question_id)]
    missing = sorted(set(concepts) - set(rows.concept))
    if missing:
        raise ValueError(f"No generations of {compared} {value!r} for concept(s) {missing} at question {question_id}.")
    order = {c: i for i, c in enumerate(concepts)}
    return rows.sort_values(["concept", "coefficient"], key=lambda c: c.map(order) if c.name == "concept" else c)[
        ["concept_class", "concept", "coefficient", "score", "reason", "response"]
    ].reset_index(drop=True)


def steerability_by_protocol(
    scored: pd.DataFrame, seed: int = 0, average: bool = False, compared: str = SETTING
) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame], pd.DataFrame]:
    """For each steerability protocol (PROTOCOLS): the per-concept steerability (`concept_steerability`, random
    draws averaged when `average`) and its `steerability_table`; and those tables stacked (`stack_protocols`)."""
    per_concept = {p: concept_steerability(scored, protocol=p, compared=compared) for p in PROTOCOLS}
    if average:
        per_concept = {p: average_draws(c, compared) for p, c in per_concept.items()}
    tables = {p: steerability_table(c, by=(compared, "concept_class"), seed=seed) for p, c in per_concept.items()}
    return per_concept, tables, stack_protocols(tables)

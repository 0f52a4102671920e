"""Compare models from their results folders (notebook 04): nothing here loads a model.

Each model's notebooks 01-03 (and 05) write tidy tables into `results/<model>/`; these functions stack one table
over models (with a `model` column) and reduce it to what the scaling comparison plots: steerability against model
size beside its negative controls and the published reference, the paper's four comparisons per model, the prior
method vs ours per class, the soft-label gain, enrichment over normalised depth and the coefficients that worked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths
from ..core.training import HARD, OURS, PRIOR
from . import evaluation, judge
from .pipeline import CONTROLS

# The prior method's published steerability on Llama-3.1-8B-Instruct (neural controllers, arXiv 2502.03708, Fig. 4:
# RFM, fixed token, hard labels, the best of its own coefficient grid, judged by GPT-4o). A reference mark only:
# another model, judge and grid than ours.
REFERENCE_LABEL = "prior method, Llama-3.1-8B (published; GPT-4o judge, its own grid)"
REFERENCE_PARAMETERS = 8.03e9
REFERENCE = {"fears": 0.103, "places": 0.213, "personas": 0.594, "experts": 0.551, "moods": 0.990, "all": 0.490}
# The paper's four comparisons, each a paired test a notebook already made (its `NN_paired_tests.csv`):
# (name, notebook, compared column, a, b); the difference is b − a.
COMPARISONS = (
    ("attention-selected vs fixed token", "01_token_selection", "setting", PRIOR, HARD),
    ("soft vs hard labels", "01_token_selection", "setting", HARD, OURS),
    ("top vs bottom enrichment blocks", "03_layer_enrichment", "block_set", "bottom-25%", "top-25%"),
    ("ours vs prior", "05_baselines", "method", "prior", "ours"),
    ("ours vs SADI (heads, last token)", "05_baselines", "method", "sadi-head-last", "ours"),
    ("ours vs SADI (MLP, all positions)", "05_baselines", "method", "sadi-hidden-all", "ours"),
    ("ours vs prompting", "05_baselines", "method", "prompting", "ours"),
)
PERSON_CHECKED_COLUMNS = [
    "model", "protocol", "setting", "concept_class", "steerability", "ci_low", "ci_high", "n_concepts", "judge",
    "judge_positive", "labelled", "confirmed", "labelled_negative", "missed",
]  # fmt: skip
PAIRED_KEEP = ["protocol", "mean_a", "mean_b", "diff", "ci_low", "ci_high", "p_mcnemar", "n_concepts"]


def result_models(name: str = "01_steerability.csv", results_root: Path | None = None, variant: str = "") -> list[str]:
    """The model folders under results/ that hold `name` (in their `variant` subfolder, if given), sorted."""
    root = Path(results_root or paths.RESULTS_DIR)
    return sorted(p.name for p in root.iterdir() if (p / variant / name).is_file()) if root.is_dir() else []


def having(name: str, models: list[str], results_root: Path | None = None, variant: str = "") -> list[str]:
    """The models among `models` whose results folder (its `variant` subfolder) holds `name`, in their order."""
    root = Path(results_root or paths.RESULTS_DIR)
    return [m for m in map(paths.model_slug, models) if (root / m / variant / name).is_file()]


def collect(
    name: str, models: list[str] | None = None, results_root: Path | None = None, variant: str = ""
) -> pd.DataFrame:
    """One results table stacked over models, with a leading `model` column (the results folder name); `variant`
    (e.g. 'protocol-paper') reads `results/<model>/<variant>/` instead, as the notebooks write a run off the adopted
    protocol."""
    root = Path(results_root or paths.RESULTS_DIR)
    models = result_models(name, root, variant) if models is None else [paths.model_slug(m) for m in models]
    if not models:
        raise FileNotFoundError(
            f"No results/{Path('<model>', variant, name).as_posix()} under '{root}'; run "
            f"`make all` (notebooks 00-03) first."
        )
    present = having(name, models, root, variant)
    missing = [m for m in models if m not in present]
    if missing:
        raise FileNotFoundError(
            f"results/{Path(missing[0], variant, name).as_posix()} is missing; run "
            f"`make all MODELS={missing[0]}` first."
        )
    frames = [pd.read_csv(root / m / variant / name, keep_default_na=False).assign(model=m) for m in models]
    table = pd.concat(frames, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def check_training_protocol(generations: pd.DataFrame, protocol_name: str) -> None:
    """Raise, naming the model, unless every model's notebook-01 vectors were trained under `protocol_name` (a
    table without a `protocol` column, or with an empty one, was trained under 'paper')."""
    found = generations["protocol"] if "protocol" in generations else pd.Series("", index=generations.index)
    found = found.fillna("").replace("", "paper")
    for model, names in found.groupby(generations.model, sort=False).unique().items():
        other = [n for n in names if n != protocol_name]
        if other:
            raise ValueError(
                f"results/{model}/ holds notebook 01 trained under protocol '{other[0]}', not "
                f"'{protocol_name}'; rerun `make 01_token_selection MODELS={model}` under this protocol, or "
                f"compare that protocol's runs with `make 04_multi_model_scaling PROTOCOL={other[0]}`."
            )


def model_overview(fits: pd.DataFrame, summary: pd.DataFrame, generations: pd.DataFrame) -> pd.DataFrame:
    """Per model: blocks, the shared chat-template tail and how many concepts notebook 01 ran."""
    blocks = fits.groupby("model", sort=False).block.max().add(1).rename("n_blocks")
    tail = summary.groupby("model", sort=False).agg(n_tail=("n_tail", "first"), tail=("tail", "first"))
    concepts = generations.groupby("model", sort=False).concept.nunique().rename("n_concepts")
    return pd.concat([blocks, tail, concepts], axis=1).reset_index()


def prior_vs_ours(
    steerability: pd.DataFrame, settings: tuple[str, ...] = (PRIOR, HARD, OURS, *CONTROLS)
) -> pd.DataFrame:
    """Rows of notebook 01's steerability tables for the compared settings and the negative controls, in that order
    (a table from before the controls has none)."""
    rows = steerability[steerability.setting.isin(settings)].copy()
    rows["setting"] = pd.Categorical(rows.setting, categories=list(settings), ordered=True)
    return (
        rows.sort_values(["model", "protocol", "setting"], kind="stable")
        .astype({"setting": str})
        .reset_index(drop=True)
    )


def soft_label_gain(paired: pd.DataFrame, hard: str = HARD, soft: str = OURS) -> pd.DataFrame:
    """Per model, protocol and class: soft minus hard steerability with its paired-bootstrap CI and McNemar p."""
    rows = paired[(paired.setting_a == hard) & (paired.setting_b == soft)]
    if rows.empty:
        raise ValueError(f"No paired test of '{hard}' vs '{soft}' in the table; rerun notebook 01.")
    return (
        rows[
            [
                "model",
                "protocol",
                "concept_class",
                "mean_a",
                "mean_b",
                "diff",
                "ci_low",
                "ci_high",
                "p_mcnemar",
                "n_concepts",
            ]
        ]
        .rename(columns={"mean_a": hard, "mean_b": soft})
        .reset_index(drop=True)
    )


def depth_profile(enrichment: pd.DataFrame, n_bins: int = 10) -> pd.DataFrame:
    """Mean enrichment score per model and normalised-depth bin (bins of width 1/n_bins; bin centres)."""
    bins = np.minimum((enrichment.depth * n_bins).astype(int), n_bins - 1)
    table = enrichment.assign(depth_bin=(bins + 0.5) / n_bins)
    return (
        table.groupby(["model", "depth_bin"], sort=False)
        .agg(score=("score", "mean"), score_fdr=("score_fdr", "mean"), n_blocks=("block", "nunique"))
        .reset_index()
    )


def working_coefficients(generations: pd.DataFrame, setting: str = OURS) -> pd.DataFrame:
    """Per model and coefficient: the share of steered (concept, question) pairs whose smallest scoring eps it is."""
    rows = generations[generations.setting == setting]
    if rows.empty:
        raise ValueError(f"No generations of setting '{setting}'; rerun notebook 01.")
    parts = []
    for model, frame in rows.groupby("model", sort=False):
        best = evaluation.best_of_grid(frame)
        steered = best[best.steered == 1]
        counts = steered.best_coefficient.value_counts().reindex(sorted(frame.coefficient.unique()), fill_value=0)
        parts.append(
            pd.DataFrame(
                {
                    "model": model,
                    "coefficient": counts.index,
                    "n_steered": counts.to_numpy(),
                    "share": counts.to_numpy() / max(len(steered), 1),
                    "n_pairs": len(best),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def model_sizes(versions: pd.DataFrame) -> pd.Series:
    """model -> parameter count, from the stacked `versions.csv` of each model's results (notebook 01 writes it)."""
    rows = versions[versions.package == "n_parameters"].set_index("model").version.astype(int)
    missing = sorted(set(versions.model) - set(rows[rows > 0].index))
    if missing:
        raise ValueError(
            f"results/{missing[0]}/versions.csv does not record the model's size (written before sizes were); "
            f"rerun `make 01_token_selection MODELS={missing[0]}`."
        )
    return rows.rename("n_parameters")


def scaling_curve(
    steerability: pd.DataFrame, sizes: pd.Series, settings: tuple[str, ...] = (PRIOR, OURS, *CONTROLS)
) -> pd.DataFrame:
    """Notebook 01's steerability rows of `settings` (with the negative controls) and each model's size, smallest
    model first: the points of the scaling curve, per protocol and class."""
    rows = prior_vs_ours(steerability, settings).join(sizes, on="model")
    return rows.sort_values(["n_parameters", "protocol"], kind="stable").reset_index(drop=True)


def person_checked(
    generations: pd.DataFrame, cases: pd.DataFrame, settings: tuple[str, ...] = (OURS, *CONTROLS), seed: int = 0
) -> pd.DataFrame:
    """Per model, protocol, setting and class: steerability as the judge counts it (`judge`) and as the judge and a
    person both count it (`steerability`, with its 95% CI: a lower bound unless every judge positive is labelled; the
    held-out protocol also chooses each concept's coefficient on what both count),
    beside the judge's positives, how many a person labelled and confirmed, and the judge's misses among the judge
    negatives a person labelled (`labelled_negative`, `missed`). Models whose responses nobody labelled are left out.
    A person round that labels every judge positive (`judge_validation confirm`) makes `steerability` exact for what
    the judge found; `missed` says what it did not find."""
    labelled = set(cases.response)
    parts = []
    for model, frame in generations[generations.setting.isin(settings)].groupby("model", sort=False):
        if not labelled & set(frame.response):
            continue
        confirmed = judge.confirmed_scores(frame, cases)
        by = ["setting", "concept_class"]
        counts = label_counts(confirmed)
        for protocol in evaluation.PROTOCOLS:
            person = evaluation.concept_steerability(confirmed, protocol)
            person = evaluation.steerability_table(person, by, seed=seed)
            judged = evaluation.concept_steerability(confirmed.assign(score=confirmed.judge_score), protocol)
            judged = evaluation.steerability_table(judged, by, seed=seed).set_index(by).steerability.rename("judge")
            table = person.join(judged, on=by).join(counts, on=by)
            parts.append(table.assign(model=model, protocol=protocol))
    if not parts:  # nobody labelled these responses (e.g. a smoke run's): an empty table with the same columns
        return pd.DataFrame(columns=PERSON_CHECKED_COLUMNS)
    return pd.concat(parts, ignore_index=True)[PERSON_CHECKED_COLUMNS]


def label_counts(confirmed: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, class, with an 'all' row) of `judge.confirmed_scores` rows: the judge's positives, how many a
    person labelled and confirmed, the judge negatives a person labelled and how many of them were on-concept."""
    rows = pd.concat([confirmed, confirmed.assign(concept_class=evaluation.ALL)], ignore_index=True)
    positive, seen, on = rows.judge_score == 1, rows.human.notna(), rows.human == 1
    flags = pd.DataFrame(
        {
            "judge_positive": positive,
            "labelled": positive & seen,
            "confirmed": positive & on,
            "labelled_negative": ~positive & seen,
            "missed": ~positive & on,
        }
    ).astype(int)
    return flags.groupby([rows.setting, rows.concept_class]).sum()


def reference_marks() -> pd.DataFrame:
    """The published prior-method points (`REFERENCE`) as rows: class, steerability, size and label."""
    return pd.DataFrame(
        {
            "concept_class": list(REFERENCE),
            "steerability": list(REFERENCE.values()),
            "n_parameters": REFERENCE_PARAMETERS,
            "label": REFERENCE_LABEL,
        }
    )


def paper_comparisons(models: list[str], results_root: Path | None = None, variant: str = "") -> pd.DataFrame:
    """The paper's four comparisons for each model, over all classes, both protocols: one row per (model,
    comparison, protocol) from the notebooks' paired tests (b − a, 95% CI, exact McNemar p). A comparison whose
    notebook has not run for a model is a row with `missing` naming the make command."""
    root = Path(results_root or paths.RESULTS_DIR)
    rows = []
    for model in [paths.model_slug(m) for m in models]:
        for name, notebook, column, a, b in COMPARISONS:
            row = {"model": model, "comparison": name, "a": a, "b": b}
            path = root / model / variant / f"{notebook[:2]}_paired_tests.csv"
            if not path.is_file():
                rows.append(row | {"missing": f"make {notebook} MODELS={model}"})
                continue
            table = pd.read_csv(path)
            hit = table[(table[f"{column}_a"] == a) & (table[f"{column}_b"] == b) & (table.concept_class == "all")]
            rows += [row | {k: record[k] for k in PAIRED_KEEP} | {"missing": ""} for record in hit.to_dict("records")]
    return pd.DataFrame(rows)

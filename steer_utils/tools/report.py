"""`docs/results.md`, generated from the results tables (`make report`).

Every number in the generated page is read from a CSV under `results/` and formatted here; nothing is typed by
hand, so the page cannot drift from the tables (`tests/tools/test_report.py` checks the committed page). The output is
deterministic: the same CSVs (and figure files) give a byte-identical page. A notebook whose tables are missing
gets a one-line "not run yet" note instead of its section.

    python -m steer_utils.tools.report [--results-dir DIR] [--figures-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import os
import re
import sys
from pathlib import Path

import pandas as pd

from .. import paths
from ..cache import atomic_write

DEFAULT_OUT = paths.ROOT / "docs" / "results.md"
# docs/findings.md is written by hand and quotes the tables; it names the digest of the results it was read against,
# and `make report` (and a test) say when the tables have changed since.
FINDINGS = paths.ROOT / "docs" / "findings.md"
DIGEST_LINE = "Read against the results with digest "
NOTEBOOKS = {name[:2]: name for name in paths.TABLES}  # "01" -> "01_token_selection"
MINUS = "\u2212"


# ---------------------------------------------------------------------------------------------------- formatting


def num(x, digits: int = 2) -> str:
    """A number with a fixed count of decimals, a typographic minus and no negative zero; '' for missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    text = f"{float(x):.{digits}f}"
    if text.startswith("-"):
        text = text[1:] if float(text) == 0 else MINUS + text[1:]
    return text


def signed(x, digits: int = 3) -> str:
    """Like `num`, with an explicit '+' on positive values (differences)."""
    text = num(x, digits)
    return "+" + text if text and not text.startswith(MINUS) and float(text) != 0 else text


def ci(value, low, high, digits: int = 2, sign: bool = False) -> str:
    fmt = signed if sign else num
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def pval(p) -> str:
    """p-values: two decimals from 0.1 up, two significant digits below."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    p = float(p)
    if p >= 0.1:
        return f"{p:.2f}"
    if p < 1e-4:
        return "< 0.0001"
    return f"{p:.2g}"


def plain(x) -> str:
    """A grid value as written in the code: shortest form, no trailing zeros (0.05, 0.015, 16)."""
    return f"{float(x):g}"


def share(x) -> str:
    """A share as a percentage without decimals ('' for missing)."""
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * float(x):.0f}%"


def code(text) -> str:
    return f"`{text}`"


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one character per column ('l' or 'r'), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = [":---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ordered(values) -> list:
    """Unique values in order of first appearance (the tables' own order, deterministic)."""
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------------------------------- the page


class Page:
    def __init__(self, results_dir: Path, figures_dir: Path, out: Path):
        self.results_dir, self.figures_dir, self.out = Path(results_dir), Path(figures_dir), Path(out)
        self.parts: list[str] = []

    def add(self, *blocks: str) -> None:
        self.parts.extend(b.strip("\n") for b in blocks if b)

    def read(self, relative: str) -> pd.DataFrame | None:
        path = self.results_dir / relative
        return pd.read_csv(path) if path.is_file() else None

    def figure(self, relative: str, alt: str) -> None:
        path = self.figures_dir / relative
        if path.is_file():
            link = Path(os.path.relpath(path, self.out.parent)).as_posix()
            self.add(f"![{alt}]({link})")

    def missing(self, notebook: str, model: str | None = None) -> None:
        target = NOTEBOOKS[notebook] + (f" MODELS={model}" if model else "")
        self.add(f"*Notebook {notebook}: not run yet: `make {target}`.*")

    def text(self) -> str:
        return "\n\n".join(self.parts) + "\n"


def _models(results_dir: Path) -> list[str]:
    found = (
        sorted(p.name for p in results_dir.iterdir() if p.is_dir() and any(p.glob("0*.csv")))
        if results_dir.is_dir()
        else []
    )
    models04 = results_dir / "04_models.csv"
    first = [m for m in pd.read_csv(models04).model if m in found] if models04.is_file() else []
    return ordered(first + found)


def _steerability_by_class(frame: pd.DataFrame, protocol: str) -> str:
    part = frame[frame.protocol == protocol]
    classes = ordered(part.concept_class)
    rows = []
    for setting in ordered(part.setting):
        s = part[part.setting == setting].set_index("concept_class")
        rows.append(
            [code(setting)]
            + [ci(*s.loc[c, ["steerability", "ci_low", "ci_high"]]) if c in s.index else "" for c in classes]
        )
    return table(["setting"] + classes, rows)


def _paired(frame: pd.DataFrame, compared: str = "setting") -> str:
    part = frame[frame.concept_class == "all"]
    rows = [
        [
            r.protocol.replace("_", "-"),
            f"{getattr(r, compared + '_a')} → {getattr(r, compared + '_b')}",
            signed(r.diff),
            f"[{signed(r.ci_low)}, {signed(r.ci_high)}]",
            pval(r.p_bootstrap),
            pval(r.p_mcnemar),
            f"{int(r.n01)} / {int(r.n10)}",
            int(r.n_concepts),
        ]
        for r in part.itertuples()
    ]
    return table(
        [
            "protocol",
            "comparison (a → b)",
            "diff (b − a)",
            "95% CI",
            "p_bootstrap",
            "p_mcnemar",
            "concepts only b / only a",
            "concepts",
        ],
        rows,
        "llrrrrrr",
    )


def _ci_of(part: pd.DataFrame, key) -> str:
    """'value [low, high]' of the row `key` of a frame indexed by protocol, or '' when it has none."""
    return ci(*part.loc[key, ["steerability", "ci_low", "ci_high"]]) if key in part.index else ""


def _overall(frame: pd.DataFrame, key: str = "setting") -> dict:
    """{(protocol, key value): 'value [low, high]'} for the all-classes rows."""
    part = frame[frame.concept_class == "all"]
    return {(r.protocol, getattr(r, key)): ci(r.steerability, r.ci_low, r.ci_high) for r in part.itertuples()}


def _reasons_by_eps(generations: pd.DataFrame) -> str:
    reasons = sorted(generations.reason.dropna().unique())
    rows = []
    for eps, part in generations.groupby("eps", sort=True):
        counts = part.reason.value_counts(normalize=True)
        rows.append(
            [plain(eps), len(part), num(part.score.mean()), num(part.coherence.mean())]
            + [share(counts.get(r, 0.0)) for r in reasons]
        )
    return table(["eps", "responses", "judge score", "coherence"] + reasons, rows)


def _notebook01(page: Page, model: str, base: str = "") -> None:
    steer = page.read(f"{model}/01_steerability.csv")
    if steer is None:
        page.missing("01", model)
        return
    page.add("### Notebook 01: token selection and labels")
    page.figure(f"{model}/fig01_steerability_by_token.png", "steerability by token selection")
    gens = page.read(f"{model}/01_generations.csv")
    n = steer[(steer.concept_class == "all")].n_concepts.max()
    facts = [f"{int(n)} concepts"]
    if gens is not None:
        facts.append("eps ∈ {" + ", ".join(plain(e) for e in sorted(gens.coefficient.unique())) + "}")
        if "protocol" in gens:
            facts.append("protocol " + ", ".join(code(p) for p in ordered(gens.protocol.fillna("paper"))))
    page.add(
        f"`01_steerability.csv` ({'; '.join(facts)}). Best-of-grid:",
        _steerability_by_class(steer, "best_of_grid"),
        "Held-out:",
        _steerability_by_class(steer, "held_out"),
    )
    tests = page.read(f"{model}/01_paired_tests.csv")
    if tests is not None:
        page.add(
            "Paired tests over concepts, all classes (`01_paired_tests.csv`; p_bootstrap: paired bootstrap of "
            'the mean difference; p_mcnemar: exact McNemar test on "steered on any question"):',
            _paired(tests),
        )
    if gens is not None:
        rows = [
            [code(s), share(part.groupby("concept").score.max().mean())]
            for s, part in ((s, gens[gens.setting == s]) for s in ordered(gens.setting))
        ]
        page.add(
            "Share of concepts with a judge-positive response at some eps (`01_generations.csv`):",
            table(["setting", "concepts"], rows),
        )
        last = ordered(gens.setting)[-1]
        page.add(
            f"Responses of {code(last)} by eps and by the judge's `reason` (`01_generations.csv`):",
            _reasons_by_eps(gens[gens.setting == last]),
        )
    page.figure(f"{model}/fig01_strip.png", "steering strip")
    variants = (
        sorted(p.name for p in (page.results_dir / model).glob("protocol-*") if (p / "01_steerability.csv").is_file())
        if (page.results_dir / model).is_dir()
        else []
    )
    for variant in variants:
        other = _overall(page.read(f"{model}/{variant}/01_steerability.csv"))
        settings = ordered(s for _, s in other)
        rows = [[code(s), other.get(("best_of_grid", s), ""), other.get(("held_out", s), "")] for s in settings]
        page.add(
            f"The same notebook under `{variant}` (`{model}/{variant}/01_steerability.csv`), all classes:",
            table(["setting", "best-of-grid", "held-out"], rows),
        )


def _notebook02(page: Page, model: str) -> None:
    sweep, methods = page.read(f"{model}/02_statement_sweep.csv"), page.read(f"{model}/02_methods.csv")
    eps, tests = page.read(f"{model}/02_eps_sweep.csv"), page.read(f"{model}/02_paired_tests.csv")
    if all(t is None for t in (sweep, methods, eps, tests)):
        page.missing("02", model)
        return
    page.add("### Notebook 02: soft vs hard labels, statements, methods, eps")
    page.figure(f"{model}/fig02_statements_and_methods.png", "statement count and methods")
    if tests is not None:
        page.add("Soft vs hard labels (`02_paired_tests.csv`):", _paired(tests))
    if sweep is not None:
        part = sweep[sweep.concept_class == "all"]
        settings = ordered(part.setting)
        rows = []
        for n_statements, group in part.groupby("n_statements", sort=True):
            g = group.set_index("setting")
            rows.append(
                [int(n_statements)]
                + [ci(*g.loc[s, ["steerability", "ci_low", "ci_high"]]) if s in g.index else "" for s in settings]
            )
        page.add(
            f"Statement-count sweep, best-of-grid, all classes (`02_statement_sweep.csv`, "
            f"{int(part.n_concepts.max())} concepts):",
            table(["statements"] + settings, rows),
        )
    if methods is not None:
        part = methods[methods.concept_class == "all"]
        rows = [[code(r.setting), ci(r.steerability, r.ci_low, r.ci_high)] for r in part.itertuples()]
        page.add(
            f"Vector methods, best-of-grid, all classes (`02_methods.csv`, {int(part.n_concepts.max())} concepts):",
            table(["setting", "steerability"], rows),
        )
    if eps is not None:
        page.figure(f"{model}/fig02_eps_sweep.png", "eps sweep")
        page.add(
            f"The eps sweep (`02_eps_sweep.csv`, {eps.concept.nunique()} concepts): mean judge score, mean "
            "coherence and the judge's `reason` per eps:",
            _reasons_by_eps(eps),
        )


def _notebook03(page: Page, model: str) -> None:
    enrichment, steer = page.read(f"{model}/03_enrichment.csv"), page.read(f"{model}/03_steerability.csv")
    if enrichment is None and steer is None:
        page.missing("03", model)
        return
    page.add("### Notebook 03: layer enrichment and block sets")
    if enrichment is not None:
        page.figure(f"{model}/fig03_enrichment.png", "enrichment")
        facts = [
            f"mean enrichment score over concepts and blocks {num(enrichment.score.mean(), 3)}",
            f"share of (concept, block) pairs with a test surviving Benjamini-Hochberg "
            f"{share((enrichment.score_fdr > 0).mean()) if 'score_fdr' in enrichment else ''}",
        ]
        top = page.read(f"{model}/03_top_blocks.csv")
        if top is not None and (top.block_set == "top-25%").any():
            facts.append(
                f"median depth of the top-25% blocks {num(top[top.block_set == 'top-25%'].depth.median())} "
                "(`03_top_blocks.csv`)"
            )
        page.add(f"`03_enrichment.csv` ({enrichment.concept.nunique()} concepts): " + "; ".join(facts) + ".")
        by_block = enrichment.groupby("block").agg(depth=("depth", "first"), score=("score", "mean")).reset_index()
        best = by_block.sort_values(["score", "block"], ascending=[False, True]).head(5)
        by_class = page.read(f"{model}/03_enrichment_by_class.csv")
        classes = ordered(by_class.concept_class) if by_class is not None else []
        pivot = by_class.pivot(index="block", columns="concept_class", values="score") if classes else None
        rows = [
            [int(r.block), num(r.depth), num(r.score, 3)] + [num(pivot.loc[r.block, c], 3) for c in classes]
            for r in best.itertuples()
        ]
        page.add(
            "The five most enriched blocks (mean score over concepts; class means from `03_enrichment_by_class.csv`):",
            table(["block", "depth", "score"] + classes, rows),
        )
    if steer is not None:
        page.figure(f"{model}/fig03_block_sets_best_of_grid.png", "block sets")
        overall = _overall(steer, "block_set")
        sets = ordered(s for _, s in overall)
        rows = [[p.replace("_", "-")] + [overall.get((p, s), "") for s in sets] for p in ordered(steer.protocol)]
        n = int(steer[steer.concept_class == "all"].n_concepts.max())
        page.add(
            f"Steering through block sets, all classes (`03_steerability.csv`, {n} concepts):",
            table(["protocol"] + sets, rows),
        )
    tests = page.read(f"{model}/03_paired_tests.csv")
    if tests is not None:
        page.add("Paired block-set comparisons (`03_paired_tests.csv`):", _paired(tests, "block_set"))


def _notebook05(page: Page, model: str) -> None:
    steer = page.read(f"{model}/05_steerability.csv")
    if steer is None:
        page.missing("05", model)
        return
    page.add("### Notebook 05: baselines")
    page.figure(f"{model}/fig05_baselines.png", "baselines")
    overall = _overall(steer, "method")
    tests, costs = page.read(f"{model}/05_paired_tests.csv"), page.read(f"{model}/05_costs.csv")
    diffs = {}
    if tests is not None:
        part = tests[(tests.concept_class == "all") & (tests.protocol == "best_of_grid")]
        diffs = {
            r.method_a: f"{ci(r.diff, r.ci_low, r.ci_high, 3, sign=True)} (p {pval(r.p_mcnemar)})"
            for r in part.itertuples()
        }
    cost = (
        {r.method: f"{num(r.extract_s, 1)} / {num(r.fit_s)} / {num(r.generate_s, 1)}" for r in costs.itertuples()}
        if costs is not None
        else {}
    )
    methods = ordered(s for _, s in overall)
    rows = [
        [
            code(m),
            overall.get(("best_of_grid", m), ""),
            overall.get(("held_out", m), ""),
            diffs.get(m, "—"),
            cost.get(m, ""),
        ]
        for m in methods
    ]
    n = int(steer[steer.concept_class == "all"].n_concepts.max())
    page.add(
        f"All classes, {n} concepts (`05_steerability.csv`; the paired difference to `ours` from "
        "`05_paired_tests.csv` with its bootstrap CI and exact McNemar p; the cost of one concept with nothing "
        "cached from `05_costs.csv`, seconds):",
        table(
            [
                "method",
                "best-of-grid",
                "held-out",
                "ours − method, best-of-grid (McNemar p)",
                "extract / fit / generate (s)",
            ],
            rows,
        ),
    )
    tuning = page.read(f"{model}/05_sadi_tuning.csv")
    if tuning is not None:
        rows = []
        for variant in ordered(tuning.variant):
            part = tuning[tuning.variant == variant]
            chosen = part[part.eval_rank > 0].sort_values("eval_rank")
            rows.append(
                [
                    code(variant),
                    num(part.mean_score.max()),
                    "; ".join(f"K {int(r.k)}, delta {num(r.delta, 1)}" for r in chosen.itertuples()),
                ]
            )
        page.add(
            "SADI tuning on held-out concepts (`05_sadi_tuning.csv`): the best tuning score and the (K, delta) "
            "points chosen for its grid, in order:",
            table(["variant", "best tuning score", "grid"], rows, "lrl"),
        )


def _notebook06(page: Page, model: str) -> None:
    factors = page.read(f"{model}/06_factors.csv")
    if factors is None:
        page.missing("06", model)
        return
    page.add("### Notebook 06: steering protocol study (development split)")
    bound = page.read(f"{model}/06_bound.csv")
    rows = []
    for arm in ordered(factors.arm):
        part = factors[factors.arm == arm].set_index("protocol")
        diff = part.loc["best_of_grid"] if "best_of_grid" in part.index else None
        rows.append(
            [
                arm,
                _ci_of(part, "held_out"),
                _ci_of(part, "best_of_grid"),
                ci(diff["diff"], diff.diff_low, diff.diff_high, sign=True)
                if diff is not None and not pd.isna(diff["diff"])
                else "—",
                pval(diff.p_mcnemar) if diff is not None else "",
            ]
        )
    if bound is not None and (bound.arm == "prompting").any():
        p = bound[bound.arm == "prompting"].iloc[0]
        rows.append(["prompting (`06_bound.csv`)", num(p.held_out), num(p.best_of_grid), "", ""])
    n = int(factors.n_concepts.max())
    page.add(
        f"One arm per factor level, each paired against the paper's protocol on the same {n} concepts "
        "(`06_factors.csv`):",
        table(["arm", "held-out", "best-of-grid", "diff to paper, best-of-grid", "McNemar p"], rows, "lrrrr"),
    )
    separation = page.read(f"{model}/06_separation.csv")
    if separation is not None:  # as study.separation_summary: every block but the first
        steered = separation[separation.block > 0]
        rows = [
            [arm, num(part.auc_unprefixed.mean()), num(part.auc_class.mean())]
            for arm, part in ((a, steered[steered.arm == a]) for a in ordered(steered.arm))
        ]
        page.add(
            "Generation-free diagnosis (`06_separation.csv`): mean held-out AUC over concepts and blocks "
            "(all but the first) against unprefixed prompts and against other concepts of the class:",
            table(["arm", "AUC vs unprefixed", "AUC vs class"], rows),
        )
    choice = page.read(f"{model}/06_choice.csv")
    if choice is not None:
        rows = [
            [
                int(r.rank),
                r.arm,
                ci(r.steerability, r.ci_low, r.ci_high),
                ci(r.diff, r.diff_low, r.diff_high, sign=True),
                pval(r.p_mcnemar),
                num(r.best_of_grid),
            ]
            for r in choice.sort_values("rank").head(3).itertuples()
        ]
        page.add(
            "The choice, by held-out steerability (`06_choice.csv`, first three):",
            table(["rank", "arm", "held-out", "diff to paper", "McNemar p", "best-of-grid"], rows, "rlrrrr"),
        )
    if bound is not None:
        rows = [
            [
                r.arm,
                share(r.share_ever_steered),
                num(r.best_of_grid),
                num(r.held_out),
                share(r.steered_where_prompting_steers),
            ]
            for r in bound.itertuples()
        ]
        page.add(
            "What bounds it (`06_bound.csv`):",
            table(
                ["arm", "concepts steered at some eps", "best-of-grid", "held-out", "of the concepts prompting steers"],
                rows,
            ),
        )
    confirmed = page.read(f"{model}/06_confirmed.csv")
    if confirmed is not None:
        rows = []
        for arm in ordered(confirmed.arm):
            part = confirmed[confirmed.arm == arm].set_index("protocol")
            first = part.iloc[0]
            rows.append(
                [arm]
                + [
                    ci(*part.loc[p, ["steerability", "ci_low", "ci_high"]]) if p in part.index else ""
                    for p in ("best_of_grid", "held_out")
                ]
                + [int(first.judge_positive), int(first.labelled), int(first.confirmed)]
            )
        page.add(
            "Confirmed steerability: the judge and a person agree (`06_confirmed.csv`; arms whose judge "
            "positives were not all labelled are lower bounds):",
            table(["arm", "best-of-grid", "held-out", "judge positives", "labelled", "confirmed"], rows),
        )
    page.figure(f"{model}/fig06_window.png", "response profile along the grid")


WINDOW_ARMS = ("attention-soft-rfm", "control-random")  # notebook 07's vector and its random control


def _notebook07(page: Page, model: str) -> None:
    windows = page.read(f"{model}/07_window.csv")
    if windows is None:
        page.missing("07", model)
        return
    page.add("### Notebook 07: the working window (development split)")
    rows = []
    for (window, counting), part in windows.groupby(["window", "counting"], sort=False):
        cells = {(r.arm, r.protocol): ci(r.steerability, r.ci_low, r.ci_high) for r in part.itertuples()}
        rows.append(
            [part.coefficients.iloc[0], counting]
            + [cells.get(key, "") for key in itertools.product(WINDOW_ARMS, ("held_out", "best_of_grid"))]
        )
    page.add(
        "Each window of 4 consecutive eps of the wide grid, scored from the same generations, for the vector and "
        "its random-direction control; an on-concept answer in another script counted or not (`07_window.csv`):",
        table(
            ["eps", "counting", "ours held-out", "ours best-of-grid", "control held-out", "control best-of-grid"],
            rows,
            "llrrrr",
        ),  # fmt: skip
    )
    norms = page.read(f"{model}/07_block_norms.csv")
    if norms is not None:
        steered = norms[norms.block > 0]
        page.add(
            f"The 4 largest dimensions carry {num(steered.top_share.min())}-{num(steered.top_share.max())} of a "
            "steered block's squared hidden-state norm at the training prompts' tail tokens (`07_block_norms.csv`)."
        )
    page.figure(f"{model}/fig07_window.png", "on-concept, coherent and other-script shares along the wide grid")


def _by_setting(frame: pd.DataFrame, lead) -> tuple[list[str], list[list]]:
    """(settings, rows) of a per-(model, protocol, setting) table's all-classes rows: `lead(model, protocol, group)`
    (protocol written 'best-of-grid'), then 'value [low, high]' per setting ('' where a model has none)."""
    part = frame[frame.concept_class == "all"]
    settings = ordered(part.setting)
    rows = []
    for (model, protocol), group in part.groupby(["model", "protocol"], sort=False):
        g = group.set_index("setting")
        rows.append(
            lead(model, protocol.replace("_", "-"), group)
            + [ci(*g.loc[s, ["steerability", "ci_low", "ci_high"]]) if s in g.index else "" for s in settings]
        )
    return settings, rows


def _notebook04(page: Page) -> None:
    prior = page.read("04_prior_vs_ours.csv")
    if prior is None:
        page.missing("04")
        return
    curve = page.read("04_scaling_curve.csv")
    if curve is not None:
        page.figure("fig04_scaling_best_of_grid.png", "steerability against model size")
        settings, rows = _by_setting(
            curve, lambda model, protocol, group: [model, f"{group.n_parameters.iloc[0] / 1e6:.0f}M", protocol]
        )
        page.add(
            "Steerability against model size, beside the negative controls (`04_scaling_curve.csv`); the "
            "prior method's published Llama-3.1-8B point (GPT-4o judge, its own grid) is 0.49 overall:",
            table(["model", "parameters", "protocol"] + settings, rows, "lrl" + "r" * len(settings)),
        )
    comparisons = page.read("04_comparisons.csv")
    if comparisons is not None:
        ran = comparisons[comparisons.missing.fillna("") == ""]
        rows = [
            [r.model, r.comparison, r.protocol.replace("_", "-"), ci(r.diff, r.ci_low, r.ci_high, sign=True),
             pval(r.p_mcnemar)]
            for r in ran.itertuples()
        ]  # fmt: skip
        page.add(
            "The paper's four comparisons per model, b − a paired over the same concepts (`04_comparisons.csv`):",
            table(["model", "comparison", "protocol", "b − a [95% CI]", "McNemar p"], rows, "lllrr"),
        )
    page.figure("fig04_prior_vs_ours_best_of_grid.png", "prior vs ours across models")
    models = page.read("04_models.csv")
    if models is not None:
        rows = [[r.model, int(r.n_blocks), int(r.n_tail), code(r.tail), int(r.n_concepts)] for r in models.itertuples()]
        page.add(
            "Models (`04_models.csv`):",
            table(["model", "blocks", "shared tail tokens", "tail", "concepts"], rows, "lrrlr"),
        )
    settings, rows = _by_setting(prior, lambda model, protocol, group: [model, protocol])
    page.add(
        "Overall steerability per model (`04_prior_vs_ours.csv`):",
        table(["model", "protocol"] + settings, rows, "ll" + "r" * len(settings)),
    )
    gain = page.read("04_soft_label_gain.csv")
    if gain is not None:
        part = gain[gain.concept_class == "all"]
        rows = [
            [r.model, r.protocol.replace("_", "-"), ci(r.diff, r.ci_low, r.ci_high, 3, sign=True), pval(r.p_mcnemar)]
            for r in part.itertuples()
        ]
        page.add(
            "Soft − hard labels at the attention-selected token, paired (`04_soft_label_gain.csv`):",
            table(["model", "protocol", "soft − hard [95% CI]", "McNemar p"], rows, "llrr"),
        )
    depth = page.read("04_enrichment_depth.csv")
    if depth is not None:
        page.figure("fig04_enrichment_depth.png", "enrichment over depth")
        names = ordered(depth.model)
        pivot = depth.pivot(index="depth_bin", columns="model", values="score").sort_index()
        rows = [[num(b)] + [num(pivot.loc[b, m], 3) for m in names] for b in pivot.index]
        page.add(
            "Mean enrichment score per normalised-depth bin (`04_enrichment_depth.csv`, bin centres):",
            table(["depth"] + names, rows),
        )
    working = page.read("04_working_eps.csv")
    if working is not None:
        names = ordered(working.model)
        pivot = working.pivot(index="coefficient", columns="model", values="share").sort_index()
        rows = [[plain(c)] + [share(pivot.loc[c, m]) for m in names] for c in pivot.index]
        page.add(
            "The smallest eps that steered a steered (concept, question) pair, share of such pairs "
            "(`04_working_eps.csv`):",
            table(["eps"] + names, rows),
        )


def _versions(page: Page, models: list[str]) -> None:
    keys = ["dtype", "device", "cpu", "torch", "transformers"]
    rows = []
    for model in models:
        v = page.read(f"{model}/versions.csv")
        if v is not None:
            v = dict(zip(v.package, v.version))
            rows.append([model] + [v.get(k, "") for k in keys])
    if rows:
        page.add(
            "Where the numbers were computed (each model's `versions.csv`):",
            table(["model"] + keys, rows, "l" * (len(keys) + 1)),
        )


def render(
    results_dir: Path | str | None = None, figures_dir: Path | str | None = None, out: Path | str | None = None
) -> str:
    """The page as a string (nothing written)."""
    page = Page(
        paths.RESULTS_DIR if results_dir is None else results_dir,
        paths.FIGURES_DIR if figures_dir is None else figures_dir,
        DEFAULT_OUT if out is None else out,
    )
    page.add(
        "<!-- Generated by `make report` (python -m steer_utils.tools.report) from results/. Do not edit by hand. -->",
        "# Results",
        "*This page is generated by `make report` from the tables in `results/` and must not be edited by "
        "hand: every number on it is read from the CSV named above its table. Rerun `make report` after "
        "`make all`.*",
        "**Steerability** is the share of (concept, question) pairs the judge counts as steered, averaged over "
        "questions, with 95% bootstrap CIs over concepts in brackets. **Best-of-grid**: a question counts when "
        "any coefficient scores. **Held-out**: each concept's coefficient is chosen on some of its questions and "
        "scored on the others. The judge is the offline embedding judge, lenient on real steered responses "
        "([judge.md](judge.md)): read judge-based numbers as upper bounds. What the numbers mean is discussed "
        "in [findings.md](findings.md); how they were made in [pipeline.md](pipeline.md).",
    )
    models = _models(page.results_dir)
    if not models:
        page.add("*No results yet: `make all`.*")
        return page.text()
    _versions(page, models)
    for model in models:
        page.add(f"## {model}")
        _notebook01(page, model)
        _notebook02(page, model)
        _notebook03(page, model)
        _notebook05(page, model)
        _notebook06(page, model)
        _notebook07(page, model)
    page.add("## Across models (notebook 04)")
    _notebook04(page)
    page.add(
        "## Speed",
        "Timings and throughput (`make bench`, `results/bench.csv`) are in "
        "[performance.md](performance.md), with the machine and date they were measured on.",
    )
    return page.text()


def results_digest(results_dir: Path | str | None = None) -> str:
    """A short hash of every results table (`results/**/*.csv` but the machine-dependent bench*.csv and run
    durations): names, bytes."""
    root = Path(paths.RESULTS_DIR if results_dir is None else results_dir)
    digest = hashlib.sha256()
    timings = lambda p: p.name.startswith("bench") or p.name == paths.DURATIONS  # noqa: E731
    for path in sorted(p for p in root.rglob("*.csv") if not timings(p) and "shards" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def findings_digest(findings: Path = FINDINGS) -> str | None:
    """The digest `findings` says it was read against (None: no such line)."""
    match = re.search(re.escape(DIGEST_LINE) + r"`([0-9a-f]+)`", findings.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m steer_utils.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=paths.RESULTS_DIR,
        help="the results tables to read (default: results/, or STEER_RESULTS_DIR)",
    )
    parser.add_argument(
        "--figures-dir",
        type=Path,
        default=paths.FIGURES_DIR,
        help="figures linked where they exist (default: figures/, or STEER_FIGURES_DIR)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the page to write (default: docs/results.md)")
    args = parser.parse_args(argv)
    text = render(args.results_dir, args.figures_dir, args.out)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline="\n"))
    print(f"wrote {args.out}")
    now, read = results_digest(args.results_dir), findings_digest() if FINDINGS.is_file() else None
    if FINDINGS.is_file() and read != now:
        print(
            f"{FINDINGS.relative_to(paths.ROOT)} was read against other results (digest {read}, now {now}): reread "
            f"it against {args.out.name} and update its line '{DIGEST_LINE}`{now}`'.",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

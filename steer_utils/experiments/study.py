"""Notebook 06: which steering protocol works, measured on the development split only.

An *arm* is one way of making and applying a concept vector: a setting (token × labels × method), a `Protocol` and
a training-set size. Each arm differs from the paper's (`PAPER_ARM`) in one factor, so its paired difference
from the paper on the same concepts and questions measures that factor; a second stage combines the levels that
helped. Every arm uses one shared coefficient grid (`GRID`), the same questions and the same judge.

Two generation-free diagnoses say which factor is worth a generation run:
- `separation`: on held-out statements, how well the vector's projection separates this concept's prefixed prompts
  from unprefixed ones and from the prefixed prompts of other concepts of its class (AUC, per block);
- `concept_logprob`: the log-probability of the concept's first token at the first answer position of the
  evaluation questions, as the coefficient grows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from scipy import stats
from tqdm.auto import tqdm

from ..cache import atomic_write, cache_key, entry_path
from ..core import decoding, steering, training, vectors
from ..core.models import attention_implementation
from ..core.prompting import concept_text, prefix_text, render_prompt
from ..core.protocol import PAPER, Protocol
from . import data, evaluation, judge, pipeline
from .profiles import PROFILES

# The study's shared grid (eps, the default profile's): denser than notebook 01's (COEFFICIENTS, which it contains)
# at the small end, where on SmolLM2 the class-contrastive lead peaked (0.03-0.035) before responses turned
# repetitive (0.04 and up) in an exploration on these development concepts.
GRID = PROFILES["default"].study_coefficients
# Levels of the "grid" factor: subsets of the grid, scored from the same generations (those inside a run's grid).
GRID_LEVELS = {
    "2 points": (0.015, 0.035),
    "4 low": (0.01, 0.015, 0.02, 0.025),
    "notebook 01's 4": (0.015, 0.025, 0.035, 0.05),
    "6 points": GRID,
}
STUDY_VERSION = 1  # bump when the diagnoses change, so cached tables are recomputed
HELD_OUT_STATEMENTS = 16  # the statements file's last ones: never training statements of an arm
N_HELD_OUT_CONCEPTS = 3  # other concepts of the class (those before it) the separation is measured against


@dataclass(frozen=True)
class Arm:
    """One factor level: a setting, a protocol and a training-set size (a multiple of the run's statement count)."""

    factor: str
    level: str
    setting: str = training.OURS
    protocol: Protocol = PAPER
    statement_multiple: int = 1

    def statements(self, statements: list[str]) -> list[str]:
        """The arm's training statements: the file's first `statement_multiple × len(statements)`."""
        return (
            statements
            if self.statement_multiple == 1
            else data.load_statements(n=self.statement_multiple * len(statements))
        )

    @property
    def name(self) -> str:
        """The arm's label in tables, e.g. 'contrast: 3'; the paper's arm is 'paper'."""
        return "paper" if self.factor == "paper" else f"{self.factor}: {self.level}"


PAPER_ARM = Arm("paper", "paper")
MEAN_DIFFERENCE = "attention-hard-mean_difference"
ARMS = (
    PAPER_ARM,
    Arm("scaling", "mean norm", protocol=Protocol(scaling="mean_norm")),
    Arm("blocks", "middle half x2", protocol=Protocol(blocks="middle")),
    Arm("positions", "answer only", protocol=Protocol(positions="answer")),
    Arm("system prompt", "empty", protocol=Protocol(system_prompt="empty")),
    Arm("system prompt", "neutral", protocol=Protocol(system_prompt="neutral")),
    Arm("statements", "x3", statement_multiple=3),
    Arm("contrast", "3 concepts", protocol=Protocol(contrast=3)),
    Arm("method", "mean difference", setting=MEAN_DIFFERENCE),
    Arm("method", "mean difference + contrast", setting=MEAN_DIFFERENCE, protocol=Protocol(contrast=3)),
)
# Arms whose concept log-probability is traced (the vectors that differ most; each costs a pass per eps).
LOGPROB_ARMS = ("paper", "contrast: 3 concepts", "method: mean difference", "method: mean difference + contrast")
# Factors a combined arm may take a level from (each level is a Protocol field or the training-set size).
COMBINABLE = ("scaling", "blocks", "positions", "system prompt", "statements", "contrast")


def arm_table(arms=ARMS) -> pd.DataFrame:
    """One row per arm: name, factor, level, setting, protocol and training-set size (× the run's statements)."""
    return pd.DataFrame(
        [
            {
                "arm": a.name,
                "factor": a.factor,
                "level": a.level,
                "setting": a.setting,
                "protocol": a.protocol.name,
                "statement_multiple": a.statement_multiple,
            }
            for a in arms
        ]
    )


def run_arms(context: pipeline.RunContext, sample: pd.DataFrame, arms, grader, coefficients=GRID) -> pd.DataFrame:
    """Every arm × concept × coefficient × question, generated (cached per concept and arm) and judged.

    Arms train on `arm.statements(statements)`. The `arm` column holds the arm's name (what `evaluation` compares,
    `compared="arm"`); `setting` holds the vector's setting.
    """
    parts = []
    for arm in tqdm(list(arms), desc="arms"):
        arm_context = replace(context, statements=arm.statements(context.statements))
        settings = [training.Setting.parse(arm.setting)]
        generations, _ = pipeline.run_concepts(
            arm_context, sample, settings, coefficients=coefficients, protocol=arm.protocol
        )
        parts.append(
            generations.assign(arm=arm.name, factor=arm.factor, level=arm.level)[
                [
                    "concept_class",
                    "concept",
                    "arm",
                    "factor",
                    "level",
                    "setting",
                    "coefficient",
                    "question_id",
                    "question",
                    "response",
                ]
            ]
        )
    return judge.score_generations(grader, pd.concat(parts, ignore_index=True))


def factor_table(scored: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per protocol and arm: steerability over all dev concepts with its CI, and the paired difference from the
    paper's arm (bootstrap CI, McNemar on whether any question steered)."""
    rows = []
    for protocol in evaluation.PROTOCOLS:
        per_concept = evaluation.concept_steerability(scored, protocol=protocol, compared="arm")
        for arm in dict.fromkeys(per_concept.arm):
            part = per_concept[per_concept.arm == arm]
            mean, low, high = evaluation.bootstrap_ci(part.steerability, seed=seed)
            row = {
                "protocol": protocol,
                "arm": arm,
                "steerability": mean,
                "ci_low": low,
                "ci_high": high,
                "n_concepts": len(part),
            }
            if arm != PAPER_ARM.name:
                diff = evaluation.compare(per_concept, PAPER_ARM.name, arm, seed=seed, compared="arm").iloc[-1]
                row |= {
                    "diff": diff["diff"],
                    "diff_low": diff.ci_low,
                    "diff_high": diff.ci_high,
                    "p_mcnemar": diff.p_mcnemar,
                }
            rows.append(row)
    arms = scored.drop_duplicates("arm").set_index("arm")[["factor", "level"]]
    return pd.DataFrame(rows).join(arms, on="arm")[
        [
            "protocol",
            "factor",
            "level",
            "arm",
            "steerability",
            "ci_low",
            "ci_high",
            "diff",
            "diff_low",
            "diff_high",
            "p_mcnemar",
            "n_concepts",
        ]
    ]


def grid_table(scored: pd.DataFrame, arms: list[str], levels=GRID_LEVELS, seed: int = 0) -> pd.DataFrame:
    """The grid factor: each arm's steerability (both protocols, CI) when only a subset of the grid is used."""
    rows, run_grid = [], set(np.round(scored.coefficient.unique(), 9))
    for level, grid in levels.items():
        if not set(np.round(grid, 9)) <= run_grid:
            continue
        subset = scored[
            scored.arm.isin(arms) & np.isclose(scored.coefficient.to_numpy()[:, None], np.array(grid)[None]).any(1)
        ]
        for protocol in evaluation.PROTOCOLS:
            per_concept = evaluation.concept_steerability(subset, protocol=protocol, compared="arm")
            for arm, part in per_concept.groupby("arm", sort=False):
                mean, low, high = evaluation.bootstrap_ci(part.steerability, seed=seed)
                rows.append(
                    {
                        "grid": level,
                        "n_coefficients": len(grid),
                        "protocol": protocol,
                        "arm": arm,
                        "steerability": mean,
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    return pd.DataFrame(rows)


def response_profile(scored: pd.DataFrame) -> pd.DataFrame:
    """Per arm and coefficient: mean judge score, mean coherence and the share of each judge reason."""
    shares = pd.crosstab([scored.arm, scored.coefficient], scored.reason, normalize="index")
    means = scored.groupby(["arm", "coefficient"]).agg(score=("score", "mean"), coherence=("coherence", "mean"))
    order = {a: i for i, a in enumerate(dict.fromkeys(scored.arm))}
    return (
        means.join(shares)
        .reset_index()
        .sort_values(["arm", "coefficient"], key=lambda c: c.map(order) if c.name == "arm" else c, kind="stable")
        .reset_index(drop=True)
    )


def combined_arm(factors: pd.DataFrame, arms=ARMS, protocol: str = "held_out") -> Arm | None:
    """Stage 2: one arm with every combinable factor's level whose held-out difference from the paper is positive
    (the best level per factor); None when fewer than two factors helped (nothing to combine)."""
    rows = factors[(factors.protocol == protocol) & factors.factor.isin(COMBINABLE) & (factors["diff"] > 0)]
    best = rows.sort_values("diff", ascending=False, kind="stable").drop_duplicates("factor")
    if len(best) < 2:
        return None
    by_name = {a.name: a for a in arms}
    fields, multiple = {}, 1
    for name in best.arm:
        arm = by_name[name]
        fields |= arm.protocol.changes()
        multiple = max(multiple, arm.statement_multiple)
    level = " + ".join(f"{by_name[n].factor} {by_name[n].level}" for n in best.arm)
    return Arm("combined", level, protocol=replace(PAPER, **fields), statement_multiple=multiple)


def prompting(context: pipeline.RunContext, sample: pd.DataFrame, grader) -> pd.DataFrame:
    """The upper bound on the same concepts: unsteered answers with the concept prefix in the prompt, judged."""
    rows = [
        (r.concept_class, r.concept, q, text)
        for r in sample.itertuples()
        for q, text in enumerate(context.questions[r.concept_class])
    ]
    messages = [f"{prefix_text(c, x)} {text}" for c, x, _, text in rows]
    responses = decoding.generate(
        context.model, context.tokenizer, messages, None, context.max_new_tokens, stop_loops=context.stop_loops
    )
    table = pd.DataFrame(rows, columns=["concept_class", "concept", "question_id", "question"])
    return judge.score_generations(
        grader,
        table.assign(arm="prompting", factor="reference", level="prompting", coefficient=0.0, response=responses),
    )


def bound_table(scored: pd.DataFrame, prompted: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """What bounds steering: per arm and for prompting, the share of concepts steered on any question at any eps
    (best-of-grid), best-of-grid and held-out steerability, and the share of the concepts that prompting steers
    which the arm steers too."""
    frames = pd.concat([scored[scored.arm.isin(arms)], prompted], ignore_index=True)
    per = {
        p: evaluation.concept_steerability(frames, protocol=p, compared="arm").set_index(evaluation.concept_keys("arm"))
        for p in evaluation.PROTOCOLS
    }
    reachable = per["best_of_grid"].loc["prompting"].steered_any.astype(bool)  # concepts prompting can steer
    rows = []
    for arm in [*arms, "prompting"]:
        best, held = per["best_of_grid"].loc[arm], per["held_out"].loc[arm]
        rows.append(
            {
                "arm": arm,
                "share_ever_steered": best.steered_any.mean(),
                "best_of_grid": best.steerability.mean(),
                "held_out": held.steerability.mean(),
                "steered_where_prompting_steers": best.steered_any[reachable.reindex(best.index)].mean(),
            }
        )
    return pd.DataFrame(rows)


def confirmation(scored: pd.DataFrame, cases: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """`factor_table` on the responses that the judge *and* a person (`cases`) call on-concept, with each arm's
    judge positives, how many a person labelled and confirmed (`judge.confirmation_table`). An arm whose judge
    positives are not all labelled gets a lower bound."""
    confirmed = judge.confirmed_scores(scored, cases)
    counts = judge.confirmation_table(confirmed, compared="arm")
    return factor_table(confirmed, seed).merge(counts, on="arm", how="left")


def choice_table(factors: pd.DataFrame) -> pd.DataFrame:
    """Arms ranked by held-out dev steerability; ties by best-of-grid steerability, then the paper's arm and the
    study's order first. `rank` 1 is the chosen arm, 2 the runner-up."""
    best = factors[factors.protocol == "best_of_grid"].set_index("arm").steerability.rename("best_of_grid")
    rows = (
        factors[factors.protocol == "held_out"].join(best, on="arm").assign(not_paper=lambda t: t.arm != PAPER_ARM.name)
    )
    ranked = rows.sort_values(
        ["steerability", "best_of_grid", "not_paper"], ascending=[False, False, True], kind="stable"
    )
    return ranked.drop(columns="not_paper").assign(rank=range(1, len(ranked) + 1)).reset_index(drop=True)


# --- generation-free diagnoses ---------------------------------------------------------------------------------
def _auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive projects above a negative), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    u = stats.mannwhitneyu(positive, negative, alternative="two-sided").statistic
    return float(u / (len(positive) * len(negative)))


def fit_arm(
    model, tokenizer, model_name: str, concept_class: str, concept: str, statements: list[str], arm: Arm, seed: int = 0
) -> tuple[vectors.ConceptVector, pd.DataFrame]:
    """The arm's concept vector for one concept, trained on `statements`, and its per-block fit table."""
    acts = pipeline.concept_activations(
        model, tokenizer, model_name, concept_class, concept, statements, protocol=arm.protocol
    )
    return pipeline.fit_setting(acts, training.Setting.parse(arm.setting), model_name, seed)


def separation(
    model,
    tokenizer,
    model_name: str,
    concept_class: str,
    concept: str,
    vector: vectors.ConceptVector,
    fit: pd.DataFrame,
    held_out: list[str],
    protocol: Protocol = PAPER,
) -> pd.DataFrame:
    """Per block: AUC of the vector's projection (at the fit's selected token) separating this concept's prefixed
    prompts of `held_out` statements from their unprefixed prompts (`auc_unprefixed`) and from the prefixed prompts
    of the N_HELD_OUT_CONCEPTS concepts before it in the class list (`auc_class`; never contrast negatives)."""
    plain = replace(protocol, contrast=0)  # the system prompt the vector was trained with, no contrast prompts
    test = pipeline.concept_activations(model, tokenizer, model_name, concept_class, concept, held_out, protocol=plain)
    others = [
        pipeline.concept_activations(
            model, tokenizer, model_name, concept_class, other, held_out, protocol=plain
        ).prefixed.hidden
        for other in data.neighbour_concepts(concept_class, concept, N_HELD_OUT_CONCEPTS, after=False)
    ]
    chosen = torch.tensor(fit.selected.to_numpy())
    directions = torch.stack([vector.directions[b] for b in range(len(chosen))])  # (n_blocks, d)

    def project(hidden: torch.Tensor) -> np.ndarray:  # (n, n_blocks, n_tail, d) -> (n, n_blocks)
        return torch.einsum("nbd,bd->nb", training.gather_selected(hidden, chosen), directions).numpy()

    pos, plain_neg = project(test.prefixed.hidden), project(test.unprefixed.hidden)
    class_neg = np.concatenate([project(h) for h in others])
    blocks = range(len(chosen))
    return pd.DataFrame(
        {
            "concept_class": concept_class,
            "concept": concept,
            "block": blocks,
            "auc_unprefixed": [_auc(pos[:, b], plain_neg[:, b]) for b in blocks],
            "auc_class": [_auc(pos[:, b], class_neg[:, b]) for b in blocks],
        }
    )


def concept_token_ids(tokenizer, concept_class: str, concept: str) -> list[int]:
    """The first token of the concept as it would start a word of the answer (' heights', 'Heights', ...)."""
    text = concept_text(concept_class, concept)
    variants = {text, " " + text, text[:1].upper() + text[1:], " " + text[:1].upper() + text[1:]}
    return sorted({tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in variants})


@torch.inference_mode()
def concept_logprob(
    model,
    tokenizer,
    concept_class: str,
    concept: str,
    vector: vectors.ConceptVector,
    questions: list[str],
    protocol: Protocol = PAPER,
    coefficients=GRID,
) -> pd.DataFrame:
    """Per coefficient (0 = unsteered) and question: log-probability that the first answer token starts the
    concept's name (the best of its spellings), with the vector applied as `protocol` applies it in generation."""
    blocks, multiplier = protocol.steered_blocks(len(steering.find_blocks(model)))
    vector = vector.scaled(protocol.scaling, blocks)
    targets = concept_token_ids(tokenizer, concept_class, concept)
    prompts = [render_prompt(tokenizer, q, protocol.system) for q in questions]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0).to(device),
    }  # as `generate` does
    rows = []
    for c in (0.0, *coefficients):
        additions = vectors.steering_additions([vector] * len(prompts), [c * multiplier] * len(prompts), blocks)
        with attention_implementation(model, "sdpa"), steering.steer(model, additions, protocol.positions):
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()  # (q, vocab): the first answer token
        best = torch.log_softmax(logits, -1)[:, targets].amax(-1)  # (q,)
        rows += [
            {
                "concept_class": concept_class,
                "concept": concept,
                "coefficient": c,
                "question_id": q,
                "logprob": float(best[q]),
            }
            for q in range(len(prompts))
        ]
    return pd.DataFrame(rows)


def _diagnose_concept(
    model,
    tokenizer,
    model_name: str,
    concept_class: str,
    concept: str,
    statements: list[str],
    held_out: list[str],
    questions: list[str],
    arms,
    coefficients,
    logprob_arms,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`diagnose` for one concept: (separation rows, log-probability rows)."""
    separations, logprobs, fitted = [], [], {}
    for arm in arms:
        used = arm.statements(statements)
        training = (arm.setting, arm.protocol.system_prompt, arm.protocol.contrast, len(used))
        if training not in fitted:  # arms that only apply a vector differently share its fit and separation
            fitted[training] = fit_arm(model, tokenizer, model_name, concept_class, concept, used, arm, seed)
            separations.append(
                separation(
                    model, tokenizer, model_name, concept_class, concept, *fitted[training], held_out, arm.protocol
                ).assign(arm=arm.name)
            )
        if arm.name in logprob_arms:
            logprobs.append(
                concept_logprob(
                    model, tokenizer, concept_class, concept, fitted[training][0], questions, arm.protocol, coefficients
                ).assign(arm=arm.name)
            )
    empty = pd.DataFrame(columns=["concept_class", "concept", "coefficient", "question_id", "logprob", "arm"])
    return pd.concat(separations, ignore_index=True), pd.concat(logprobs, ignore_index=True) if logprobs else empty


def diagnose(
    context: pipeline.RunContext,
    sample: pd.DataFrame,
    held_out: list[str],
    arms,
    coefficients=GRID,
    logprob_arms=LOGPROB_ARMS,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`separation` for each arm that trains its own vector and `concept_logprob` for the arms named in
    `logprob_arms` (a forward pass per coefficient costs about half a generation here), over a concept sample:
    (separation per arm × concept × block, log-probabilities per arm × concept × coefficient × question).

    Arms that only apply the paper's vector differently (scaling, blocks, positions) share its fit and separation.
    Each concept's tables are cached (cache/study/), so an interrupted run resumes.
    """
    model, tokenizer, model_name, statements = context.model, context.tokenizer, context.model_name, context.statements
    questions, seed = context.questions, context.seed
    overlap = set(held_out) & set(max((a.statements(statements) for a in arms), key=len))
    if overlap:
        raise ValueError(
            f"{len(overlap)} held-out statements are also training statements of an arm; hold out "
            "statements after the largest training set (e.g. the file's last ones)."
        )
    separations, logprobs = [], []
    for row in tqdm(list(sample.itertuples()), desc="diagnosis"):
        key = cache_key(
            "study",
            STUDY_VERSION,
            model=model_name,
            dtype=str(next(model.parameters()).dtype),
            concept=[row.concept_class, row.concept],
            arms=[repr(a) for a in arms],
            statements=[hashlib.sha256("\n".join(s).encode()).hexdigest() for s in (statements, held_out)],
            questions=questions[row.concept_class],
            coefficients=list(coefficients),
            logprob_arms=list(logprob_arms),
            seed=seed,
        )
        paths = (
            entry_path("study", key, ".separation.csv", model_name),
            entry_path("study", key, ".logprob.csv", model_name),
        )
        if not paths[1].exists():  # written last: marks the concept done
            parts = _diagnose_concept(
                model,
                tokenizer,
                model_name,
                row.concept_class,
                row.concept,
                statements,
                held_out,
                questions[row.concept_class],
                arms,
                coefficients,
                logprob_arms,
                seed,
            )
            for path, part in zip(paths, parts):
                atomic_write(path, lambda tmp: part.to_csv(tmp, index=False))
        separations.append(pd.read_csv(paths[0]))
        logprobs.append(pd.read_csv(paths[1]))
    return pd.concat(separations, ignore_index=True), pd.concat(logprobs, ignore_index=True)


def separation_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per arm: mean AUC over concepts and blocks (all but the first), and over the middle third of the blocks."""
    steered = table[table.block > 0]
    n_blocks = table.block.max() + 1
    middle = steered[steered.block.between(n_blocks / 3, 2 * n_blocks / 3)]
    order = list(dict.fromkeys(table.arm))
    return (
        steered.groupby("arm")[["auc_unprefixed", "auc_class"]]
        .mean()
        .join(middle.groupby("arm")[["auc_class"]].mean().rename(columns={"auc_class": "auc_class_middle"}))
        .loc[order]
        .reset_index()
    )

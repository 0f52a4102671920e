"""Validate the LLM judge against the hand labels and choose its calibration on the dev halves only.

    python -m steer_utils.experiments.judge_validation  # (make judge) P(yes) of every case (cached), choice, tables
    python -m steer_utils.experiments.judge_validation draw --round 4 --out sheet.csv [--steered-model MODEL]
    python -m steer_utils.experiments.judge_validation confirm --round 5 --model MODEL --out sheet.csv
    python -m steer_utils.experiments.judge_validation add --round 4 --out sheet.csv --labels labels.csv
    python -m steer_utils.experiments.judge_validation rejudge  # (make rejudge) every stored response, resumable

Every case of data/judge_cases.jsonl gets both judges' columns (`LLMJudge.score_table` with no calibration: P(yes)
for all). The candidate calibrations (a threshold on P(yes); the same behind the embedding judge's coherence gate; a
logistic model over P(yes), relevance, rank and coherence, with and without the gate) are fitted on the dev halves,
and the one with the highest plateau kappa is written to data/judge_calibration.json, unless the committed one was
chosen on the same dev labels (then it is kept; `--refit` chooses again). Only then are the test halves read:
results/judge/validation.csv (per round, source, split and class, both judges) and docs/judge.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..cache import atomic_write, write_csv
from ..core.decoding import generate_reference
from ..core.models import cpu_name, load_model
from ..core.training import OURS, train
from ..paths import JUDGE_CALIBRATION_FILE, JUDGE_CASES_FILE, RESULTS_DIR, ROOT, model_slug
from .data import development_concepts, load_questions, load_statements
from .judge import agreement, judge_cases, load_cases, load_judge, score_generations
from .llm_judge import JUDGE_DTYPE, JUDGE_MODEL, MEMO_KEYS, PROMPT_VERSION, Calibration, fit_logistic, gate_mask
from .pipeline import CONTROLS, contrast_concepts
from .profiles import PROFILES

# The source of a round drawn from the judge's own verdicts (`confirm`: every judge positive): it measures the judge's
# precision on what it found, but its share of positives is the judge's choice, so no calibration is fitted on it and
# the pooled agreement of the `generated` rounds leaves it out.
CONFIRMATION = "confirmation"


def metrics(labels, predictions) -> dict:
    """n, accuracy, Cohen's kappa, precision and recall of 0/1 predictions against 0/1 labels."""
    y, p = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    positives, on = p == 1, y == 1
    return {
        **agreement(y, p),
        "precision": float(y[positives].mean()) if positives.any() else float("nan"),
        "recall": float(p[on].mean()) if on.any() else float("nan"),
    }


# Thresholds are chosen on a grid, by Cohen's kappa averaged over a window around each cut: dev kappa is flat over a
# wide range of cuts (0.60-0.65 from 0.3 to 0.5 for the committed logistic model), so its single highest point moves
# with tiny changes of P(yes) (bf16 on another CPU: mean |change| under 0.01), while the window's mean does not.
CUTS = np.round(np.arange(0.0, 1.0, 0.01), 2)  # candidate thresholds
PLATEAU = 5  # cuts on each side of a threshold whose kappa is averaged with it (+-0.05)


def kappa_curve(probability: np.ndarray, labels, passed: np.ndarray) -> np.ndarray:
    """Kappa of `passed & (probability > cut)` against `labels`, per cut of `CUTS`."""
    return np.array([agreement(labels, passed & (probability > t))["kappa"] for t in CUTS])


def best_threshold(probability: np.ndarray, labels, passed: np.ndarray) -> tuple[float, float, float]:
    """(threshold, kappa there, plateau kappa): the cut of `CUTS` whose window of +-`PLATEAU` cuts has the highest
    mean kappa (ties: the lowest cut)."""
    kappa = kappa_curve(probability, labels, passed)
    padded = np.pad(kappa, PLATEAU, mode="edge")  # the window at either end repeats the end's kappa
    plateau = np.convolve(padded, np.ones(2 * PLATEAU + 1) / (2 * PLATEAU + 1), mode="valid")
    best = int(np.argmax(plateau))
    return float(CUTS[best]), float(kappa[best]), float(plateau[best])


def dev_halves(cases: pd.DataFrame) -> pd.DataFrame:
    """The cases a calibration is fitted on: the dev halves of every round but the confirmation rounds."""
    return cases[(cases.split == "dev") & (cases.source != CONFIRMATION)].reset_index(drop=True)


def dev_digest(dev: pd.DataFrame) -> str:
    """A digest of the dev-half labels (each case's class, concept, question, response and label), order-free: a
    calibration records the digest of the cases it was chosen on."""
    keys = dev[["concept_class", "concept", "question", "response", "label"]].astype(str).agg("\x1f".join, axis=1)
    return hashlib.sha256("\x1e".join(sorted(keys)).encode("utf-8")).hexdigest()[:16]


def candidates(dev: pd.DataFrame) -> list[tuple[str, Calibration, float, float]]:
    """(name, calibration, dev kappa, plateau kappa) for every candidate, each fitted on `dev` alone."""
    out = []
    for gate in (False, True):
        base = Calibration(gate=gate)
        passed = gate_mask(dev) if gate else np.ones(len(dev), dtype=bool)
        threshold, kappa, plateau = best_threshold(base.probability(dev), dev.label, passed)
        out.append((f"P(yes){' + gate' if gate else ''}", replace(base, threshold=threshold), kappa, plateau))
        fitted = Calibration(gate=gate, weights=fit_logistic(dev[passed], dev.label[passed]))
        threshold, kappa, plateau = best_threshold(fitted.probability(dev), dev.label, passed)
        out.append((f"logistic{' + gate' if gate else ''}", replace(fitted, threshold=threshold), kappa, plateau))
    return out


def choose(judged: pd.DataFrame, dtype: str, kept: Calibration | None = None) -> tuple[Calibration, pd.DataFrame, bool]:
    """The candidate with the highest plateau kappa on the pooled dev halves (P(yes) of the judge model in `dtype`),
    a table of every candidate's dev kappa, and whether `kept` was kept instead: a calibration chosen for this judge
    model, precision and prompt on the same dev labels is not chosen again (the choice is made once, on dev data;
    rerunning the validation on another CPU must not move it)."""
    dev = dev_halves(judged)
    digest = dev_digest(dev)
    found = candidates(dev)
    table = pd.DataFrame(
        [{"calibration": n, "dev_kappa": k, "plateau_kappa": w, "threshold": c.threshold} for n, c, k, w in found]
    )
    if kept is not None and kept.fits(JUDGE_MODEL, dtype) and kept.dev_cases == digest:
        return kept, table, True
    name, best, kappa, plateau = max(found, key=lambda f: f[3])
    chosen_on = f"{name}: highest plateau kappa ({plateau:.3f}; {kappa:.3f} at its threshold) on the {len(dev)} "
    chosen_on += f"dev-half cases of {JUDGE_MODEL}'s P(yes) ({dtype})"
    chosen = replace(best, chosen_on=chosen_on, model=JUDGE_MODEL, dtype=dtype, prompt_version=PROMPT_VERSION)
    return replace(chosen, dev_cases=digest), table, False


def validation_rows(judged: pd.DataFrame) -> pd.DataFrame:
    """Both judges against the labels per (round, source, split), per class on the test halves, and pooled."""
    groups = {("round", "source", "split"): judged}
    test = judged[judged.split == "test"]
    groups[("source", "concept_class")] = test.assign(split="test")
    real = test[test.source == "generated"]
    rows = []
    for keys, frame in groups.items():
        for values, part in frame.groupby(list(keys)):
            for judge_name, column in (("embedding", "embedding_score"), ("llm", "score")):
                rows.append({**dict(zip(keys, values)), "judge": judge_name, **metrics(part.label, part[column])})
    for judge_name, column in (("embedding", "embedding_score"), ("llm", "score")):
        rows.append({"round": "all", "source": "generated", "split": "test", "judge": judge_name,
                     **metrics(real.label, real[column])})  # fmt: skip
    return pd.DataFrame(rows)


# The order the stored generations are re-judged in: the headline notebooks first, so a partial run serves them.
REJUDGE_ORDER = ("01", "05", "02", "03", "06")


def generation_files(results: Path = RESULTS_DIR) -> list[Path]:
    """Every committed generations table (results/<model>/[<variant>/]0*_generations.csv), in `REJUDGE_ORDER`,
    the adopted protocol's before the variants'."""
    paths = sorted(results.glob("*/0*_generations.csv")) + sorted(results.glob("*/*/0*_generations.csv"))
    rank = {n: i for i, n in enumerate(REJUDGE_ORDER)}
    return sorted(paths, key=lambda p: (rank.get(p.name[:2], len(rank)), len(p.parts)))


def rejudge(results: Path = RESULTS_DIR) -> int:
    """Fill the LLM judge's P(yes) memo for every stored response its calibration asks it about (the gate's passes),
    file by file: nothing is regenerated, and a stopped run resumes from the memo."""
    grader = load_judge("llm")
    files = generation_files(results)
    for i, path in enumerate(files, 1):
        frame = pd.read_csv(path, keep_default_na=False)
        shown = gate_mask(frame) if grader.calibration.gate else np.ones(len(frame), dtype=bool)
        for concept_class, rows in frame.groupby("concept_class", sort=False):
            asked = (rows.concept.tolist(), rows.question.tolist(), rows.response.tolist())
            grader.cached_p_yes(concept_class, *asked, shown[rows.index.to_numpy()])
        print(f"{i}/{len(files)} {path.relative_to(results)}: {int(shown.sum())} of {len(frame)} asked", flush=True)
    return 0


def stored_generations(results: Path = RESULTS_DIR) -> pd.DataFrame:
    """Every committed steered response (results/<model>/[<variant>/]0*_generations.csv): model, notebook, class,
    concept, question, response and the embedding judge's stored verdict (`embedding_score`); one row per (concept,
    response), as the cases file keys its labels, at most 60 words (the rubric's span)."""
    parts = []
    for path in generation_files(results):
        model = path.relative_to(results).parts[0]
        frame = pd.read_csv(path, keep_default_na=False)
        if "embedding_score" not in frame:  # judged by the embedding judge alone: its verdict is `score`
            frame = frame.rename(columns={"score": "embedding_score"})
        frame = frame[["concept_class", "concept", "question", "response", "embedding_score"]]
        parts.append(frame.assign(model=model, notebook=path.name[:2]))
    stored = pd.concat(parts, ignore_index=True).drop_duplicates(["concept", "response"])
    return stored[stored.response.str.split().str.len().between(1, 60)].reset_index(drop=True)


def steered_answers(
    model_name: str, coefficients: tuple[float, ...], n_questions: int, max_new_tokens: int = 50
) -> pd.DataFrame:
    """Answers of `model_name` steered as the public API steers (`training.train` under the adopted protocol with the
    default statements, `apply`, one greedy `model.generate` per answer) towards the first development concept of
    each class, for its first `n_questions` questions at each coefficient."""
    model, tokenizer, _ = load_model(model_name)
    statements = load_statements(n=PROFILES["default"].n_statements)
    rows = []
    for concept in tqdm(development_concepts(1).itertuples(), total=5, desc=f"steering {model_name}"):
        contrast = contrast_concepts(concept.concept_class, concept.concept)
        vector = train(model, tokenizer, concept.concept_class, concept.concept, statements, contrast=contrast)
        for question in load_questions()[concept.concept_class][:n_questions]:
            for c in coefficients:
                with vector.apply(model, c):
                    answer = generate_reference(  # decoded in full, as the labelled rounds were
                        model, tokenizer, [question], max_new_tokens=max_new_tokens, stop_loops=False
                    )[0]
                rows.append(dict(concept._asdict(), question=question, coefficient=c, response=answer.strip()))
    return pd.DataFrame(rows)[["concept_class", "concept", "question", "coefficient", "response"]]


def draw_round(pool: pd.DataFrame, per_cell: int, seed: int) -> pd.DataFrame:
    """A seeded draw of `per_cell` rows per (class, embedding verdict, LLM verdict), short cells topped up from the
    rest of their class, shuffled; `pool` has both judges' `embedding_score` and `score` and no labelled response."""
    rng = np.random.default_rng(seed)
    picked = []
    for _, cell in pool.groupby(["concept_class", "embedding_score", "score"]):
        picked += list(rng.choice(cell.index.to_numpy(), size=min(per_cell, len(cell)), replace=False))
    for concept_class, rows in pool.groupby("concept_class"):
        short = per_cell * 4 - len(set(picked) & set(rows.index))
        rest = rows.index.difference(picked).to_numpy()
        if short > 0 and len(rest):
            picked += list(rng.choice(rest, size=min(short, len(rest)), replace=False))
    return pool.loc[rng.permutation(picked)].reset_index(drop=True)


def confirmation_sheet(
    generations: pd.DataFrame, labelled: set[str], setting: str, n_negatives: int, seed: int
) -> pd.DataFrame:
    """The responses to label so that a judge's steerability of `setting` can be confirmed by a person: every judge
    positive (`score` 1) of `setting` and of the negative controls, and a seeded draw of `n_negatives` judge negatives
    of `setting` (the judge's misses), none already `labelled`, one row per (concept, response), shuffled."""
    rows = generations[~generations.response.isin(labelled) & (generations.response.str.strip() != "")]
    positives = rows[(rows.score == 1) & rows.setting.isin([setting, *CONTROLS])].drop_duplicates(
        ["concept", "response"]
    )
    positive_pairs = set(zip(positives.concept, positives.response))
    negatives = rows[(rows.score == 0) & (rows.setting == setting)].drop_duplicates(["concept", "response"])
    negatives = negatives[[pair not in positive_pairs for pair in zip(negatives.concept, negatives.response)]]
    rng = np.random.default_rng(seed)
    drawn = rng.choice(negatives.index.to_numpy(), size=min(n_negatives, len(negatives)), replace=False)
    sheet = pd.concat([positives, negatives.loc[drawn]])
    return sheet.loc[rng.permutation(sheet.index.to_numpy())].reset_index(drop=True)


def split_of(response: str) -> str:
    """A labelled response's half, from a hash of its text: `dev` (choices may be made on it) or `test`."""
    return "dev" if hashlib.sha256(response.encode()).digest()[0] % 2 == 0 else "test"


def add_round(sheet: Path, labels: Path, round_: int, cases_file: Path = JUDGE_CASES_FILE) -> int:
    """Append a labelled sheet to the cases file: its rows with the person's `label`, `kind` and `language`, the
    drawn response's `model`, its source from the sheet's key (`generated`, or `confirmation` for a `confirm` sheet),
    `round_`, and the half `split_of` its text. Returns rows added."""
    drawn = pd.read_csv(sheet, keep_default_na=False).merge(pd.read_csv(labels, keep_default_na=False), on="id")
    key = pd.read_csv(sheet.with_suffix(".key.csv"), keep_default_na=False)
    key = key.assign(source=key.get("source", "generated"))[["id", "model", "source"]]
    drawn = drawn.merge(key, on="id")
    known = load_cases(cases_file)
    if set(drawn.response) & set(known.response) or len(drawn) != len(pd.read_csv(sheet)):
        raise ValueError(f"{labels} must label every row of {sheet} once, and none of them may be labelled already.")
    lines = [
        json.dumps(
            {
                "concept_class": row.concept_class,
                "concept": row.concept,
                "question": row.question,
                "response": row.response,
                "label": int(row.label),
                "kind": row.kind,
                "split": split_of(row.response),
                "source": row.source,
                "round": round_,
                "model": row.model,
                "language": row.language,
            },
            ensure_ascii=False,
        )
        for row in drawn.itertuples()
    ]
    text = Path(cases_file).read_text(encoding="utf-8") + "\n".join(lines) + "\n"
    atomic_write(Path(cases_file), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return len(lines)


def _markdown(frame: pd.DataFrame) -> str:
    """A pipe table of `frame` (numbers to 2 decimals; — where undefined, e.g. recall with no positive label)."""
    cells = frame.map(lambda v: ("—" if np.isnan(v) else f"{v:.2f}") if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells.to_numpy()])


def side_by_side(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per `keys`: n, then kappa / precision / recall of the embedding judge and of the LLM judge."""
    wide = rows.pivot_table(index=keys, columns="judge", values=["kappa", "precision", "recall"], aggfunc="first")
    wide.columns = [f"{judge} {metric}" for metric, judge in wide.columns]
    n = rows[rows.judge == "llm"].set_index(keys).n
    order = [f"{j} {m}" for j in ("embedding", "llm") for m in ("kappa", "precision", "recall")]
    return wide[order].join(n).reset_index()[keys + ["n"] + order]


# What each round of hand labels holds (data/judge_cases.jsonl, `round`; round 1 also has the written cases).
ROUNDS = {
    1: "SmolLM2, notebook 06's arms on the development split, drawn as they came",
    2: "SmolLM2, notebook 06's contrastive, paper and difference-of-means arms, mostly embedding-judge positives",
    3: "SmolLM2, notebook 01's attention-soft-rfm (adopted protocol), per class 12 embedding-judge positives and 4 "
    "negatives, seeded",
    4: "both bundled small models' stored generations (every notebook), seeded, stratified by class and both judges' "
    "verdicts; plus Qwen2.5-Coder-0.5B answers steered through the public API on development concepts",
    5: "a confirmation round: Qwen2.5-Coder-0.5B, notebook 01 (default profile), every LLM-judge positive of "
    "attention-soft-rfm and of the negative controls, and 40 seeded judge negatives of attention-soft-rfm; labelled "
    "blind in two sheets (the second, of judge positives only, holds those the first sheet's draw had left out)",
    6: "a confirmation round: Qwen2.5-Coder-1.5B, notebook 01 (compact profile), every LLM-judge positive of "
    "attention-soft-rfm and of the negative controls (the controls had none), and 40 seeded judge negatives of "
    "attention-soft-rfm; labelled blind in one sheet",
}


def _summary(rows: pd.DataFrame) -> str:
    """One sentence per judge: its kappa, precision and recall on the real rounds' test halves together."""
    pooled = rows[(rows["round"] == "all") & (rows.split == "test")].set_index("judge")
    return "; ".join(
        f"the {j} judge kappa {pooled.kappa[j]:.2f}, precision {pooled.precision[j]:.2f}, recall {pooled.recall[j]:.2f}"
        for j in ("llm", "embedding")
    )


def _run_cpu(path: Path) -> str:
    """The CPU that ran the notebook which wrote a generations table (its folder's durations.csv), if recorded."""
    durations = path.parent / "durations.csv"
    if durations.is_file():
        rows = pd.read_csv(durations)
        cpu = rows.cpu[rows.notebook.str[:2] == path.name[:2]]
        if len(cpu):
            return str(cpu.iloc[-1])
    return "a CPU not recorded"


def stored_p_yes(judged: pd.DataFrame, calibration: Calibration, results: Path = RESULTS_DIR) -> pd.DataFrame:
    """How this run's P(yes) of the hand-labelled cases compares with the P(yes) the committed notebooks stored for
    the same responses, per CPU that ran those notebooks: n, mean and largest absolute difference, and the verdicts
    `calibration` changes between the two."""
    keys = MEMO_KEYS  # what a P(yes) belongs to
    parts = []
    for path in generation_files(results):
        frame = pd.read_csv(path, keep_default_na=False)
        if "p_yes" in frame:
            parts.append(frame[keys + ["p_yes"]].assign(cpu=_run_cpu(path)))
    if not parts:
        return pd.DataFrame(columns=["cpu", "n", "mean", "max", "flips"])
    stored = pd.concat(parts, ignore_index=True)
    stored = stored[stored.p_yes.astype(str) != ""].astype({"p_yes": float}).drop_duplicates(keys)
    both = judged.drop_duplicates(keys).merge(stored, on=keys, suffixes=("", "_stored"))
    both["difference"] = (both.p_yes - both.p_yes_stored).abs()
    both["flip"] = calibration.verdict(both) != calibration.verdict(both.assign(p_yes=both.p_yes_stored))
    return (
        both.groupby("cpu")
        .agg(n=("flip", "size"), mean=("difference", "mean"), max=("difference", "max"), flips=("flip", "sum"))
        .reset_index()
    )


def write_docs(
    rows: pd.DataFrame, choices: pd.DataFrame, calibration: Calibration, kept: bool, reproduced: pd.DataFrame
) -> str:
    """docs/judge.md from the validation tables (generated: edit this function, not the file)."""
    rounds = rows[rows.concept_class.isna() & (rows.split == "test")].astype({"round": str})
    by_round = side_by_side(rounds, ["round", "source"])
    by_class = side_by_side(rows[rows.concept_class.notna()], ["source", "concept_class"])
    n_real = int(rounds[(rounds["round"] == "all") & (rounds.judge == "llm")].n.iloc[0])
    text = f"""# The judge

<!-- Generated by `make judge` (steer_utils/experiments/judge_validation.py); edit that module, not this file. -->

The paper's judge is GPT-4o; ours is offline. Two judges share one API (`experiments.judge.load_judge`):

- **`embedding`**: all-MiniLM-L6-v2 sentence embeddings. The intended concept is ranked among all concepts of its
  class by similarity to the response, above a relevance floor, and the text must pass coherence (repetition,
  distinct words, gibberish) and non-answer checks. Each part is a column (`relevance`, `concept_rank`,
  `coherence`, `reason`).
- **`llm`**: `load_judge("llm", model=...)` over any causal LM (a bundled name, a Hugging Face id, a local folder or
  a `.gguf`), by default the bundled Qwen2.5-Coder-1.5B-Instruct. It is asked, under a rubric written per concept
  class (`experiments.llm_judge.CLASS_RUBRICS`), whether the answer takes on the concept; the verdict is read from
  the next-token probability of "Yes" against "No" (`p_yes`), deterministic. The instructions are one token prefix
  per class, computed once and shared by every response of the class; responses are batched. The embedding judge's
  columns stay in its table (`embedding_score` keeps that judge's verdict) and its coherence and non-answer checks
  may gate the LLM (a gated-out response is 0 and never reaches the LLM). The judge model runs in
  {calibration.dtype or "its default precision"} on every device (`llm_judge.JUDGE_DTYPE`: three times fp32's
  rate on CPUs with bf16 units, see docs/performance.md); the calibration is chosen for that precision and is keyed
  by it, with the model and the prompt version.

**Held out, on the real responses' test halves ({n_real} cases):** {_summary(rows)}. Targets: kappa ≥ 0.7,
precision ≥ 0.8, recall ≥ 0.6.

**Answers in another language.** The rubric asks whether the answer takes on the concept and says nothing about
language, so an on-concept answer in Chinese to an English question is judged on-concept (steered models drift into
another language at high eps). Notebook 07 reports steerability both ways (`window.COUNTINGS`: as judged, and with
answers mostly outside the Latin script counted as not steered) and chooses a model's window on the stricter count.

The Qwen2.5-Coder models' results and every notebook 07 are judged by the LLM judge. SmolLM2's and Gemma's committed
notebooks 01-06 still carry the embedding judge's verdicts; until they are rerun (`make rejudge` first asks the LLM
judge about every stored response its gate lets through, into a memo that a stopped run resumes from; `make bench`'s
judge section gives the cost), read them with the embedding judge's precision below.

**Confirmation rounds** (source `confirmation`, `judge_validation confirm`) are drawn from the judge's own verdicts:
every response the judge called on-concept in one model's notebook 01 (ours and the negative controls) and a seeded
draw of its negatives, shuffled and labelled blind. Their precision is the share of the judge's finds a person
confirms, which notebook 04 turns into person-checked steerability (`scaling.person_checked`). Because the judge
chose their mix of positives, no calibration is fitted on them and the pooled `all` row leaves them out.

## How its verdict was chosen (dev halves only)

Every hand-labelled case in `data/judge_cases.jsonl` carries a `split`, dev or test (for rounds 1-3 as drawn; from
round 4 on, a hash of the response: `judge_validation.split_of`). Each candidate below was fitted on the dev halves
alone (thresholds on a grid of cuts for the highest Cohen's kappa averaged over +-0.05, `plateau_kappa`; the logistic
model over logit P(yes), relevance, log rank and coherence on dev labels), and the one with the highest plateau kappa
is the default (`data/judge_calibration.json`):

{_markdown(choices)}

Chosen: **{calibration.chosen_on}** (threshold {calibration.threshold:.3f}, gate {"on" if calibration.gate else "off"}).
{_kept_note(calibration, choices, kept, reproduced)}

## Held-out agreement with people (test halves)

Each round of generated responses was labelled by hand with the rubric (on the specific concept, answers the
question, coherent; a sentence looped three times or more is 0); from round 4 on blind, from a sheet with every
judge's column removed (`draw` and `confirm` write the verdicts to a separate key file). Round 1's written
cases were written to test the judge (paraphrases as hard positives; other concepts, antonyms, generic answers,
loops, gibberish with the concept word and refusals as hard negatives). `all` pools the generated rounds.

{_markdown(pd.DataFrame({"round": list(ROUNDS), "generated responses": list(ROUNDS.values())}))}

{_markdown(by_round)}

By class, test halves:

{_markdown(by_class)}

— : undefined (no positive label, so no recall; or no positive verdict, so no precision).
`results/judge/validation.csv` holds every row, dev halves and accuracy included.
"""
    (ROOT / "docs" / "judge.md").write_text(text, encoding="utf-8")
    return text


def _kept_note(calibration: Calibration, choices: pd.DataFrame, kept: bool, reproduced: pd.DataFrame) -> str:
    """What docs/judge.md says about where this page's P(yes) came from and whether the calibration was kept."""
    note = f"The P(yes) on this page were computed on {cpu_name()}."
    for row in reproduced.itertuples():
        note += (
            f" For the {row.n} cases whose response a committed notebook run on {row.cpu} also judged, they differ from"
            f" that run's stored P(yes) by {row.mean:.4f} on average and {row.max:.3f} at most, which changes"
            f" {row.flips} verdict(s)."
        )
    note += " Thresholds are chosen on a grid by the mean kappa over +-0.05 around each cut (the plateau): the dev"
    note += " kappa is flat over a wide range of cuts, and its single highest point moves with P(yes) differences of"
    note += " that size."
    if kept:
        note += (
            f" The calibration above was **kept**, not chosen again: the dev halves are those it was chosen on (digest"
            f" `{calibration.dev_cases}`), so `make judge` only re-measures it; new dev labels, or `make judge"
            " REFIT=1`, choose again."
        )
        best = choices.loc[choices.plateau_kappa.idxmax()]
        if (
            not calibration.chosen_on.startswith(f"{best.calibration}:")
            or abs(best.threshold - calibration.threshold) > 0.02
        ):
            note += (
                f" On this run's P(yes) a refit would choose {best.calibration} at threshold {best.threshold:.2f}"
                f" (plateau kappa {best.plateau_kappa:.3f}); it would change the verdicts near the cut of every"
                " committed notebook, which would then have to be rerun."
            )
    return note


def validate(dtype: str = JUDGE_DTYPE, refit: bool = False) -> int:
    """Judge every case, choose the calibration on the dev halves, write the tables and docs/judge.md."""
    judge = load_judge("llm", calibration=Calibration(), dtype=dtype)  # no gate: P(yes) for every case
    judged = judge_cases(judge, load_cases())
    saved = None if refit or not JUDGE_CALIBRATION_FILE.is_file() else Calibration.load(JUDGE_CALIBRATION_FILE)
    calibration, choices, kept = choose(judged, judge.precision, saved)
    if not kept:
        calibration.save(JUDGE_CALIBRATION_FILE)
    judged["score"] = calibration.verdict(judged)
    rows = validation_rows(judged)
    write_csv(rows, RESULTS_DIR / "judge" / "validation.csv")
    write_docs(rows, choices, calibration, kept, stored_p_yes(judged, calibration))
    print(_summary(rows))
    return 0


def draw_sheet(round_: int, per_cell: int, pool_per_cell: int, seed: int, out: Path, steered_model: str = "") -> int:
    """Draw a labelling round from the stored generations: a seeded pool per (model, class, embedding verdict),
    judged by the default LLM judge, then `draw_round`. Writes `out` (the blind sheet: id, class, concept, question,
    response) and `out` with `.key.csv` (each id's model, notebook and both verdicts), kept apart while labelling.
    With `steered_model`, that model's `steered_answers` join the sheet."""
    labelled = set(load_cases().response)
    stored = stored_generations()
    stored = stored[~stored.response.isin(labelled)]
    rng = np.random.default_rng(seed)
    pool = pd.concat(
        [
            cell.loc[rng.choice(cell.index.to_numpy(), size=min(pool_per_cell, len(cell)), replace=False)]
            for _, cell in stored.groupby(["model", "concept_class", "embedding_score"])
        ]
    )
    judge = load_judge("llm")
    pool = score_generations(judge, pool.drop(columns="embedding_score").reset_index(drop=True))
    drawn = draw_round(pool, per_cell, seed)
    if steered_model:  # coherent text: every answer of a steered instruct model on development concepts
        answers = steered_answers(steered_model, (0.025, 0.05), n_questions=5)
        answers = score_generations(judge, answers.assign(model=steered_model, notebook="api"))
        drawn = pd.concat([drawn, answers[answers.response.str.split().str.len() <= 60]])
    sheet = drawn.sample(frac=1, random_state=seed)
    return _write_sheet(sheet, round_, ["model", "notebook", "embedding_score", "p_yes", "score"], out)


def confirm_sheet(model: str, round_: int, n_negatives: int, seed: int, out: Path, setting: str = OURS) -> int:
    """Write a blind sheet (`out`) and its key (`out` with `.key.csv`) of `confirmation_sheet` over `model`'s
    notebook-01 responses (results/<model>/01_generations.csv, judged by the default judge)."""
    path = RESULTS_DIR / model_slug(model) / "01_generations.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `make 01_token_selection MODELS={model}` first.")
    generations = pd.read_csv(path, keep_default_na=False)
    if "embedding_score" not in generations:
        raise ValueError(f"{path} was judged by the embedding judge alone; rerun notebook 01 with the LLM judge.")
    sheet = confirmation_sheet(generations, set(load_cases().response), setting, n_negatives, seed)
    sheet = sheet.assign(model=model_slug(model), notebook="01", source=CONFIRMATION)
    key_columns = ["model", "notebook", "source", "setting", "coefficient", "embedding_score", "p_yes", "score"]
    return _write_sheet(sheet, round_, key_columns, out)


def _write_sheet(sheet: pd.DataFrame, round_: int, key_columns: list[str], out: Path) -> int:
    """Number the rows r<round>-NNN in order, write the blind sheet (id, class, concept, question, response) to `out`
    and each id's `key_columns` to `out` with `.key.csv`, to be kept apart while labelling."""
    sheet = sheet.assign(id=[f"r{round_}-{i:03d}" for i in range(len(sheet))])
    write_csv(sheet[["id", "concept_class", "concept", "question", "response"]], out)
    write_csv(sheet[["id", *key_columns]], out.with_suffix(".key.csv"))
    print(f"wrote {len(sheet)} responses to {out} (blind) and {out.with_suffix('.key.csv')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`validate` (the default), `draw` a blind labelling sheet, `add` its labels to the cases, or `rejudge`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = ["validate", "draw", "confirm", "add", "rejudge"]
    parser.add_argument("command", nargs="?", default="validate", choices=commands)
    parser.add_argument("--dtype", default=JUDGE_DTYPE, help="the judge model's precision")
    parser.add_argument("--refit", action="store_true", help="validate: choose the calibration again")
    parser.add_argument("--round", type=int, default=4, help="draw: the round's number (ids r<round>-NNN)")
    parser.add_argument("--per-cell", type=int, default=8, help="draw: responses per (class, both verdicts)")
    parser.add_argument("--pool-per-cell", type=int, default=20, help="draw: pool per (model, class, verdict)")
    parser.add_argument("--steered-model", default="", help="draw: add this model's steered answers (dev concepts)")
    parser.add_argument("--model", default="", help="confirm: the model whose notebook-01 judge positives to label")
    parser.add_argument("--negatives", type=int, default=40, help="confirm: judge negatives drawn beside them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("round-sheet.csv"), help="draw/add: the blind sheet")
    parser.add_argument("--labels", type=Path, help="add: the person's labels of --out (id,label,kind,language)")
    args = parser.parse_args(argv)
    if args.command == "add":
        print(f"added {add_round(args.out, args.labels, args.round)} cases to {JUDGE_CASES_FILE.name}")
        return 0
    if args.command == "rejudge":
        return rejudge()
    if args.command == "confirm":
        return confirm_sheet(args.model, args.round, args.negatives, args.seed, args.out)
    if args.command == "draw":
        return draw_sheet(args.round, args.per_cell, args.pool_per_cell, args.seed, args.out, args.steered_model)
    return validate(args.dtype, args.refit)


if __name__ == "__main__":
    raise SystemExit(main())

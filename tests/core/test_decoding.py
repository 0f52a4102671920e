"""The fast greedy decoder (`decoding.greedy_decode`) against `model.generate` (`decoding.generate_reference`)."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pytest
import torch

from steer_utils.core import decoding, models, vectors
from steer_utils.core.protocol import default_blocks
from steer_utils.experiments import pipeline, sadi

QUESTIONS = ["Hi there.", "Tell me more about your favourite place.", "Why?"]


@pytest.fixture(scope="module")
def sharp(sharp_model_dir):
    """The tiny llama with large weights: its greedy continuations differ between rows and between steps."""
    return models.load_model(str(sharp_model_dir), dtype="float32", device="cpu")


def random_vector(info, seed: int = 0) -> vectors.ConceptVector:
    generator = torch.Generator().manual_seed(seed)
    return vectors.ConceptVector(
        {
            b: torch.nn.functional.normalize(torch.randn(info.hidden_size, generator=generator), dim=0)
            for b in range(info.n_blocks)
        },
        {b: 20.0 for b in range(info.n_blocks)},
    )


def grid_rows(info, coefficients=(0.0, 0.5, 2.0)):
    """Every question at every coefficient (questions repeat, so prompts are shared), with per-row additions."""
    rows, additions = pipeline.grid_rows({"v": random_vector(info)}, coefficients, len(QUESTIONS), range(info.n_blocks))
    return [QUESTIONS[q] for _, _, q in rows], additions


@contextmanager
def stop_token(model, token: int | None):
    """While active, the model's generation config ends a response at `token`."""
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = token
    try:
        yield
    finally:
        model.generation_config.eos_token_id = original


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_fast_generation_matches_model_generate(sharp, positions):
    model, tokenizer, info = sharp
    messages, additions = grid_rows(info)
    fast = decoding.generate(model, tokenizer, messages, additions, max_new_tokens=8, positions=positions)
    reference = decoding.generate_reference(
        model, tokenizer, messages, additions, max_new_tokens=8, positions=positions
    )
    assert fast == reference
    assert len(set(reference)) > len(QUESTIONS)  # the coefficients change the text, so a row mix-up would show


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_rows_that_stop_leave_the_batch_with_the_same_responses(sharp, positions):
    model, tokenizer, info = sharp
    messages, additions = grid_rows(info)
    with stop_token(model, None):
        ids = [
            tokenizer(t, add_special_tokens=False).input_ids
            for t in decoding.generate_reference(
                model, tokenizer, messages, additions, max_new_tokens=8, positions=positions
            )
        ]
    stop = next(row[2] for row in ids if len(row) > 4)  # a token some row produces mid-way
    with stop_token(model, stop):
        assert decoding.stop_token_ids(model, tokenizer) == [stop]
        fast = decoding.generate(model, tokenizer, messages, additions, max_new_tokens=8, positions=positions)
        reference = decoding.generate_reference(
            model, tokenizer, messages, additions, max_new_tokens=8, positions=positions
        )
    assert fast == reference
    assert len({len(r) for r in reference}) > 1  # rows stopped at different steps


def test_greedy_decode_pads_after_the_stop_token(sharp):
    model, tokenizer, _ = sharp
    batch = tokenizer(["a b c", "a"], return_tensors="pt", padding=True, add_special_tokens=False)
    free = decoding.greedy_decode(
        model, batch.input_ids, batch.attention_mask, 6, [], tokenizer.pad_token_id, lambda rows: nullcontext()
    )
    stop = int(free[0, 1])
    stopped = decoding.greedy_decode(
        model,
        batch.input_ids,
        batch.attention_mask,
        6,
        [stop],
        tokenizer.pad_token_id,
        lambda rows: nullcontext(),
    )
    for row in range(2):
        hits = (free[row] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 6
        assert torch.equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == tokenizer.pad_token_id).all()


def test_loop_start_finds_the_first_step_a_cycle_repeats_three_times():
    assert decoding.loop_start([1, 2, 3, 4, 5, 6, 7]) is None
    assert decoding.loop_start([5, 1, 2, 1, 2, 1, 2, 9]) == (7, 2)
    assert decoding.loop_start([9, 9, 9, 9]) == (3, 1)
    assert decoding.loop_start([1, 2, 1, 2], repeats=2) == (4, 2)


def test_fill_loop_repeats_the_cycle_and_ignores_what_follows_a_stop_token():
    assert decoding.fill_loop([5, 1, 2, 1, 2, 1, 2, 9, 9, 9], 10) == [5, 1, 2, 1, 2, 1, 2, 1, 2, 1]
    assert decoding.fill_loop([1, 2, 3, 4], 4) == [1, 2, 3, 4]
    assert decoding.fill_loop([4, 0, 0, 0, 0], 5, stop_ids=[0]) == [4, 0, 0, 0, 0]  # ended: no loop after it
    assert decoding.fill_loop([7, 7, 7, 0, 0], 5, stop_ids=[0]) == [7, 7, 7, 7, 7]  # looped before the stop


def test_looping_period_is_loop_starts_test_for_every_row_at_once():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 3, (400, 20), generator=generator)  # 3 symbols: many short cycles
    for count in range(1, 21):
        period = decoding.looping_period(tokens, count).tolist()
        for row, ids in enumerate(tokens[:, :count].tolist()):
            first = decoding.loop_start(ids)
            if first is not None and first[0] == count:  # the first loop ends here: the same period
                assert period[row] == first[1]
            if first is None:  # no loop up to here, so none ends here
                assert period[row] == 0
    assert decoding.looping_period(torch.tensor([[4, 4, 4], [4, 5, 4]]), 3).tolist() == [1, 0]


def test_stopping_loops_gives_the_full_decode_with_its_first_loop_filled(sharp):
    model, tokenizer, info = sharp
    messages, additions = grid_rows(info, coefficients=(0.0, 0.5, 2.0, 8.0))
    batch = tokenizer(messages, return_tensors="pt", padding=True, add_special_tokens=False)
    hooks = lambda rows: nullcontext()  # noqa: E731
    for length in (30, 70):  # 70: past the 48 columns the longest cycle's test reads
        args = (model, batch.input_ids, batch.attention_mask, length, [], tokenizer.pad_token_id, hooks)
        full = decoding.greedy_decode(*args, stop_loops=False)
        stopped = decoding.greedy_decode(*args, stop_loops=True)
        assert [decoding.fill_loop(row, length) for row in full.tolist()] == stopped.tolist()
        assert any(decoding.loop_start(row) for row in full.tolist())  # some rows loop, so the rule was exercised
    fast = decoding.generate(model, tokenizer, messages, additions, max_new_tokens=30)
    assert fast == decoding.generate_reference(model, tokenizer, messages, additions, max_new_tokens=30)
    assert fast != decoding.generate(model, tokenizer, messages, additions, max_new_tokens=30, stop_loops=False)


def test_sadi_rows_keep_their_own_scales_in_the_fast_decoder(sharp):
    model, tokenizer, info = sharp
    torch.manual_seed(0)
    masks = [torch.rand(info.n_blocks, info.hidden_size) < 0.3 for _ in range(len(QUESTIONS))]
    deltas = [3.0, 0.0, -2.0]
    with sadi._left_padding(tokenizer):
        with sadi.intervene(model, sadi.sadi_scales(masks, deltas), "hidden", "all"):
            reference = decoding.generate_reference(model, tokenizer, QUESTIONS, max_new_tokens=8)
        plain = decoding.generate_reference(model, tokenizer, QUESTIONS, max_new_tokens=8)
    fast = sadi.generate_sadi(model, tokenizer, QUESTIONS, masks, deltas, "hidden", "all", max_new_tokens=8)
    assert fast == reference and fast != plain


def test_logits_processing_in_the_generation_config_is_applied(sharp):
    model, tokenizer, info = sharp
    messages, additions = grid_rows(info)
    original = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 5.0
    try:
        assert decoding.needs_logits_processing(model)
        penalised = decoding.generate(model, tokenizer, messages, additions, max_new_tokens=8)
        assert penalised == decoding.generate_reference(model, tokenizer, messages, additions, max_new_tokens=8)
    finally:
        model.generation_config.repetition_penalty = original
    assert not decoding.needs_logits_processing(model)
    assert penalised != decoding.generate(model, tokenizer, messages, additions, max_new_tokens=8)


@pytest.fixture(scope="module", params=["smollm2-135m", "qwen2.5-coder-0.5b"])
def bundled_fp32(request):
    """A bundled model in fp32 and its typical block norm (the scale eps multiplies: results/<model>/07_block_norms)."""
    return models.load_model(request.param, dtype="float32"), {"smollm2-135m": 150.0, "qwen2.5-coder-0.5b": 30.0}[
        request.param
    ]


@pytest.mark.integration
@pytest.mark.parametrize("positions", ["all", "answer"])
def test_fast_generation_matches_model_generate_on_bundled_models(bundled_fp32, positions):
    (model, tokenizer, info), norm = bundled_fp32
    vector = random_vector(info)
    vector = vectors.ConceptVector(vector.directions, {b: norm for b in vector.directions})
    questions = ["What is your favourite place?", "How do you spend a rainy day?"]
    coefficients = (0.0, 0.05, 0.2)
    messages = [q for _ in coefficients for q in questions]
    additions = vectors.steering_additions(
        [vector] * len(messages), [c for c in coefficients for _ in questions], default_blocks(info.n_blocks)
    )
    fast = decoding.generate(model, tokenizer, messages, additions, max_new_tokens=24, positions=positions)
    assert fast == decoding.generate_reference(
        model, tokenizer, messages, additions, max_new_tokens=24, positions=positions
    )
    assert len(set(fast)) > len(questions)


def test_shared_layout_puts_the_common_prefix_first_and_groups_rows():
    prompts = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7], [1, 2, 5]]
    additions = {0: torch.tensor([[1.0], [1.0], [2.0], [2.0]])}
    ids, mask, prefix = decoding.shared_layout(prompts, 0, additions, "all")
    assert prefix.length == 2 and prefix.steered
    assert ids.tolist()[1] == [1, 2, 0, 0, 5] and mask.tolist()[1] == [1, 1, 0, 0, 1]  # padding after the prefix
    assert prefix.group.tolist()[0] == prefix.group.tolist()[1] != prefix.group.tolist()[2] == prefix.group.tolist()[3]
    ids, mask, prefix = decoding.shared_layout(prompts, 0, additions, "answer")
    assert ids.tolist()[1] == [0, 0, 1, 2, 5] and prefix.length == 4 and not prefix.steered  # left padding
    assert prefix.group.tolist()[1] == prefix.group.tolist()[3] and len(set(prefix.group.tolist())) == 3

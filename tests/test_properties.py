"""Property tests (hypothesis): prompt building and token-span bookkeeping on the tiny and both bundled tokenizers,
label scaling, token selection (Eq. 3) and the permutation test's p-values. Derandomized, so CI is deterministic."""

from __future__ import annotations

import string

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from steer_utils.core import models, prompting, training
from steer_utils.core.enrichment import NULLS, min_attainable_pvalue, permutation_pvalues
from tests.conftest import build_tiny_tokenizer

FEW = settings(max_examples=50, deadline=None, derandomize=True, database=None)

# Letters, digits, spaces, punctuation (quotes, braces, %, backslash), accents, CJK, emoji and typographic quotes.
ALPHABET = string.ascii_letters + string.digits + "   " + string.punctuation + "éüñçøßÅЖ漢字☕😀’“”–"
texts = st.text(ALPHABET, min_size=1, max_size=60).map(str.strip).filter(bool)


@pytest.fixture(scope="module", params=["tiny", "smollm2-135m", "gemma3-270m"])
def tokenizer(request):
    return build_tiny_tokenizer() if request.param == "tiny" else models.load_tokenizer(request.param)


def _special_strings(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]


# -- prompts and spans -----------------------------------------------------------------------------------------------


def test_prompt_spans_and_tail(tokenizer):
    specials = _special_strings(tokenizer)

    @FEW
    @given(concept_class=st.sampled_from(prompting.CLASSES), concept=texts, statement=texts)
    def check(concept_class, concept, statement):
        assume(not any(s in concept or s in statement for s in specials))  # refused on purpose (test_bad_inputs)
        prefix = prompting.prefix_text(concept_class, concept)
        prefixed, plain = prompting.paired_prompts(tokenizer, concept_class, concept, [statement])
        p, q = prefixed[0], plain[0]
        start, end = p.prefix_span
        assert 0 <= p.user_start <= start < end <= p.tail_start <= len(p.input_ids)
        assert q.prefix_span is None and q.user_start <= q.tail_start <= len(q.input_ids)
        decoded = tokenizer.decode(p.input_ids[start:end], clean_up_tokenization_spaces=False)
        assert prefix in decoded
        assert prompting.concept_text(concept_class, concept) in decoded
        # The shared tail: the same tokens after the user text, with or without the prefix.
        assert p.n_tail >= 1 and p.input_ids[p.tail_start :] == q.input_ids[q.tail_start :]
        assert prompting.shared_tail([p, q]) == p.input_ids[p.tail_start :]
        assert prompting.user_text(statement, prefix) in p.text and prompting.user_text(statement) in q.text

    check()


# -- labels ----------------------------------------------------------------------------------------------------------

attention = st.integers(1, 6).flatmap(
    lambda n: st.integers(1, 4).flatmap(
        lambda b: st.lists(st.lists(st.floats(0, 1, width=32), min_size=b, max_size=b), min_size=n, max_size=n)
    )
)


@FEW
@given(rows=attention, n_unprefixed=st.integers(1, 6))
def test_label_scaling(rows, n_unprefixed):
    attn = torch.tensor(rows, dtype=torch.float32)
    n, n_blocks = attn.shape
    hard = training.make_labels("hard", attn, n_unprefixed)
    assert hard.shape == (n + n_unprefixed, n_blocks) and hard[:n].eq(1).all() and hard[n:].eq(0).all()
    if bool((attn.amax(dim=0) == 0).any()):  # a block whose prefix gets no attention: nothing to fit
        with pytest.raises(ValueError, match="all equal"):
            training.make_labels("soft", attn, n_unprefixed)
        return
    soft = training.make_labels("soft", attn, n_unprefixed)
    assert soft.shape == hard.shape and not soft.isnan().any()
    assert soft.min() >= 0 and soft.max() <= 1 and soft[n:].eq(0).all()
    assert soft[:n].amax(dim=0).eq(1).all()  # the strongest prefixed example of each block gets 1
    for b in range(n_blocks):  # order-preserving in the attention values
        a, y = attn[:, b], soft[:n, b]
        lower = a[:, None] <= a[None, :]
        assert bool((y[:, None] <= y[None, :])[lower].all())
        assert bool(y[a == 0].eq(0).all())


@FEW
@given(values=st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=12), columns=st.integers(1, 3))
def test_minmax_scale_is_in_unit_interval(values, columns):
    x = torch.tensor(values, dtype=torch.float32)[:, None].repeat(1, columns) * torch.arange(1, columns + 1)
    y = training.minmax_scale(x)
    assert not y.isnan().any() and y.min() >= 0 and y.max() <= 1
    if x[:, 0].unique().numel() == 1:
        assert y.eq(0).all()


# -- token selection (Eq. 3) -----------------------------------------------------------------------------------------

# Multiples of 1/64 in [0, 1]: sums, shifts and powers-of-two scalings are exact in float32, so ties stay ties.
grid = st.integers(0, 64).map(lambda v: v / 64)
shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 6))


@st.composite
def attention_tensors(draw):
    n, n_blocks, n_tail = draw(shapes)
    values = draw(st.lists(grid, min_size=n * n_blocks * n_tail, max_size=n * n_blocks * n_tail))
    return torch.tensor(values, dtype=torch.float32).view(n, n_blocks, n_tail)


@FEW
@given(attn=attention_tensors(), shift=grid, data_=st.data())
def test_token_selection(attn, shift, data_):
    n, n_blocks, n_tail = attn.shape
    chosen = training.select_tokens(attn, "attention")
    assert chosen.shape == (n_blocks,) and chosen.dtype == torch.long
    best = attn.amax(dim=0)  # (n_blocks, n_tail): Eq. 3 maximises over prompts, then over tail positions
    for b, t in enumerate(chosen.tolist()):
        assert 0 <= t < n_tail and best[b, t] == best[b].max()
        assert t == int((best[b] == best[b].max()).nonzero()[0])  # ties: the first such position
    gathered = training.gather_selected(attn, chosen)
    assert torch.equal(gathered, attn[:, torch.arange(n_blocks), chosen])
    # Invariant to a constant shift, a power-of-two scale and the order of the prompts.
    assert torch.equal(training.select_tokens(attn + shift, "attention"), chosen)
    assert torch.equal(training.select_tokens(attn * 4, "attention"), chosen)
    prompts = torch.tensor(data_.draw(st.permutations(range(n))))
    assert torch.equal(training.select_tokens(attn[prompts], "attention"), chosen)
    # Equivariant to permuting blocks, and to permuting tail positions (up to ties).
    blocks = torch.tensor(data_.draw(st.permutations(range(n_blocks))))
    assert torch.equal(training.select_tokens(attn[:, blocks], "attention"), chosen[blocks])
    tail = torch.tensor(data_.draw(st.permutations(range(n_tail))))
    moved = tail[training.select_tokens(attn[..., tail], "attention")]  # back to the original positions
    assert torch.equal(best[torch.arange(n_blocks), moved], best[torch.arange(n_blocks), chosen])
    position = data_.draw(st.integers(-n_tail, n_tail - 1))
    assert training.select_tokens(attn, "fixed", position).tolist() == [position % n_tail] * n_blocks


# -- permutation p-values --------------------------------------------------------------------------------------------


@st.composite
def enrichment_inputs(draw):
    n, n_blocks, n_heads = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    width = draw(st.integers(2, 9))
    lengths, spans = [], []
    for _ in range(n):
        m = draw(st.integers(2, width))
        start = draw(st.integers(0, m - 1))
        lengths.append(m)
        spans.append([start, draw(st.integers(start + 1, m))])
    size = n * n_blocks * n_heads * width
    rows = torch.tensor(draw(st.lists(grid, min_size=size, max_size=size)), dtype=torch.float32)
    bumps = torch.tensor(draw(st.lists(grid, min_size=size, max_size=size)), dtype=torch.float32)
    shape = (n, n_blocks, n_heads, width)
    return rows.view(shape), bumps.view(shape), torch.tensor(lengths), torch.tensor(spans)


@FEW
@given(
    inputs=enrichment_inputs(),
    null=st.sampled_from(NULLS),
    n_draws=st.sampled_from([5, 40, 300]),
    seed=st.integers(0, 3),
)
def test_permutation_pvalues(inputs, null, n_draws, seed):
    rows, bumps, lengths, spans = inputs
    p = permutation_pvalues(rows, lengths, spans, null, n_draws, seed)
    assert p.shape == rows.shape[:3] and p.dtype == torch.float64
    assert bool(((p > 0) & (p <= 1)).all())
    for i, (m, (start, end)) in enumerate(zip(lengths.tolist(), spans.tolist())):
        floor = min_attainable_pvalue(m, end - start, null, n_draws)
        assert bool((p[i] >= floor - 1e-12).all())
        assert torch.allclose(p[i] / floor, (p[i] / floor).round())  # (1 + count) / (1 + N_null)
    # More attention on the prefix (anything else unchanged) never raises p; more elsewhere never lowers it.
    on_prefix = torch.zeros_like(rows, dtype=torch.bool)
    for i, (start, end) in enumerate(spans.tolist()):
        on_prefix[i, ..., start:end] = True
    raised = permutation_pvalues(rows + bumps * on_prefix, lengths, spans, null, n_draws, seed)
    assert bool((raised <= p).all())
    inside = torch.arange(rows.shape[-1]) < lengths.view(-1, 1, 1, 1)
    lowered = permutation_pvalues(rows + bumps * (~on_prefix & inside), lengths, spans, null, n_draws, seed)
    assert bool((lowered >= p).all())
    assert torch.equal(permutation_pvalues(rows, lengths, spans, null, n_draws, seed), p)  # seeded

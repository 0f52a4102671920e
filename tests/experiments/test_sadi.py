"""SADI: mask selection, per-row scales, exact hook identities, recording and batched generation on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steer_utils.core import decoding
from steer_utils.core.models import attention_implementation
from steer_utils.core.prompting import render_prompt
from steer_utils.experiments import sadi
from tests.conftest import tiny_config_fields

MESSAGES = ["Tell me about the sea.", "Hi", "What is a statement about cats and dogs?"]


@pytest.fixture(scope="module")
def llama(tiny_tokenizer):
    """A 3-block random llama: hidden 32, 4 heads (head_dim 8), 2 kv heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**tiny_config_fields(tiny_tokenizer), num_hidden_layers=3)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gemma(tiny_tokenizer):
    """A 3-block random Gemma-3: hidden 32, 4 heads of head_dim 16 (o_proj input 64 != hidden 32)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(**tiny_config_fields(tiny_tokenizer), num_hidden_layers=3, head_dim=16, sliding_window=16)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(params=["llama", "gemma"])
def model(request):
    """Each tiny model in turn."""
    return request.getfixturevalue(request.param)


def ids(model, batch=2, length=6, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=generator)


@torch.inference_mode()
def capture(model, input_ids, site, scales=None, positions="all"):
    """Per block, the site tensor after any intervention: o_proj input or MLP output, (b, t, w)."""
    modules = sadi.site_modules(model, site)
    seen = [None] * len(modules)

    def pre(i):
        def hook(module, args):
            seen[i] = args[0].clone()

        return hook

    def post(i):
        def hook(module, args, output):
            seen[i] = output.clone()

        return hook

    with sadi.intervene(model, scales or {}, site, positions):  # capture hooks registered after SADI's
        handles = [
            m.register_forward_pre_hook(pre(i)) if site == "head" else m.register_forward_hook(post(i))
            for i, m in enumerate(modules)
        ]
        try:
            logits = model(input_ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
    return seen, logits


def one_mask(model, site, block, elements):
    mask = torch.zeros(3, sadi.n_elements(model, site), dtype=torch.bool)
    mask[block, elements] = True
    return mask


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- mask and scales -------------------------------------------------------------------------------------------


def test_mask_picks_top_k_by_signed_mean_difference_across_blocks():
    plain = torch.zeros(2, 2, 3)
    prefixed = torch.tensor(
        [[[1.0, 4.0, 4.0], [2.0, -9.0, 0.0]], [[1.0, 2.0, 2.0], [4.0, -9.0, 6.0]]]
    )  # mean diff [[1, 3, 3], [3, -9, 3]]
    expected = {
        1: [[0, 1, 0], [0, 0, 0]],
        2: [[0, 1, 1], [0, 0, 0]],
        3: [[0, 1, 1], [1, 0, 0]],
        4: [[0, 1, 1], [1, 0, 1]],
        5: [[1, 1, 1], [1, 0, 1]],
        6: [[1, 1, 1], [1, 1, 1]],
    }
    for k, want in expected.items():  # ties at 3 go to the lower flat index; the large negative comes last
        mask = sadi.sadi_mask(prefixed, plain, k)
        assert mask.dtype == torch.bool and mask.shape == (2, 3)
        assert torch.equal(mask, torch.tensor(want, dtype=torch.bool)), k
    # the difference is signed: swapping the pair roles picks the large negative first
    assert torch.equal(sadi.sadi_mask(plain, prefixed, 1), torch.tensor([[0, 0, 0], [0, 1, 0]], dtype=torch.bool))


def test_mask_ties_are_deterministic_at_scale():
    prefixed = torch.zeros(1, 4, 1000)
    prefixed.view(-1)[::7] = 1.0  # 572 tied maxima, then 3428 tied zeros
    mask = sadi.sadi_mask(prefixed, torch.zeros_like(prefixed), 600).flatten()
    ties = (torch.arange(4000) % 7 != 0).nonzero().flatten()[: 600 - 572]  # lowest-index zeros fill the rest
    assert torch.equal(mask.nonzero().flatten(), torch.cat([torch.arange(0, 4000, 7), ties]).sort().values)


def test_mask_errors():
    a = torch.zeros(2, 2, 3)
    for k in (0, -1, 7):
        with pytest.raises(ValueError, match="k="):
            sadi.sadi_mask(a, a, k)
    with pytest.raises(ValueError, match="same model"):
        sadi.sadi_mask(a, torch.zeros(2, 2, 4), 1)
    with pytest.raises(ValueError, match="same model"):
        sadi.sadi_mask(a[0], a[0], 1)
    with pytest.raises(ValueError, match="NaN"):
        sadi.sadi_mask(torch.full((1, 2, 3), float("nan")), a[:1], 1)


def test_scales_per_row_and_only_masked_blocks():
    m0 = torch.tensor([[1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    m1 = torch.tensor([[0, 0], [0, 0], [0, 1]], dtype=torch.bool)
    scales = sadi.sadi_scales([m0, m1], [0.5, -2.0])
    assert sorted(scales) == [0, 2]
    assert torch.equal(scales[0], torch.tensor([[1.5, 1.0], [1.0, 1.0]]))
    assert torch.equal(scales[2], torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    assert scales[0].dtype == torch.float32
    with pytest.raises(ValueError, match="per row"):
        sadi.sadi_scales([m0], [0.5, 1.0])
    with pytest.raises(ValueError, match="one shape"):
        sadi.sadi_scales([m0, m0[:2]], [0.5, 1.0])


# --- modules ---------------------------------------------------------------------------------------------------


def test_site_modules_and_widths(llama, gemma):
    assert all(m is b.self_attn.o_proj for m, b in zip(sadi.site_modules(llama, "head"), llama.model.layers))
    assert all(m is b.mlp for m, b in zip(sadi.site_modules(gemma, "hidden"), gemma.model.layers))
    assert sadi.n_elements(llama, "head") == sadi.n_elements(gemma, "head") == 4
    assert sadi.n_elements(llama, "hidden") == sadi.n_elements(gemma, "hidden") == 32
    with pytest.raises(ValueError, match="Unknown site"):
        sadi.site_modules(llama, "residual")


def test_site_modules_missing_projection_or_mlp():
    from transformers import LlamaConfig

    class OddAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = OddAttention()

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = LlamaConfig(num_hidden_layers=2)
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(ValueError, match="no output projection"):
        sadi.site_modules(Odd(), "head")
    with pytest.raises(ValueError, match="no MLP"):
        sadi.site_modules(Odd(), "hidden")


# --- exact hook identities -------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", sadi.POSITIONS)
def test_head_scales_exactly_the_masked_head_slice(model, positions):
    x = ids(model)
    head_dim = model.model.layers[0].self_attn.o_proj.in_features // 4
    assert head_dim == (16 if model.config.model_type.startswith("gemma") else 8)
    block, head, delta = 1, 2, 0.75
    scales = sadi.sadi_scales([one_mask(model, "head", block, [head])] * 2, [delta] * 2)
    base, _ = capture(model, x, "head")
    steered, _ = capture(model, x, "head", scales, positions)
    assert torch.equal(steered[0], base[0])  # blocks before the masked one are untouched
    cols = slice(head * head_dim, (head + 1) * head_dim)
    rows = slice(None) if positions == "all" else slice(-1, None)
    expected = base[block].clone()
    expected[:, rows, cols] = base[block][:, rows, cols] * torch.tensor(1 + delta)
    assert torch.equal(steered[block], expected)  # masked slice scaled, everything else identical
    assert (steered[block][:, :, cols] != base[block][:, :, cols]).any(-1).sum() == (
        x.numel() if positions == "all" else x.shape[0]
    )


@pytest.mark.parametrize("positions", sadi.POSITIONS)
def test_hidden_scales_exactly_the_masked_mlp_dims(llama, positions):
    x = ids(llama)
    block, dims, delta = 1, [3, 7], -0.5
    scales = sadi.sadi_scales([one_mask(llama, "hidden", block, dims)] * 2, [delta] * 2)
    base, _ = capture(llama, x, "hidden")
    steered, _ = capture(llama, x, "hidden", scales, positions)
    assert torch.equal(steered[0], base[0])
    rows = slice(None) if positions == "all" else slice(-1, None)
    expected = base[block].clone()
    expected[:, rows, dims] = base[block][:, rows][:, :, dims] * torch.tensor(1 + delta)
    assert torch.equal(steered[block], expected)


@pytest.mark.parametrize("site", sadi.SITES)
def test_last_leaves_single_token_forward_untouched(llama, site):
    x = ids(llama, length=1)
    scales = sadi.sadi_scales([one_mask(llama, site, 0, [1])] * 2, [2.0] * 2)
    base, base_logits = capture(llama, x, site)
    last, last_logits = capture(llama, x, site, scales, "last")
    _, all_logits = capture(llama, x, site, scales, "all")
    assert all(torch.equal(a, b) for a, b in zip(last, base)) and torch.equal(last_logits, base_logits)
    assert not torch.equal(all_logits, base_logits)  # "all" does steer decode steps


@pytest.mark.parametrize("site", sadi.SITES)
@pytest.mark.parametrize("positions", sadi.POSITIONS)
def test_zero_delta_and_per_row_identity(llama, site, positions):
    x = ids(llama)
    mask = one_mask(llama, site, 1, [0, 2])
    _, base = capture(llama, x, site)
    _, zero = capture(llama, x, site, sadi.sadi_scales([mask, mask], [0.0, 0.0]), positions)
    assert torch.equal(zero, base)
    other = one_mask(llama, site, 0, [1])  # row 1 steers a block row 0 does not touch
    _, mixed = capture(llama, x, site, sadi.sadi_scales([mask, other], [0.0, 1.0]), positions)
    assert torch.equal(mixed[0], base[0])
    assert not torch.equal(mixed[1], base[1])


@pytest.mark.parametrize("site", sadi.SITES)
def test_hooks_removed_after_context_and_on_error(llama, site):
    x = ids(llama)
    _, base = capture(llama, x, site)
    scales = sadi.sadi_scales([one_mask(llama, site, 2, [1])] * 2, [1.0] * 2)
    with sadi.intervene(llama, scales, site, "all"):
        assert not no_hooks(llama)
    assert no_hooks(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with sadi.intervene(llama, scales, site, "all"):
            raise RuntimeError("boom")
    assert no_hooks(llama)
    with torch.inference_mode():
        assert torch.equal(llama(x, use_cache=False).logits, base)


def test_intervene_rejects_bad_scales(llama):
    good = torch.ones(1, 4)
    with pytest.raises(ValueError, match="does not exist"):
        with sadi.intervene(llama, {0: good, 3: good}, "head", "all"):
            pass
    with pytest.raises(ValueError, match=r"expected \(rows, 4\)"):
        with sadi.intervene(llama, {0: torch.ones(1, 32)}, "head", "all"):
            pass
    with pytest.raises(ValueError, match="Unknown positions"):
        with sadi.intervene(llama, {0: good}, "head", "first"):
            pass
    with pytest.raises(ValueError, match="3 rows but the batch has 2"):
        capture(llama, ids(llama), "head", {0: torch.ones(3, 4)})
    assert no_hooks(llama)


def test_eager_and_sdpa_agree(model):
    x = ids(model)
    scales = sadi.sadi_scales([one_mask(model, "head", 0, [1]), one_mask(model, "head", 1, [3])], [1.5, -0.5])
    results = {}
    for implementation in ("eager", "sdpa"):
        with attention_implementation(model, implementation) as active:
            assert active == implementation
            results[implementation] = capture(model, x, "head", scales, "all")
    for a, b in zip(results["eager"][0], results["sdpa"][0]):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(results["eager"][1], results["sdpa"][1], atol=1e-5)


# --- recording and generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("site", sadi.SITES)
def test_record_last_token_matches_single_prompt_forward(model, tiny_tokenizer, site):
    recorded = sadi.record_last_token(model, tiny_tokenizer, MESSAGES, (site,), batch_size=2)[site]
    width = sadi.n_elements(model, site)
    assert recorded.shape == (len(MESSAGES), 3, width) and recorded.dtype == torch.float32
    assert tiny_tokenizer.padding_side == "left"
    for i, message in enumerate(MESSAGES):
        x = tiny_tokenizer(render_prompt(tiny_tokenizer, message), return_tensors="pt", add_special_tokens=False)[
            "input_ids"
        ]
        seen, _ = capture(model, x, site)
        manual = torch.stack([s[0, -1] for s in seen])  # (n_blocks, w)
        if site == "head":
            manual = manual.view(3, width, -1).mean(-1)
        assert torch.allclose(recorded[i], manual, atol=1e-5)


def test_record_last_token_records_both_sites_in_one_pass(llama, tiny_tokenizer):
    both = sadi.record_last_token(llama, tiny_tokenizer, MESSAGES, sadi.SITES, batch_size=2)
    assert set(both) == set(sadi.SITES)
    for site in sadi.SITES:
        assert torch.equal(
            both[site], sadi.record_last_token(llama, tiny_tokenizer, MESSAGES, (site,), batch_size=2)[site]
        )


def test_generate_sadi(llama, tiny_tokenizer):
    messages = MESSAGES[:2]
    masks = [one_mask(llama, "head", 1, [0, 3]), one_mask(llama, "head", 2, [1])]
    for positions in sadi.POSITIONS:
        out = sadi.generate_sadi(
            llama, tiny_tokenizer, messages, masks, [2.0, -1.0], "head", positions, max_new_tokens=4
        )
        assert len(out) == len(messages) and all(isinstance(t, str) for t in out)
    plain = decoding.generate(llama, tiny_tokenizer, messages, None, max_new_tokens=4)
    assert (
        sadi.generate_sadi(llama, tiny_tokenizer, messages, masks, [0.0, 0.0], "head", "all", max_new_tokens=4) == plain
    )
    hidden = [one_mask(llama, "hidden", 0, [5]), one_mask(llama, "hidden", 2, [9])]
    assert (
        sadi.generate_sadi(llama, tiny_tokenizer, messages, hidden, [0.0, 0.0], "hidden", "last", max_new_tokens=4)
        == plain
    )
    assert no_hooks(llama)
    with pytest.raises(ValueError, match="one mask and one delta per message"):
        sadi.generate_sadi(llama, tiny_tokenizer, messages, masks[:1], [0.0], "head", "all")

"""SADI (Semantics-Adaptive Dynamic Intervention, arXiv 2410.12299), adapted to concept steering.

The method, in three steps:
1. Contrastive pairs: the same user messages with and without a concept prefix. At the last prompt token we
   record, per block, either every attention head's output before the output projection (site "head", the
   input of `o_proj` reduced to one number per head by the mean over head_dim) or the MLP output per dimension
   (site "hidden").
2. Mask: the mean over pairs of (prefixed - plain) activations, (n_blocks, n_elements); all elements of all
   blocks are ranked together by this signed difference and the top K form a binary mask.
3. Intervention: at inference the input's own live activations of the masked elements are scaled,
   a' = a + delta * a. A masked head has its whole head_dim slice of o_proj's input scaled (a forward
   pre-hook on o_proj, so eager and SDPA attention behave the same); a masked hidden dimension is scaled in the
   MLP's output (a forward hook on the MLP module, before any post-MLP norm the block may apply).

Our adaptation: the original (a) derives its contrast from correct/incorrect answers of a task, here from a
concept prefix, (b) intervenes only at the last prompt token -- positions="last" does that (only the prefill
call, position -1; decode steps untouched) -- and we add positions="all" (every position of every forward call,
prefill and decode), and (c) runs several (mask, delta) points in one batched `generate`, each row with its
own per-block scale 1 + delta_r * mask_r; a row that does not touch a block is multiplied by exactly 1.0 there,
which leaves its values bit-identical.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..core import decoding
from ..core.extraction import find_attention, find_blocks
from ..core.models import attention_implementation
from ..core.prompting import render_prompt
from ..core.resources import halving_batches, registered_hooks

SITES = ("head", "hidden")
POSITIONS = ("last", "all")
_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj")
_MLP_NAMES = ("mlp", "feed_forward")


def _check_site(site: str) -> None:
    if site not in SITES:
        raise ValueError(f"Unknown site {site!r}; use one of {SITES}.")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}; use one of {POSITIONS}.")


def _out_proj(block: nn.Module) -> nn.Module:
    attention = find_attention(block)
    children = list(attention.named_modules())  # (dotted path, module); a match may be nested
    for name in _OUT_PROJ_NAMES:
        module = next((m for path, m in children if path.split(".")[-1] == name), None)
        if module is not None:
            if not hasattr(module, "in_features"):
                raise ValueError(
                    f"{type(attention).__name__}.{name} has no in_features; site 'head' needs a Linear "
                    "output projection (use site 'hidden')."
                )
            return module
    raise ValueError(
        f"{type(attention).__name__} has no output projection named one of {_OUT_PROJ_NAMES}; use site 'hidden'."
    )


def _mlp(block: nn.Module) -> nn.Module:
    for name in _MLP_NAMES:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"{type(block).__name__} has no MLP attribute named one of {_MLP_NAMES}; use site 'head'.")


def site_modules(model: nn.Module, site: str) -> list[nn.Module]:
    """Per block, the module SADI hooks: the attention's output projection ("head") or the MLP ("hidden")."""
    _check_site(site)
    return [(_out_proj if site == "head" else _mlp)(block) for block in find_blocks(model)]


def _n_heads(model: nn.Module) -> int:
    return model.config.get_text_config().num_attention_heads


def _head_dim(model: nn.Module, o_proj: nn.Module) -> int:
    heads = _n_heads(model)
    if o_proj.in_features % heads:
        raise ValueError(
            f"o_proj input width {o_proj.in_features} is not a multiple of {heads} heads; "
            "the head layout is unknown, use site 'hidden'."
        )
    return o_proj.in_features // heads  # Gemma-3: not hidden_size // heads


def n_elements(model: nn.Module, site: str) -> int:
    """Elements per block at a site: attention heads ("head") or hidden dimensions ("hidden")."""
    _check_site(site)
    if site == "head":
        _head_dim(model, site_modules(model, site)[0])  # validates the head layout
        return _n_heads(model)
    return model.config.get_text_config().hidden_size


@contextmanager
def _left_padding(tokenizer) -> Iterator[None]:
    """Pad on the left while active, so position -1 is every row's last prompt token."""
    original = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = original


@torch.inference_mode()
def record_last_token(
    model: nn.Module, tokenizer, user_messages: Sequence[str], sites: Sequence[str] = SITES, batch_size: int = 16
) -> dict[str, torch.Tensor]:
    """Per site, activations at the last prompt token of each chat-templated message, (n, n_blocks, n_elements)
    float32; all sites are recorded in the same forward passes."""
    for site in sites:
        _check_site(site)
    if not len(user_messages):
        raise ValueError("No user messages given; pass at least one.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    base = getattr(model, model.base_model_prefix, model)  # the decoder without the LM head
    device = next(model.parameters()).device
    captured: dict[str, list[torch.Tensor | None]] = {}

    def keep_input(site, index, head_dim):
        def hook(module, args):
            last = args[0][:, -1].float()  # (b, H * head_dim)
            captured[site][index] = last.view(last.shape[0], -1, head_dim).mean(-1)  # (b, H)

        return hook

    def keep_output(site, index):
        def hook(module, args, output):
            captured[site][index] = (output[0] if isinstance(output, tuple) else output)[:, -1].float()  # (b, d)

        return hook

    out: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    with registered_hooks() as handles:
        for site in sites:
            modules = site_modules(model, site)
            captured[site] = [None] * len(modules)
            for i, m in enumerate(modules):
                handles.append(
                    m.register_forward_pre_hook(keep_input(site, i, _head_dim(model, m)))
                    if site == "head"
                    else m.register_forward_hook(keep_output(site, i))
                )

        def run(messages: Sequence[str]) -> dict[str, torch.Tensor]:  # one batch; halved if out of memory
            prompts = [render_prompt(tokenizer, m) for m in messages]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            mask = batch["attention_mask"]  # (b, t), left padded
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padding does not shift rotary positions
            base(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
            )
            return {site: torch.stack(captured[site], dim=1).cpu() for site in sites}  # (b, n_blocks, n_elements)

        with _left_padding(tokenizer), attention_implementation(model, "sdpa"):
            for part in halving_batches(run, list(user_messages), batch_size, "SADI recording"):
                for site in sites:
                    out[site].append(part[site])
    return {site: torch.cat(parts) for site, parts in out.items()}


def sadi_mask(prefixed: torch.Tensor, plain: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (n_blocks, n_elements) of the top-k elements by mean (prefixed - plain), ranked across all blocks."""
    if prefixed.dim() != 3 or prefixed.shape != plain.shape:
        raise ValueError(
            f"Activations must both be (n, n_blocks, n_elements); got {tuple(prefixed.shape)} and "
            f"{tuple(plain.shape)}. Record both with the same model, site and number of messages."
        )
    difference = (prefixed.float() - plain.float()).mean(0)  # (n_blocks, n_elements)
    if not 1 <= k <= difference.numel():
        raise ValueError(f"k={k} is out of range; choose 1 <= k <= {difference.numel()} (n_blocks * n_elements).")
    if torch.isnan(difference).any():
        raise ValueError("The activation differences contain NaN; check the recorded activations.")
    order = torch.sort(difference.flatten(), descending=True, stable=True).indices  # ties: lower flat index first
    mask = torch.zeros(difference.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(difference.shape)


def sadi_scales(masks: Sequence[torch.Tensor], deltas: Sequence[float]) -> dict[int, torch.Tensor]:
    """Per-row scales {block: (rows, n_elements)} = 1 + delta_r * mask_r[block], for blocks some row masks."""
    if len(masks) != len(deltas):
        raise ValueError(f"Got {len(masks)} masks for {len(deltas)} deltas; give one of each per row.")
    if not len(masks):
        raise ValueError("No masks given; give at least one (mask, delta) row.")
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"Masks must all be (n_blocks, n_elements) of one shape; got shapes {sorted(shapes)}.")
    stacked = torch.stack([m.bool().cpu() for m in masks])  # (rows, n_blocks, n_elements)
    delta = torch.tensor([float(d) for d in deltas], dtype=torch.float32)[:, None]  # (rows, 1)
    return {
        block: torch.where(stacked[:, block], 1.0 + delta, torch.ones(()))  # (rows, n_elements)
        for block in range(stacked.shape[1])
        if stacked[:, block].any()
    }


def _scaled(x: torch.Tensor, scale: torch.Tensor, positions: str) -> torch.Tensor:
    """x (b, t, w) times scale (rows, w) at the chosen positions; rows is b or 1."""
    if scale.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"The scales have {scale.shape[0]} rows but the batch has {x.shape[0]}; give one row per "
            "prompt (or one for all)."
        )
    scale = scale.to(x.device, x.dtype)[:, None, :]  # (rows, 1, w)
    if positions == "all":
        return x * scale
    if x.shape[1] == 1:  # a decode step: "last" only touches the prompt's last token
        return x
    return torch.cat([x[:, :-1], x[:, -1:] * scale], dim=1)


@contextmanager
def intervene(model: nn.Module, scales: dict[int, torch.Tensor], site: str, positions: str) -> Iterator[None]:
    """While active, multiply the site's activations of block l by scales[l] (rows, n_elements) at `positions`."""
    _check_site(site)
    _check_positions(positions)
    modules = site_modules(model, site)
    width = n_elements(model, site)
    for block, scale in scales.items():
        if not 0 <= block < len(modules):
            raise ValueError(f"Block {block} does not exist; the model has blocks 0..{len(modules) - 1}.")
        if scale.dim() != 2 or scale.shape[1] != width:
            raise ValueError(
                f"Scales for block {block} are {tuple(scale.shape)}; expected (rows, {width}) for "
                f"site {site!r}. Build them with sadi_scales from masks of this model and site."
            )

    def head_hook(scale: torch.Tensor, head_dim: int):
        expanded = scale.float().repeat_interleave(head_dim, dim=1)  # (rows, H * head_dim)

        def hook(module, args):
            return (_scaled(args[0], expanded, positions), *args[1:])  # o_proj input (b, t, H * head_dim)

        return hook

    def hidden_hook(scale: torch.Tensor):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (_scaled(output[0], scale, positions), *output[1:])
            return _scaled(output, scale, positions)  # MLP output (b, t, d)

        return hook

    with registered_hooks() as handles:
        for block, scale in scales.items():
            module = modules[block]
            if site == "head":
                handles.append(module.register_forward_pre_hook(head_hook(scale, _head_dim(model, module))))
            else:
                handles.append(module.register_forward_hook(hidden_hook(scale.float())))
        yield


def generate_sadi(
    model: nn.Module,
    tokenizer,
    user_messages: Sequence[str],
    masks: Sequence[torch.Tensor],
    deltas: Sequence[float],
    site: str,
    positions: str,
    max_new_tokens: int = 50,
    stop_loops: bool = True,
) -> list[str]:
    """Greedy responses in one batched call, row r steered by SADI with masks[r] and deltas[r]."""
    if not len(user_messages) == len(masks) == len(deltas):
        raise ValueError(
            f"Got {len(user_messages)} messages, {len(masks)} masks and {len(deltas)} deltas; "
            "give one mask and one delta per message."
        )
    scales = sadi_scales(masks, deltas)

    def rows_scaled(rows: torch.Tensor):  # the scales of the batch rows still being generated
        return intervene(model, {b: s[rows.cpu()] for b, s in scales.items()}, site, positions)

    with _left_padding(tokenizer):
        return decoding.generate(
            model, tokenizer, user_messages, None, max_new_tokens, row_context=rows_scaled, stop_loops=stop_loops
        )

"""Batched extraction: block outputs and attention-to-prefix at the shared tail positions, in one pass.

For every block l and every tail position t (the chat-template tokens after the user text):
- hidden[l, t]: the block's output hidden state (the residual stream after block l);
- attn_prefix[l, h, t]: sum over prefix positions j of head h's attention weight A[l, h, t, j].
Prompts are left-padded so the tail sits at the last positions of every row; position ids are
rebuilt from the attention mask so padding does not shift rotary positions. The LM head is never run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import cache_key, cached_tensors
from .data import EncodedPrompt

EXTRACTION_VERSION = 1  # bump when the computation below changes, so cached entries are not reused


@dataclass
class Activations:
    """What one extraction pass keeps, for n prompts."""

    hidden: torch.Tensor  # (n, n_blocks, n_tail, d) float32
    attn_prefix: torch.Tensor  # (n, n_blocks, n_heads, n_tail) float32; zeros for unprefixed prompts

    @property
    def attn_prefix_mean(self) -> torch.Tensor:
        """Head-averaged attention-to-prefix, (n, n_blocks, n_tail)."""
        return self.attn_prefix.mean(dim=2)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (decoder layers) of a causal LM, whatever its architecture."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"Could not find a list of {n_layers} blocks in {type(model).__name__}.")


def find_attention(block: nn.Module) -> nn.Module:
    """The self-attention module of a block (the first child whose class name ends in 'Attention')."""
    for module in block.modules():
        if type(module).__name__.endswith("Attention"):
            return module
    raise ValueError(f"No attention module found in block {type(block).__name__}.")


def block_output(output) -> torch.Tensor:
    """The hidden-state tensor of a block's output (a tensor, or a tuple whose first item it is)."""
    return output[0] if isinstance(output, tuple) else output


def pad_left(prompts: list[EncodedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, prefix_mask, each (batch, max_len), with padding on the left."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    prefix = torch.zeros((len(prompts), width))
    for row, prompt in enumerate(prompts):
        offset = width - len(prompt.input_ids)
        ids[row, offset:] = torch.tensor(prompt.input_ids)
        mask[row, offset:] = 1
        if prompt.prefix_span is not None:
            prefix[row, offset + prompt.prefix_span[0]: offset + prompt.prefix_span[1]] = 1.0
    return ids, mask, prefix


@torch.inference_mode()
def extract(model: nn.Module, prompts: list[EncodedPrompt], n_tail: int, pad_id: int, batch_size: int = 16,
            desc: str = "extract") -> Activations:
    """Run the prompts through the model's blocks in batches; see the module docstring."""
    blocks = find_blocks(model)
    base = getattr(model, model.base_model_prefix, model)  # the decoder without the LM head
    device = next(model.parameters()).device
    hidden_out, attn_out = [], []
    state: dict = {}

    def keep_hidden(index):
        def hook(module, args, output):
            state["hidden"][index] = block_output(output)[:, -n_tail:].float()  # (b, n_tail, d)
        return hook

    def keep_attention(index):
        def hook(module, args, output):
            weights = output[1]  # (b, heads, seq, seq), eager attention
            if weights is None:
                raise ValueError("Attention weights are unavailable: load the model with attn_implementation='eager'.")
            rows = weights[:, :, -n_tail:, :].float()  # (b, heads, n_tail, seq)
            state["attn"][index] = torch.einsum("bhts,bs->bht", rows, state["prefix"])
        return hook

    handles = [b.register_forward_hook(keep_hidden(i)) for i, b in enumerate(blocks)]
    handles += [find_attention(b).register_forward_hook(keep_attention(i)) for i, b in enumerate(blocks)]
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False,
                          disable=len(prompts) <= batch_size):
            ids, mask, prefix = pad_left(prompts[start:start + batch_size], pad_id)
            state.update(hidden=[None] * len(blocks), attn=[None] * len(blocks), prefix=prefix.to(device))
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            base(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                 use_cache=False)
            hidden_out.append(torch.stack(state["hidden"], dim=1).cpu())  # (b, n_blocks, n_tail, d)
            attn_out.append(torch.stack(state["attn"], dim=1).cpu())  # (b, n_blocks, heads, n_tail)
    finally:
        for handle in handles:
            handle.remove()
    return Activations(hidden=torch.cat(hidden_out), attn_prefix=torch.cat(attn_out))


def extract_cached(model: nn.Module, model_key: str, prompts: list[EncodedPrompt], n_tail: int, pad_id: int,
                   batch_size: int = 16, desc: str = "extract") -> Activations:
    """`extract`, cached on disk under a key of (model, dtype, prompt texts and spans, n_tail, code version)."""
    key = cache_key(
        "activations", EXTRACTION_VERSION, model=model_key, dtype=str(next(model.parameters()).dtype),
        prompts=[(p.text, p.prefix_span) for p in prompts], n_tail=n_tail,
    )
    tensors = cached_tensors("activations", key, lambda: vars(
        extract(model, prompts, n_tail, pad_id, batch_size=batch_size, desc=desc)))
    return Activations(hidden=tensors["hidden"], attn_prefix=tensors["attn_prefix"])

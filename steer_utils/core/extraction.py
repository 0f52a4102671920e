"""Batched extraction: block outputs and attention-to-prefix at the shared tail positions.

For every block l and every tail position t (the chat-template tokens after the user text):
- hidden[l, t]: the block's output hidden state (the residual stream after block l);
- attn_prefix[l, h, t]: sum over prefix positions j of head h's attention weight A[l, h, t, j];
- attn_user[l, t, h, :] (optional, for the enrichment test): head h's attention row over the user-text positions.

Speed (see `make bench`): the tokens every prompt of a set shares at the start (template head, system prompt,
concept prefix, statement template) run once; their keys and values are copied into every batch, so each
prompt only pays for its own statement and the tail. Prompts are padded in the middle (shared part, padding,
own part) so the tail sits at the last positions; position ids come from the attention mask so padding does
not shift rotary positions. The LM head is never run. `extract_reference` is the slow, obvious loop
(batch 1, two full passes with `output_hidden_states` / `output_attentions`), kept for tests and the benchmark.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .prompting import EncodedPrompt
from .resources import halving_batches, registered_hooks

EXTRACTION_VERSION = 2  # bump when the computation below changes, so cached entries are not reused


@dataclass
class Activations:
    """What one extraction pass keeps, for n prompts."""

    hidden: torch.Tensor  # (n, n_blocks, n_tail, d) float32
    attn_prefix: torch.Tensor  # (n, n_blocks, n_heads, n_tail) float32; zeros for unprefixed prompts
    attn_user: torch.Tensor | None = None  # (n, n_blocks, n_tail, n_heads, W) float32, W = longest user text

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


def shared_length(prompts: list[EncodedPrompt], n_tail: int) -> int:
    """Length of the token prefix all prompts share, leaving every prompt at least its tail as its own part."""
    first = prompts[0].input_ids
    common = 0
    while common < len(first) and all(
        len(p.input_ids) > common and p.input_ids[common] == first[common] for p in prompts
    ):
        common += 1
    return max(0, min(common, min(len(p.input_ids) for p in prompts) - n_tail))


def user_layout(prompts: list[EncodedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """(user-text lengths (n,), prefix spans relative to the user text (n, 2)), the enrichment test's inputs."""
    lengths = torch.tensor([p.tail_start - p.user_start for p in prompts])
    spans = torch.tensor(
        [
            [p.prefix_span[0] - p.user_start, p.prefix_span[1] - p.user_start] if p.prefix_span else [0, 0]
            for p in prompts
        ]
    )
    return lengths, spans


def _layout(prompts: list[EncodedPrompt], shared: int, pad_id: int):
    """Own parts padded between the shared part and themselves; per row, the full-width column of each position.

    Returns ids (b, w) of the own parts, mask (b, shared + w), columns (list of (len_i,) long tensors).
    """
    width = max(len(p.input_ids) for p in prompts) - shared
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.ones((len(prompts), shared + width), dtype=torch.long)
    columns = []
    for row, prompt in enumerate(prompts):
        own = len(prompt.input_ids) - shared
        ids[row, width - own :] = torch.tensor(prompt.input_ids[shared:])
        mask[row, shared : shared + width - own] = 0
        position = torch.arange(len(prompt.input_ids))
        columns.append(torch.where(position < shared, position, position + width - own))
    return ids, mask, columns


@torch.inference_mode()
def extract(
    model: nn.Module,
    prompts: list[EncodedPrompt],
    n_tail: int,
    pad_id: int,
    batch_size: int = 16,
    keep_user_attention: bool = False,
    share_prefix: bool = True,
    desc: str = "extract",
) -> Activations:
    """Run the prompts through the model's blocks in batches; see the module docstring."""
    from transformers import DynamicCache

    blocks = find_blocks(model)
    base = getattr(model, model.base_model_prefix, model)  # the decoder without the LM head
    device = next(model.parameters()).device
    shared = shared_length(prompts, n_tail) if share_prefix else 0
    user_width = max(p.tail_start - p.user_start for p in prompts)
    out: dict[str, list] = {"hidden": [], "attn_prefix": [], "attn_user": []}
    state: dict = {"active": False}

    def keep_hidden(index):
        def hook(module, args, output):
            if state["active"]:
                state["hidden"][index] = block_output(output)[:, -n_tail:].float()  # (b, n_tail, d)

        return hook

    def keep_attention(index):
        def hook(module, args, output):
            if not state["active"]:
                return
            weights = output[1]  # (b, heads, own width, shared + own width), eager attention
            if weights is None:
                raise ValueError("Attention weights are unavailable: load the model with attn_implementation='eager'.")
            rows = weights[:, :, -n_tail:, :].float()  # (b, heads, n_tail, columns)
            state["attn_prefix"][index] = torch.einsum("bhts,bs->bht", rows, state["prefix"])
            if keep_user_attention:  # (b, n_tail, heads, W): gather each row's user-text columns
                index_ = state["user_columns"][:, None, None, :].expand(-1, rows.shape[1], n_tail, -1)
                picked = rows.gather(3, index_) * state["user_valid"][:, None, None, :]
                state["attn_user"][index] = picked.permute(0, 2, 1, 3)

        return hook

    cache = None
    with registered_hooks() as handles:
        handles += [b.register_forward_hook(keep_hidden(i)) for i, b in enumerate(blocks)]
        handles += [find_attention(b).register_forward_hook(keep_attention(i)) for i, b in enumerate(blocks)]
        if shared:  # the shared part once, batch 1; its keys and values serve every batch
            cache = DynamicCache(config=model.config)
            base(
                input_ids=torch.tensor([prompts[0].input_ids[:shared]], device=device),
                past_key_values=cache,
                use_cache=True,
            )

        def run(batch: list[EncodedPrompt]) -> dict[str, torch.Tensor]:  # one batch; halved if out of memory
            ids, mask, columns = _layout(batch, shared, pad_id)
            prefix = torch.zeros(mask.shape)
            user_columns = torch.zeros((len(batch), user_width), dtype=torch.long)
            user_valid = torch.zeros((len(batch), user_width))
            for row, prompt in enumerate(batch):
                if prompt.prefix_span is not None:
                    prefix[row, columns[row][prompt.prefix_span[0] : prompt.prefix_span[1]]] = 1.0
                user = columns[row][prompt.user_start : prompt.tail_start]
                user_columns[row, : len(user)] = user
                user_valid[row, : len(user)] = 1.0
            state.update(
                active=True,
                hidden=[None] * len(blocks),
                attn_prefix=[None] * len(blocks),
                attn_user=[None] * len(blocks),
                prefix=prefix.to(device),
                user_columns=user_columns.to(device),
                user_valid=user_valid.to(device),
            )
            try:
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
                past = None
                if cache is not None:
                    past = copy.deepcopy(cache)
                    past.batch_repeat_interleave(len(batch))
                base(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=positions.to(device),
                    past_key_values=past,
                    use_cache=past is not None,
                )
                names = ("hidden", "attn_prefix") + (("attn_user",) if keep_user_attention else ())
                kept = {name: torch.stack(state[name], dim=1).cpu() for name in names}  # (b, n_blocks, ...)
            finally:  # also after running out of memory: drop what the hooks kept of the failed batch
                state.update(active=False, hidden=None, attn_prefix=None, attn_user=None)
            progress.update(len(batch))
            return kept

        with tqdm(total=len(prompts), desc=desc, leave=False, disable=len(prompts) <= batch_size) as progress:
            for part in halving_batches(run, prompts, batch_size, "extraction"):
                for name, value in part.items():
                    out[name].append(value)
    return Activations(
        hidden=torch.cat(out["hidden"]),
        attn_prefix=torch.cat(out["attn_prefix"]),
        attn_user=torch.cat(out["attn_user"]) if keep_user_attention else None,
    )


@torch.inference_mode()
def extract_reference(model: nn.Module, prompts: list[EncodedPrompt], n_tail: int) -> Activations:
    """The official code's loop: one prompt at a time, fp32 as loaded, one full pass with `output_attentions`
    and another with `output_hidden_states` (LM head included). The last block's entry is after the final norm,
    as `output_hidden_states` returns it."""
    device = next(model.parameters()).device
    hidden, attn = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt.input_ids], device=device)
        attentions = model(ids, output_attentions=True).attentions  # n_blocks × (1, heads, seq, seq)
        states = model(ids, output_hidden_states=True).hidden_states  # (n_blocks + 1) × (1, seq, d)
        hidden.append(torch.stack([h[0, -n_tail:] for h in states[1:]]).float())  # (n_blocks, n_tail, d)
        prefix = torch.zeros(len(prompt.input_ids), device=device)
        if prompt.prefix_span is not None:
            prefix[prompt.prefix_span[0] : prompt.prefix_span[1]] = 1.0
        attn.append(
            torch.stack([a[0, :, -n_tail:, :].float() @ prefix for a in attentions])
        )  # (n_blocks, heads, n_tail)
    return Activations(hidden=torch.stack(hidden).cpu(), attn_prefix=torch.stack(attn).cpu())

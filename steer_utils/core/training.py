"""Training one concept vector: the token each block reads (attention-guided or fixed), its labels (soft or
hard), the training set, and the settings the paper compares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .extraction import Activations, extract, find_blocks, user_layout
from .prompting import EncodedPrompt, paired_prompts, shared_tail, tail_token_names
from .protocol import ADOPTED, Protocol
from .vectors import METHODS, ConceptVector, block_norms, fit_concept_vector

# --- Token selection: which shared tail position each block reads its training features from ---------------------
TOKEN_SELECTIONS = ("fixed", "attention")  # where a concept vector reads each block: see `select_tokens`


def select_tokens(attn_prefix_mean: torch.Tensor, method: str = "attention", fixed_position: int = -1) -> torch.Tensor:
    """Tail index per block, shape (n_blocks,).

    attn_prefix_mean: (n_prompts, n_blocks, n_tail) head-averaged attention-to-prefix of the prefixed prompts.
    - `fixed`: the same tail position for every block (the prior method: -1, the last token of the
      assistant header);
    - `attention` (Eq. 3): per block, the position with the largest attention-to-prefix, maximised over prompts.
    """
    n_prompts, n_blocks, n_tail = attn_prefix_mean.shape
    if method == "fixed":
        if not -n_tail <= fixed_position < n_tail:
            raise ValueError(f"fixed_position={fixed_position} is outside the {n_tail} tail positions.")
        return torch.full((n_blocks,), fixed_position % n_tail, dtype=torch.long)
    if method == "attention":
        return attn_prefix_mean.amax(dim=0).argmax(dim=-1)  # (n_blocks, n_tail) -> (n_blocks,)
    raise ValueError(f"Unknown token selection '{method}'; use one of: {', '.join(TOKEN_SELECTIONS)}.")


def gather_selected(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Pick each block's selected tail position: (n, n_blocks, n_tail, ...) -> (n, n_blocks, ...)."""
    index = selected.view(1, -1, 1, *([1] * (values.dim() - 3))).expand(values.shape[0], -1, 1, *values.shape[3:])
    return values.gather(2, index).squeeze(2)


# --- Labels: hard (1 prefixed / 0 not) or soft (Eq. 4: attention-to-prefix at the selected token) ------------
LABEL_KINDS = ("hard", "soft")


def minmax_scale(labels: torch.Tensor) -> torch.Tensor:
    """Scale each column of (n, n_blocks) to [0, 1]; a constant column becomes all zeros (never NaN)."""
    low, high = labels.amin(dim=0, keepdim=True), labels.amax(dim=0, keepdim=True)
    span = high - low
    divisor = torch.where(span > 0, span, torch.ones_like(span))  # exact for any positive span, even a subnormal one
    return torch.where(span > 0, (labels - low) / divisor, torch.zeros_like(labels))


def make_labels(
    method: str, attn_selected: torch.Tensor, n_unprefixed: int, concept: str | None = None
) -> torch.Tensor:
    """Labels (n_prefixed + n_unprefixed, n_blocks): prefixed rows first, then unprefixed rows.

    attn_selected: (n_prefixed, n_blocks) head-averaged attention-to-prefix at each block's selected token.
    Raises a ValueError (naming `concept` when given) when a block's labels would be the same for every example,
    e.g. soft labels of a block whose selected token puts no attention at all on the prefix: there is nothing to fit.
    """
    if method not in LABEL_KINDS:
        raise ValueError(f"Unknown labels '{method}'; use one of: {', '.join(LABEL_KINDS)}.")
    of = f" of concept '{concept}'" if concept else ""
    n_prefixed, n_blocks = attn_selected.shape
    if n_prefixed < 1 or n_unprefixed < 1:
        raise ValueError(
            f"Labels{of} need prefixed and unprefixed examples, got {n_prefixed} and {n_unprefixed}; "
            "give at least one statement."
        )
    if method == "hard":
        positive = torch.ones(n_prefixed, n_blocks)
    else:
        positive = attn_selected.float()
        if not bool(torch.isfinite(positive).all()):
            raise ValueError(
                f"Soft labels{of} have NaN or infinite attention values; check the extraction "
                "(e.g. load the model with dtype='float32') or use hard labels."
            )
    raw = torch.cat([positive, torch.zeros(n_unprefixed, n_blocks)])
    constant = (raw.amax(dim=0) == raw.amin(dim=0)).nonzero().flatten().tolist()
    if constant:
        shown = constant if len(constant) <= 8 else constant[:8] + ["..."]
        raise ValueError(
            f"Soft labels{of} are all equal ({float(raw[0, constant[0]]):g}) over the {len(raw)} "
            f"examples in block(s) {shown}: the prefix gets no attention at the selected token, so there "
            "is nothing to fit; check the prefix span (prompting.encode_prompt) or use hard labels."
        )
    return minmax_scale(raw)


# --- Settings and the training set ---------------------------------------------------------------------------
# The settings the paper compares (notebooks 01 and 02): the prior method (a fixed token, hard labels), the attention-
# selected token with hard labels, and the paper's method (attention-selected token, soft labels).
PRIOR, HARD, OURS = "fixed-hard-rfm", "attention-hard-rfm", "attention-soft-rfm"


@dataclass(frozen=True)
class Setting:
    """Token selection × labels × vector method."""

    selection: str
    labels: str
    method: str = "rfm"

    @property
    def name(self) -> str:
        """e.g. 'attention-soft-rfm'."""
        return f"{self.selection}-{self.labels}-{self.method}"

    @classmethod
    def parse(cls, name: str) -> "Setting":
        """Inverse of `name`; checks each part."""
        parts = name.split("-")
        if (
            len(parts) != 3
            or parts[0] not in TOKEN_SELECTIONS
            or parts[1] not in LABEL_KINDS
            or parts[2] not in METHODS
        ):
            raise ValueError(
                f"Bad setting '{name}'; write <{'|'.join(TOKEN_SELECTIONS)}>-"
                f"<{'|'.join(LABEL_KINDS)}>-<{'|'.join(METHODS)}>, e.g. attention-soft-rfm."
            )
        return cls(*parts)


@dataclass
class ConceptActivations:
    """Prefixed and unprefixed activations of one concept, and the shared tail."""

    concept_class: str
    concept: str
    prefixed: Activations
    unprefixed: Activations
    tail: list[str]
    user_lengths: torch.Tensor  # (n,) user-text tokens of each prefixed prompt
    prefix_spans: torch.Tensor  # (n, 2) the prefix span within the user text
    contrast: Activations | None = None  # (k n, ...) prefixed prompts of k other concepts of the class; None: k = 0


def training_set(
    acts: ConceptActivations, setting: Setting
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features (m, n_blocks, d), labels (m, n_blocks), is_prefixed (m,), selected tail index per block).

    Rows: the n prefixed prompts (the positives, `is_prefixed`), the n unprefixed ones, then any contrast concepts'
    k n prefixed prompts, all read at this concept's selected token of each block; m = (2 + k) n; negatives get 0.
    """
    attn = acts.prefixed.attn_prefix_mean  # (n, n_blocks, n_tail)
    chosen = select_tokens(attn, setting.selection)
    negatives = [acts.unprefixed.hidden] + ([acts.contrast.hidden] if acts.contrast is not None else [])
    features = torch.cat([gather_selected(h, chosen) for h in [acts.prefixed.hidden, *negatives]])
    y = make_labels(
        setting.labels,
        gather_selected(attn, chosen),
        len(features) - len(attn),
        concept=f"{acts.concept_class}/{acts.concept}",
    )
    is_prefixed = torch.arange(len(features)) < len(acts.prefixed.hidden)
    return features, y, is_prefixed, chosen


def fit(
    acts: ConceptActivations, setting: Setting, model_name: str, seed: int = 0
) -> tuple[ConceptVector, list[dict], list[int]]:
    """Concept vector of one setting, each block's fit details, and each block's selected tail index."""
    features, y, is_prefixed, chosen = training_set(acts, setting)
    norms = block_norms(acts.unprefixed.hidden)
    meta = {
        "model": model_name,
        "concept_class": acts.concept_class,
        "concept": acts.concept,
        "token_selection": setting.selection,
        "labels": setting.labels,
        "setting": setting.name,
    }
    vector, details = fit_concept_vector(setting.method, features, y, is_prefixed, norms, meta, seed=seed)
    return vector, details, chosen.tolist()


# --- From a concept to its vector ----------------------------------------------------------------------------------
# An extractor runs prompts through the model: (model, prompts, n_tail, pad_id, batch_size, **options) -> Activations.
# `extraction.extract` by default; the notebooks pass one that reads and writes the disk cache.
Extractor = Callable[..., Activations]


def training_prompts(
    tokenizer,
    concept_class: str,
    concept: str,
    statements: Sequence[str],
    protocol: Protocol = ADOPTED,
    contrast: Sequence[str] = (),
) -> tuple[list[EncodedPrompt], list[EncodedPrompt], list[list[EncodedPrompt]]]:
    """(prefixed, unprefixed, contrast) prompts a concept's vector trains on: the paired prompts with the protocol's
    system prompt, and the prefixed prompts of the `contrast` concepts (the notebooks: `protocol.contrast` class
    neighbours, `experiments.data.neighbour_concepts`), one list per contrast concept."""
    prefixed, plain = paired_prompts(tokenizer, concept_class, concept, list(statements), protocol.system)
    others = [
        paired_prompts(tokenizer, concept_class, other, list(statements), protocol.system)[0] for other in contrast
    ]
    return prefixed, plain, others


def concept_activations(
    model,
    tokenizer,
    concept_class: str,
    concept: str,
    statements: Sequence[str],
    protocol: Protocol = ADOPTED,
    contrast: Sequence[str] = (),
    batch_size: int = 16,
    extractor: Extractor = extract,
) -> ConceptActivations:
    """The activations of one concept's training prompts (`training_prompts`), read at their shared tail.

    A contrast concept's prompts are its own prefixed prompts, so they are extracted exactly as that concept's own
    vector extracts them (same call, same options): with a caching `extractor`, a concept's prefixed activations
    are computed once and serve its own vector and every neighbour's contrast.
    """
    prefixed, plain, others = training_prompts(tokenizer, concept_class, concept, statements, protocol, contrast)
    tail_ids = shared_tail(prefixed + plain + [p for prompts in others for p in prompts])
    n_tail, pad = len(tail_ids), tokenizer.pad_token_id

    def run(prompts: list[EncodedPrompt], **options) -> Activations:
        return extractor(model, prompts, n_tail, pad, batch_size, **options)

    def run_prefixed(prompts: list[EncodedPrompt], name: str) -> Activations:
        return run(prompts, keep_user_attention=True, desc=f"extract {name}")

    shared = [run_prefixed(prompts, other) for prompts, other in zip(others, contrast)]
    return ConceptActivations(
        concept_class,
        concept,
        run_prefixed(prefixed, concept),
        run(plain, desc="extract unprefixed"),
        tail_token_names(tokenizer, tail_ids),
        *user_layout(prefixed),
        Activations(torch.cat([a.hidden for a in shared]), torch.cat([a.attn_prefix for a in shared]))
        if shared
        else None,
    )


def for_protocol(vector: ConceptVector, protocol: Protocol, n_blocks: int, n_statements: int) -> ConceptVector:
    """The vector as `protocol` steers it: only its steered blocks, its norms scaled as it scales and times its eps
    multiplier, so `vector.apply(model, c)` adds what the notebooks' grid adds at coefficient c."""
    blocks, multiplier = protocol.steered_blocks(n_blocks)
    scaled = vector.scaled(protocol.scaling, blocks)
    metadata = dict(scaled.metadata, protocol=protocol.name, n_statements=str(n_statements))
    if multiplier != 1.0:
        metadata["eps_multiplier"] = str(multiplier)  # folded into the norms
    return ConceptVector(
        {b: scaled.directions[b] for b in blocks}, {b: scaled.norms[b] * multiplier for b in blocks}, metadata
    )


def train(
    model,
    tokenizer,
    concept_class: str,
    concept: str,
    statements: Sequence[str],
    *,
    protocol: Protocol = ADOPTED,
    setting: str = OURS,
    contrast: Sequence[str] = (),
    model_name: str = "model",
    seed: int = 0,
    batch_size: int = 16,
    extractor: Extractor = extract,
) -> ConceptVector:
    """The concept vector of `concept` on `model`: its activations, the fit of `setting`, then `for_protocol`."""
    acts = concept_activations(
        model, tokenizer, concept_class, concept, statements, protocol, contrast, batch_size, extractor
    )
    vector, _, _ = fit(acts, Setting.parse(setting), model_name, seed)
    return for_protocol(vector, protocol, len(find_blocks(model)), len(statements))

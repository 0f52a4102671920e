"""Chat-template prompts of the method: the concept prefix, rendering, encoding with the prefix's span, and the
tail tokens every prompt of a set shares."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

CLASSES = ("fears", "places", "personas", "experts", "moods")


PREFIX_TEMPLATES = {
    "fears": "Personify someone who is terrified of {c}.",
    "places": "Personify someone who loves {c}.",
    "personas": "Take on the role of {c}.",
    "experts": "Take on the role of an expert {c}.",
    "moods": "Take on a {c} mood.",
}


LOWERCASE_CLASSES = frozenset({"fears", "moods", "experts"})  # as in the paper; places/personas keep case


STATEMENT_TEMPLATE = "What are your thoughts on the following statement? Statement: {s}"


QUESTION_SUFFIX = "Answer in 20 words or less."


def check_class(concept_class: str) -> str:
    """Return `concept_class` or raise a ValueError naming the valid classes."""
    if concept_class not in CLASSES:
        raise ValueError(f"Unknown concept class '{concept_class}'; use one of: {', '.join(CLASSES)}.")
    return concept_class


def concept_text(concept_class: str, concept: str) -> str:
    """The concept as written in prompts (lower-cased for fears, moods and experts)."""
    return concept.lower() if check_class(concept_class) in LOWERCASE_CLASSES else concept


def prefix_text(concept_class: str, concept: str) -> str:
    """The concept-activating prefix, e.g. 'Take on a cheerful mood.'."""
    # str.replace, not str.format: braces or quotes inside a concept name stay literal.
    return PREFIX_TEMPLATES[check_class(concept_class)].replace("{c}", concept_text(concept_class, concept))


def user_text(statement: str, prefix: str | None = None) -> str:
    """The user message of a training prompt, with or without the concept prefix."""
    body = STATEMENT_TEMPLATE.replace("{s}", statement)
    return f"{prefix} {body}" if prefix else body


def render_prompt(tokenizer, user: str, system: str | None = None) -> str:
    """`user` wrapped in the model's chat template, ending with the generation prompt.

    system: None passes no system message (the template may add its own default, as SmolLM2's does); a string
    (even '') is passed as the system message.
    """
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class EncodedPrompt:
    """A rendered prompt and where its parts sit, in token positions."""

    text: str
    input_ids: list[int]
    prefix_span: tuple[int, int] | None  # [start, end) of the prefix tokens; None when unprefixed
    user_start: int  # first token that overlaps the user text
    tail_start: int  # first token that starts after the user text

    @property
    def n_tail(self) -> int:
        """How many tokens follow the user text (the chat template's tail)."""
        return len(self.input_ids) - self.tail_start


_SPECIAL_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special (control) tokens, e.g. `<|im_end|>` or `<start_of_turn>`; cached per tokenizer."""
    try:
        return _SPECIAL_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids = frozenset(i for i, token in added.items() if getattr(token, "special", False))
    ids |= frozenset(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        _SPECIAL_IDS[tokenizer] = ids
    except TypeError:
        pass
    return ids


def encode_prompt(
    tokenizer, user: str, prefix: str | None = None, concept: str | None = None, system: str | None = None
) -> EncodedPrompt:
    """Render and tokenize one prompt (with `system` as in `render_prompt`), locating the prefix span and the tail
    after the user text."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("Token bookkeeping needs a fast (Rust) tokenizer with offsets; load it with use_fast=True.")
    text = render_prompt(tokenizer, user, system)
    user_char = text.rfind(user)
    if user_char < 0:
        raise ValueError(
            "The chat template altered the user text, so token positions cannot be located; use a "
            "template that inserts the message content verbatim (no trim, upper or escape filters)."
        )
    user_char_end = user_char + len(user)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    tail_start = next((i for i, (s, _) in enumerate(offsets) if s >= user_char_end), len(offsets))
    user_start = next((i for i, (s, e) in enumerate(offsets) if e > user_char and e > s), tail_start)
    special = special_token_ids(tokenizer)
    markup = [i for i in range(user_start, tail_start) if enc["input_ids"][i] in special]
    if markup:  # e.g. a concept containing "<|im_end|>": the model would read it as chat structure
        token = text[offsets[markup[0]][0] : offsets[markup[0]][1]] or tokenizer.decode([enc["input_ids"][markup[0]]])
        where = f"concept {concept!r}" if concept else "the statement"
        raise ValueError(
            f"The prompt text of {where} contains the special token {token!r}, which the model would "
            "read as chat markup; remove it from the concept or statement."
        )
    span = None
    if prefix is not None:
        p_start = text.find(prefix, user_char, user_char_end)
        p_end = p_start + len(prefix)
        inside = [i for i, (s, e) in enumerate(offsets) if p_start >= 0 and e > s and s < p_end and e > p_start]
        if not inside:
            raise ValueError(
                f"Could not locate the prefix of concept '{concept or prefix}' in its prompt; "
                "check that the chat template keeps the user text verbatim."
            )
        span = (inside[0], inside[-1] + 1)
    ids = list(enc["input_ids"])
    return EncodedPrompt(text=text, input_ids=ids, prefix_span=span, user_start=user_start, tail_start=tail_start)


def paired_messages(concept_class: str, concept: str, statements: list[str]) -> tuple[list[str], list[str]]:
    """(prefixed, unprefixed) user messages for one concept, one pair per statement."""
    prefix = prefix_text(concept_class, concept)
    return [user_text(s, prefix) for s in statements], [user_text(s) for s in statements]


def paired_prompts(tokenizer, concept_class: str, concept: str, statements: list[str], system: str | None = None):
    """(prefixed, unprefixed) EncodedPrompts for one concept, one pair per statement (`system`: see `render_prompt`)."""
    prefix = prefix_text(concept_class, concept)
    prefixed, plain = paired_messages(concept_class, concept, statements)
    return (
        [encode_prompt(tokenizer, m, prefix, concept, system) for m in prefixed],
        [encode_prompt(tokenizer, m, system=system) for m in plain],
    )


def shared_tail(prompts: list[EncodedPrompt]) -> list[int]:
    """Token ids of the tail every prompt ends with; raises if the prompts share none."""
    if not prompts:
        raise ValueError("No prompts given.")
    n = min(p.n_tail for p in prompts)
    while n > 0 and len({tuple(p.input_ids[-n:]) for p in prompts}) > 1:
        n -= 1
    if n == 0:
        raise ValueError("The prompts share no tail tokens after the user text; is the chat template consistent?")
    return prompts[0].input_ids[-n:]


def tail_token_names(tokenizer, tail_ids: list[int]) -> list[str]:
    """Readable names of tail positions, e.g. ['<|im_end|>', '\\\\n', ..., 'assistant', '\\\\n']."""
    return [tokenizer.decode([t]).replace("\n", "\\n") for t in tail_ids]

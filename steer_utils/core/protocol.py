"""The steering protocol: how a concept vector is trained and applied, beside the setting (token × labels × method).

Notebook 06 varies each field on the development split (`data.development_concepts`); `PAPER` is the protocol of
the paper as this project ran it before that study.
- scaling: 'block_norm' adds eps × (block l's median hidden-state norm) × v_l, so the shift grows with depth as the
  residual stream does (SmolLM2: 73 at block 1, 663 at the last); 'mean_norm' adds eps × (the mean of those norms
  over the steered blocks) × v_l, one size at every depth: the authors' single absolute coefficient on unit
  vectors, written relative to the model's scale so that one grid serves several models.
- blocks: every steerable block ('all', every block but the first), or the 'middle' half of them with eps × 2, so
  the total shift is about the same.
- positions: 'all' (every prompt and generated position, the paper's) or 'answer' (the prompt's last position and
  every generated one: the question itself is read unsteered).
- system_prompt: 'default' (no system message: the template adds its own, SmolLM2's "You are a helpful AI
  assistant named SmolLM..."), 'empty' (an empty system message) or 'neutral' (`NEUTRAL_SYSTEM_PROMPT`), in
  extraction and generation alike.
- contrast (beyond the paper): the prefixed prompts of this many other concepts of the same class join the
  negatives with label 0 (`data.neighbour_concepts`, the ones after it in the class list), so the vector must tell
  the concept from its class, not only "a role instruction is present".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

SCALINGS = ("block_norm", "mean_norm")
BLOCK_SPANS = ("all", "middle")
SYSTEM_PROMPTS = ("default", "empty", "neutral")
NEUTRAL_SYSTEM_PROMPT = "Reply to the user."
MAX_CONTRAST = 8


def default_blocks(n_blocks: int) -> list[int]:
    """All blocks but the first (the paper's default)."""
    return list(range(1, n_blocks))


POSITIONS = ("all", "answer")  # where steering applies: every position, or the answer's (see `steer`)


def check_positions(positions: str) -> None:
    """Raise a clear error unless `positions` is one of POSITIONS."""
    if positions not in POSITIONS:
        raise ValueError(f"Unknown steering positions {positions!r}; use 'all' or 'answer'.")


@dataclass(frozen=True)
class Protocol:
    """How a vector is trained (system prompt, contrast) and applied (scaling, blocks, positions, system prompt)."""

    scaling: str = "block_norm"
    blocks: str = "all"
    positions: str = "all"
    system_prompt: str = "default"
    contrast: int = 0

    def __post_init__(self):
        for name, allowed in (
            ("scaling", SCALINGS),
            ("blocks", BLOCK_SPANS),
            ("positions", POSITIONS),
            ("system_prompt", SYSTEM_PROMPTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Protocol {name}={getattr(self, name)!r} is unknown; use one of: {', '.join(allowed)}."
                )
        if (
            isinstance(self.contrast, bool)
            or not isinstance(self.contrast, int)
            or not 0 <= self.contrast <= MAX_CONTRAST
        ):
            raise ValueError(
                f"Protocol contrast={self.contrast!r} must be an integer in 0..{MAX_CONTRAST} (other "
                "concepts of the class used as negatives; 0 = the paper's training)."
            )

    def changes(self) -> dict:
        """The fields that differ from the paper's protocol (empty for `PAPER`, so its cache keys stay as before)."""
        return {k: v for k, v in asdict(self).items() if v != getattr(PAPER, k)}

    def key_inputs(self) -> dict:
        """What a cache key of work done under this protocol adds: {'protocol': changes}, nothing for `PAPER`."""
        return {"protocol": self.changes()} if self.changes() else {}

    @property
    def name(self) -> str:
        """'paper', or the changed fields, e.g. 'contrast=3,scaling=mean_norm'."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.changes().items())) or "paper"

    @classmethod
    def parse(cls, name: str) -> "Protocol":
        """Inverse of `name`."""
        if name == "paper":
            return PAPER
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for part in name.split(","):
            key, _, value = part.partition("=")
            if key not in known or not value:
                raise ValueError(
                    f"Bad protocol {name!r}; write 'paper' or fields such as 'contrast=3,scaling=mean_norm' "
                    f"(fields: {', '.join(known)})."
                )
            values[key] = int(value) if key == "contrast" and value.isdigit() else value
        return cls(**values)

    @property
    def system(self) -> str | None:
        """The system message for `prompting.render_prompt` (None: none passed)."""
        return {"default": None, "empty": "", "neutral": NEUTRAL_SYSTEM_PROMPT}[self.system_prompt]

    def steered_blocks(self, n_blocks: int) -> tuple[list[int], float]:
        """(blocks to steer, eps multiplier): every block but the first, or the middle half of those with eps × 2."""
        candidates = default_blocks(n_blocks)
        if self.blocks == "all":
            return candidates, 1.0
        k = max(1, round(len(candidates) / 2))
        start = (len(candidates) - k) // 2
        return candidates[start : start + k], len(candidates) / k


PAPER = Protocol()
ADOPTED = Protocol(contrast=3)
"""The protocol of notebooks 01-05 and the benchmark, chosen in notebook 06 on the development split (SmolLM2,
default profile): its two best arms by held-out steerability both train class-contrastively with 3 other concepts of
the class (difference of means 0.08, RFM 0.05, paper 0.00; `results/smollm2-135m/06_choice.csv`). The other factors
moved nothing there, so they keep the paper's levels. `PAPER` reproduces the paper's training."""


def resolve_protocol(name: str | None) -> Protocol:
    """A notebook's `steering_protocol` parameter: None -> `ADOPTED`, else `Protocol.parse(name)` ('paper', ...)."""
    if name is None:
        return ADOPTED
    if not isinstance(name, str):
        raise ValueError(
            f"steering_protocol must be None (notebook 06's choice), 'paper' or fields such as "
            f"'contrast=3', got {name!r}."
        )
    return Protocol.parse(name)


def output_variant(protocol: Protocol) -> str:
    """The results/figures subfolder of a run under `protocol`: '' for `ADOPTED` (the committed tables), else
    'protocol-<name>' (e.g. 'protocol-paper'), so a run off the adopted protocol never overwrites them."""
    return "" if protocol == ADOPTED else f"protocol-{protocol.name}"

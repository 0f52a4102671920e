"""Run sizes: `smoke` (tests, minutes), `compact` (half the default, for a model too slow for it, e.g. the 1.5B),
`default` (`make all`), `full` (the paper's benchmark)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Profile:
    """How much of the benchmark a run covers (None = all)."""

    name: str
    n_concepts_per_class: int | None
    n_statements: int | None
    n_questions: int
    max_new_tokens: int
    sweep_concepts_per_class: int  # concepts per class in the sweeps of notebook 02
    statement_counts: tuple[int, ...]  # training-set sizes of the statement-count sweep
    layer_concepts_per_class: int = 1  # concepts per class steered through top/bottom/random block sets (03)
    fractions: tuple[float, ...] = (0.25, 0.5)  # ... shares of the steerable blocks those sets keep (03)
    n_random: int = 3  # ... random sets drawn per share (03)
    sadi_head_ks: tuple[int, ...] = (1, 4, 10)  # SADI tuning grid (05): heads kept by the mask
    sadi_hidden_ks: tuple[int, ...] = (1, 5, 20)  # ... MLP output dimensions kept by the mask
    sadi_deltas: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 20.0, 80.0)  # ... scalings a' = a + delta * a
    study_concepts_per_class: int = 4  # development concepts per class in the protocol study (06; at most 4)
    study_coefficients: tuple[float, ...] = (0.01, 0.015, 0.02, 0.025, 0.035, 0.05)  # its shared eps grid (06)
    window_concepts_per_class: int = 4  # development concepts per class the working window is found on (07)
    window_coefficients: tuple[float, ...] = (0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1)  # its wide eps grid (07)

    def as_dict(self) -> dict:
        """Plain dict, for tables."""
        return asdict(self)


DEFAULT = Profile(  # `make all`
    "default",
    n_concepts_per_class=20,
    n_statements=64,
    n_questions=5,
    max_new_tokens=50,
    sweep_concepts_per_class=2,
    statement_counts=(16, 32, 64),
    layer_concepts_per_class=3,
)

PROFILES = {
    "smoke": Profile(
        "smoke",
        n_concepts_per_class=1,
        n_statements=16,
        n_questions=4,  # the fewest the held-out protocol takes: 2 to choose the coefficient on, 2 to score
        max_new_tokens=16,
        sweep_concepts_per_class=1,
        statement_counts=(8, 16),
        layer_concepts_per_class=1,
        fractions=(0.5,),  # 4 block sets (all, top, bottom, one random) instead of 11
        n_random=1,
        sadi_head_ks=(1, 4),
        sadi_hidden_ks=(1, 5),
        sadi_deltas=(1.0, 5.0),
        study_concepts_per_class=1,
        study_coefficients=(0.015, 0.035),
        window_concepts_per_class=1,
        window_coefficients=(0.015, 0.035, 0.05, 0.1),
    ),
    # the default's statements, questions and answers on half its concepts (10 per class)
    "compact": replace(
        DEFAULT,
        name="compact",
        n_concepts_per_class=10,
        sweep_concepts_per_class=1,
        layer_concepts_per_class=2,
        study_concepts_per_class=2,
        window_concepts_per_class=2,
    ),
    "default": DEFAULT,
    "full": Profile(
        "full",
        n_concepts_per_class=None,
        n_statements=None,
        n_questions=5,
        max_new_tokens=50,
        sweep_concepts_per_class=10,
        statement_counts=(50, 100, 200, 400),
        layer_concepts_per_class=20,
    ),
}


def _check_size(name: str, value) -> None:
    if isinstance(value, (list, tuple)):  # a list field (fractions, coefficients, counts): a non-empty list of numbers
        if not value or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in value):
            raise ValueError(f"Parameter {name} must be a non-empty list of positive numbers, got {value!r}.")
        return
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"Parameter {name} must be a positive integer or None (profile default), got {value!r}.")


def resolve_profile(profile: str, **overrides: int | tuple | list | None) -> Profile:
    """The named profile with any non-None overrides applied (e.g. n_statements=32)."""
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile '{profile}'; use one of: {', '.join(PROFILES)}.")
    unknown = set(overrides) - (set(Profile.__dataclass_fields__) - {"name"})
    if unknown:
        raise ValueError(
            f"Unknown profile field(s) {sorted(unknown)}; use: "
            f"{', '.join(sorted(Profile.__dataclass_fields__.keys() - {'name'}))}."
        )
    for key, value in overrides.items():
        _check_size(key, value)
    chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    return replace(PROFILES[profile], **chosen)

"""A notebook's setup in one call: its parameters checked, its profile, protocol and output folders, its run context."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..core.protocol import ADOPTED, Protocol, output_variant, resolve_protocol
from ..paths import figures_dir, results_dir
from . import parameters, pipeline, plots, window
from .profiles import Profile, resolve_profile


@dataclass(frozen=True)
class Start:
    """What a notebook's first cell sets up (`start`)."""

    model: str
    profile: Profile  # the named profile with the notebook's overrides (n_statements=..., ...)
    protocol: Protocol  # `steering_protocol` resolved (None: the adopted one)
    variant: str  # '' for the adopted protocol, else the results subfolder of a run off it
    out_dir: Path  # results/<model>/[<variant>/][shards/<i>-of-<n>/]
    fig_dir: Path  # figures/<model>/... likewise
    seed: int
    stop_loops: bool

    def context(self, model, tokenizer, statements: list[str], questions: dict[str, list[str]]) -> pipeline.RunContext:
        """The run's `RunContext`: the loaded model, the profile's answer length, and the model's eps window."""
        return pipeline.RunContext(
            model,
            tokenizer,
            self.model,
            statements,
            questions,
            self.profile.max_new_tokens,
            self.seed,
            stop_loops=self.stop_loops,
            coefficients=window.coefficient_window(self.model),
        )


def start(**values) -> Start:
    """Check a notebook's papermill parameters (`parameters.check_parameters`, one clear error per bad value), then
    resolve the profile (parameters named like a `Profile` field override it), the protocol and the output folders,
    and set the figure style."""
    parameters.check_parameters(**values)
    overrides = {f.name: values[f.name] for f in fields(Profile) if f.name in values and f.name != "name"}
    protocol = resolve_protocol(values["steering_protocol"]) if "steering_protocol" in values else ADOPTED
    variant = output_variant(protocol)
    shard = values.get("shard_index", 0), values.get("num_shards", 1)
    plots.set_style()
    return Start(
        model=values["model"],
        profile=resolve_profile(values["profile"], **overrides),
        protocol=protocol,
        variant=variant,
        out_dir=results_dir(values["model"], *shard, variant),
        fig_dir=figures_dir(values["model"], *shard, variant),
        seed=values.get("seed", 0),
        stop_loops=values.get("stop_loops", True),
    )

"""Figure style and saving: seaborn, readable at paper size, PNG + PDF."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

CLASS_PALETTE = dict(zip(("fears", "places", "personas", "experts", "moods"), sns.color_palette("colorblind", 5)))


def set_style() -> None:
    """Paper style: white grid, 9-pt text, 300-dpi output."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1, rc={"savefig.dpi": 300, "figure.dpi": 100})


def save_figure(fig: plt.Figure, folder: Path, name: str) -> list[Path]:
    """Save `fig` as `<folder>/<name>.png` and `.pdf`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.tight_layout()
    for path in paths:
        # A fixed creation date keeps the PDF byte-identical across reruns.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else {"Software": None}
        fig.savefig(path, bbox_inches="tight", metadata=metadata)
    return paths


def plot_data_overview(lengths, sample, statements) -> plt.Figure:
    """Three panels: concepts per class (benchmark vs sample), prefix token lengths, statement lengths."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    counts = (lengths.groupby("concept_class", sort=False).size().rename("benchmark").to_frame()
              .join(sample.groupby("concept_class", sort=False).size().rename("this run"))
              .reset_index().melt(id_vars="concept_class", var_name="set", value_name="concepts"))
    sns.barplot(counts, x="concept_class", y="concepts", hue="set", ax=axes[0])
    axes[0].set(xlabel="concept class", ylabel="number of concepts", title="Benchmark", ylim=(0, 135))
    axes[0].legend(title=None, ncol=2, loc="upper center")
    sns.boxplot(lengths, x="concept_class", y="prefix_tokens", hue="concept_class", palette=CLASS_PALETTE, ax=axes[1])
    axes[1].set(xlabel="concept class", ylabel="prefix length (tokens)", title="Concept prefix span")
    sns.histplot(statements, x="n_tokens", discrete=True, ax=axes[2])
    axes[2].set(xlabel="statement length (tokens)", ylabel="statements", title="Training statements")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    return fig

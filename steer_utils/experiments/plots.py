"""Figure style and saving: seaborn, readable at paper size, PNG + PDF."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import seaborn as sns

from ..cache import atomic_write
from .pipeline import CONTROLS

CLASS_PALETTE = dict(zip(("fears", "places", "personas", "experts", "moods"), sns.color_palette("colorblind", 5)))


def set_style() -> None:
    """Paper style: white grid, 9-pt text, 300-dpi output."""
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.1, rc={"savefig.dpi": 300, "figure.dpi": 100})


def save_figure(fig: plt.Figure, folder: Path, name: str) -> list[Path]:
    """Save `fig` as `<folder>/<name>.png` and `.pdf` (each written atomically); returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    for path in paths:
        # A fixed creation date keeps the PDF byte-identical across reruns.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else {"Software": None}
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight", metadata=metadata))
    return paths


def _ci_bars(ax: plt.Axes, at, rows, horizontal: bool = False) -> None:
    """Black CI whiskers [ci_low, ci_high] around each row's steerability, at positions `at` (bars' x, or y)."""
    error = [rows.steerability - rows.ci_low, rows.ci_high - rows.steerability]
    points = (rows.steerability, at) if horizontal else (at, rows.steerability)
    ax.errorbar(
        *points, **{"xerr" if horizontal else "yerr": error}, fmt="none", ecolor="black", elinewidth=0.8, capsize=2
    )


def plot_data_overview(lengths, sample, statements) -> plt.Figure:
    """Three panels: concepts per class (benchmark vs sample), prefix token lengths, statement lengths."""
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    counts = (
        lengths.groupby("concept_class", sort=False)
        .size()
        .rename("benchmark")
        .to_frame()
        .join(sample.groupby("concept_class", sort=False).size().rename("this run"))
        .reset_index()
        .melt(id_vars="concept_class", var_name="set", value_name="concepts")
    )
    sns.barplot(counts, x="concept_class", y="concepts", hue="set", seed=0, ax=axes[0])
    axes[0].set(xlabel="concept class", ylabel="number of concepts", title="Benchmark", ylim=(0, 135))
    axes[0].legend(title=None, ncol=2, loc="upper center")
    sns.boxplot(lengths, x="concept_class", y="prefix_tokens", hue="concept_class", palette=CLASS_PALETTE, ax=axes[1])
    axes[1].set(xlabel="concept class", ylabel="prefix length (tokens)", title="Concept prefix span")
    sns.histplot(statements, x="n_tokens", discrete=True, ax=axes[2])
    axes[2].set(xlabel="statement length (tokens)", ylabel="statements", title="Training statements")
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    return fig


def plot_steerability(table, hue_order=None, ax=None, title: str = "", compared: str = "setting") -> plt.Axes:
    """Bars of steerability per class (and 'all') for each value of the `compared` column, with 95% bootstrap CIs;
    the negative controls (`pipeline.CONTROLS`) in hatched grey."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    hue_order = list(dict.fromkeys(table[compared])) if hue_order is None else hue_order
    classes = list(dict.fromkeys(table.concept_class))
    width = 0.8 / len(hue_order)
    palette = sns.color_palette("deep", len(hue_order))
    greys = dict(zip(CONTROLS, ("0.55", "0.8")))  # the negative controls: grey, hatched
    for k, value in enumerate(hue_order):
        rows = table[table[compared] == value].set_index("concept_class").loc[classes]
        x = [i - 0.4 + width * (k + 0.5) for i in range(len(classes))]
        style = dict(color=greys[value], hatch="//", edgecolor="0.3") if value in greys else dict(color=palette[k])
        ax.bar(x, rows.steerability, width, label=value, **style)
        _ci_bars(ax, x, rows)
    ax.set_xticks(range(len(classes)), classes)
    ax.set(ylim=(0, 1.05), xlabel="concept class", ylabel="steerability (share of concepts)", title=title)
    ax.legend(fontsize=7, loc="upper left", frameon=True)
    return ax


def plot_selected_tokens(fits, tail: list[str], setting: str) -> plt.Figure:
    """Heatmaps, one per class: share of concepts whose block (x) selected each tail position (y)."""
    rows = fits[fits.setting == setting]
    classes = list(dict.fromkeys(rows.concept_class))
    n_blocks = int(rows.block.max()) + 1
    fig, axes = plt.subplots(1, len(classes), figsize=(2.3 * len(classes) + 1, 2.6), sharey=True, squeeze=False)
    for ax, cls in zip(axes[0], classes):
        part = rows[rows.concept_class == cls]
        share = (
            part.groupby(["selected", "block"])
            .size()
            .unstack(fill_value=0)
            .reindex(index=range(len(tail)), columns=range(n_blocks), fill_value=0)
            / part.concept.nunique()
        )
        sns.heatmap(
            share,
            ax=ax,
            vmin=0,
            vmax=1,
            cmap="viridis",
            cbar=ax is axes[0][-1],
            cbar_kws={"label": "share of concepts"},
            xticklabels=max(1, n_blocks // 6),
        )
        ax.set(title=cls, xlabel="block", ylabel="selected tail token" if ax is axes[0][0] else "")
        ax.set_yticks([i + 0.5 for i in range(len(tail))], tail, rotation=0)
    return fig


def plot_pca_by_label(features, labels, is_prefixed, blocks: list[int], title: str = "") -> plt.Figure:
    """PCA (2-D) of selected-token states at a few blocks; prefixed points coloured by soft label."""
    import torch

    fig, axes = plt.subplots(
        1, len(blocks), figsize=(3.1 * len(blocks) + 0.8, 3.0), squeeze=False, layout="constrained"
    )
    for ax, block in zip(axes[0], blocks):
        X = features[:, block].double()
        X = X - X.mean(0)
        coords = (X @ torch.linalg.svd(X, full_matrices=False)[2][:2].T).numpy()
        ax.scatter(coords[~is_prefixed, 0], coords[~is_prefixed, 1], s=8, c="lightgrey", label="unprefixed")
        points = ax.scatter(
            coords[is_prefixed, 0],
            coords[is_prefixed, 1],
            s=10,
            c=labels[is_prefixed, block],
            cmap="viridis",
            vmin=0,
            vmax=1,
            label="prefixed",
        )
        ax.set(title=f"block {block}", xlabel="PC 1", ylabel="PC 2" if ax is axes[0][0] else "")
    fig.colorbar(points, ax=axes[0].tolist(), label="soft label")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return fig


def plot_sweep(table, x: str, hue: str, xlabel: str, ax=None) -> plt.Axes:
    """Steerability ('all' classes) against a swept quantity, one line per `hue`, with CI bands."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    for (name, rows), colour in zip(table.groupby(hue, sort=False), sns.color_palette("deep")):
        rows = rows.sort_values(x)
        ax.plot(rows[x], rows.steerability, marker="o", color=colour, label=name)
        ax.fill_between(rows[x], rows.ci_low, rows.ci_high, color=colour, alpha=0.2)
    ax.set(xlabel=xlabel, ylabel="steerability (share of concepts)", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    return ax


def plot_eps_sweep(table) -> plt.Figure:
    """Judge score and coherence (means over concepts and questions) against the steering coefficient."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    long = table.melt(id_vars="coefficient", value_vars=["score", "coherence"], var_name="measure")
    sns.lineplot(long, x="coefficient", y="value", hue="measure", marker="o", errorbar=("ci", 95), seed=0, ax=ax)
    ax.set(xscale="log", xlabel="eps (relative to block norm)", ylabel="mean over responses", ylim=(0, 1.05))
    return fig


def plot_enrichment(table, value: str = "score") -> plt.Figure:
    """Left: enrichment heatmap (concepts grouped by class × blocks); right: class means over normalised depth."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.4, 1]}, layout="constrained")
    wide = table.pivot_table(index=["concept_class", "concept"], columns="block", values=value, sort=False)
    sns.heatmap(
        wide,
        ax=axes[0],
        vmin=0,
        vmax=max(float(wide.max().max()), 1e-9),
        cmap="magma",
        cbar_kws={"label": f"enrichment ({value})"},
        yticklabels=False,
        xticklabels=max(1, wide.shape[1] // 6),
    )
    starts = wide.index.get_level_values(0)
    for i in range(1, len(starts)):
        if starts[i] != starts[i - 1]:
            axes[0].axhline(i, color="white", lw=0.8)
    axes[0].set(xlabel="block", ylabel="concepts (grouped by class)", title="Per concept")
    sns.lineplot(
        table, x="depth", y=value, hue="concept_class", palette=CLASS_PALETTE, errorbar=("ci", 95), seed=0, ax=axes[1]
    )
    axes[1].set(
        xlabel="normalised depth (block / last block)", ylabel=f"enrichment ({value})", title="Class means", xlim=(0, 1)
    )
    axes[1].legend(title=None, fontsize=7)
    return fig


def plot_block_set_steerability(table, order: list[str], title: str = "") -> plt.Figure:
    """Steerability ('all' classes) per steered block set with 95% CIs, grouped by the fraction of blocks kept."""
    rows = table[table.concept_class == "all"].set_index("block_set").loc[order].reset_index()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * len(order) + 1.5), 3.2))
    colours = {
        "all": "grey",
        "top": sns.color_palette("deep")[0],
        "bottom": sns.color_palette("deep")[3],
        "random": sns.color_palette("deep")[7],
    }
    ax.bar(range(len(rows)), rows.steerability, color=[colours[s.split("-")[0]] for s in rows.block_set])
    _ci_bars(ax, range(len(rows)), rows)
    ax.set_xticks(range(len(rows)), rows.block_set, rotation=35, ha="right")
    ax.set(ylim=(0, 1.05), xlabel="steered blocks", ylabel="steerability (share of concepts)", title=title)
    return fig


def plot_top_block_depth(sets) -> plt.Figure:
    """Where the top-k blocks sit (Fig 4B analogue): share of concepts whose top set contains each depth bin."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.histplot(
        sets,
        x="depth",
        hue="block_set",
        stat="proportion",
        common_norm=False,
        element="step",
        bins=[i / 10 for i in range(11)],
        ax=ax,
    )
    ax.set(xlabel="normalised depth of a selected block", ylabel="share of selected blocks", xlim=(0, 1))
    return fig


def plot_models_steerability(table, settings: list[str], title: str = "") -> plt.Figure:
    """One panel per model: steerability per class for each setting, with 95% bootstrap CIs."""
    models = list(dict.fromkeys(table.model))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.4), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        plot_steerability(table[table.model == model], settings, ax=ax, title=f"{model} {title}".strip())
    return fig


SIZE_TICKS = (1e8, 3e8, 1e9, 3e9, 1e10)  # parameter counts marked on the scaling curve's log axis


def plot_scaling_curve(curve, reference=None, title: str = "", checked=None) -> plt.Figure:
    """Notebook 04: steerability against parameter count, one panel per class and one over all, one line per setting
    (the negative controls dashed) with 95% bootstrap CIs; `reference` rows are drawn as labelled star marks and
    `checked` rows (`scaling.person_checked` with `n_parameters`) as open diamonds: what a person confirmed."""
    classes = [c for c in dict.fromkeys(curve.concept_class) if c != "all"] + ["all"]
    settings = list(dict.fromkeys(curve.setting))
    palette = dict(zip(settings, sns.color_palette("deep", len(settings))))
    fig, axes = plt.subplots(2, 3, figsize=(11, 6), sharex=True, sharey=True)
    for ax, concept_class in zip(axes.flat, classes):
        for setting in settings:
            rows = curve[(curve.concept_class == concept_class) & (curve.setting == setting)]
            control = setting.startswith("control")
            ax.errorbar(
                rows.n_parameters,
                rows.steerability,
                yerr=[rows.steerability - rows.ci_low, rows.ci_high - rows.steerability],
                fmt="o--" if control else "o-",
                color="0.55" if control and setting.endswith("unsteered") else palette[setting],
                capsize=2,
                markersize=4,
                label=setting,
            )
        if reference is not None:
            mark = reference[reference.concept_class == concept_class]
            ax.plot(mark.n_parameters, mark.steerability, "*", color="black", markersize=10, label=None)
        if checked is not None:
            for setting in [s for s in settings if s in set(checked.setting)]:
                rows = checked[(checked.concept_class == concept_class) & (checked.setting == setting)]
                ax.plot(rows.n_parameters, rows.steerability, "D", mfc="none", color=palette[setting], markersize=7,
                        label=f"{setting}, judge and a person agree")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(SIZE_TICKS, [f"{t / 1e9:g}B" if t >= 1e9 else f"{t / 1e6:g}M" for t in SIZE_TICKS])
        ax.minorticks_off()
        ax.set(
            title=concept_class,
            xlim=(8e7, 1.5e10),
            ylim=(-0.02, 1.02),
            xlabel="parameters (as loaded)",
            ylabel="steerability",
        )
    for ax in axes.flat[len(classes) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if reference is not None:
        handles.append(plt.Line2D([], [], marker="*", color="black", ls="", markersize=10))
        labels.append(reference.label.iloc[0])
    fig.legend(handles, labels, loc="lower center", ncols=3, fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_soft_label_gain(gain) -> plt.Figure:
    """Soft minus hard label steerability per class and model, with paired-bootstrap 95% CIs."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    models = list(dict.fromkeys(gain.model))
    classes = list(dict.fromkeys(gain.concept_class))
    palette = sns.color_palette("deep", len(models))
    for k, model in enumerate(models):
        rows = gain[gain.model == model].set_index("concept_class").loc[classes]
        x = [i + (k - (len(models) - 1) / 2) * 0.2 for i in range(len(classes))]
        ax.errorbar(
            x,
            rows["diff"],
            yerr=[rows["diff"] - rows.ci_low, rows.ci_high - rows["diff"]],
            fmt="o",
            color=palette[k],
            capsize=2,
            label=model,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(classes)), classes)
    ax.set(xlabel="concept class", ylabel="soft − hard steerability")
    ax.legend(fontsize=7)
    return fig


def plot_depth_profiles(profile, value: str = "score") -> plt.Figure:
    """Mean enrichment per normalised-depth bin, one line per model."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.lineplot(profile, x="depth_bin", y=value, hue="model", marker="o", seed=0, ax=ax)
    ax.set(xlabel="normalised depth (block / last block)", ylabel=f"mean enrichment ({value})", xlim=(0, 1))
    ax.legend(title=None, fontsize=7)
    return fig


def plot_working_coefficients(table) -> plt.Figure:
    """Share of steered (concept, question) pairs per smallest scoring eps, per model."""
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    sns.barplot(table, x="coefficient", y="share", hue="model", seed=0, ax=ax)
    ax.set(xlabel="smallest eps that steered (relative to block norm)", ylabel="share of steered pairs", ylim=(0, 1.05))
    ax.legend(title=None, fontsize=7)
    return fig


def plot_paired_differences(comparisons, ax=None, title: str = "", compared: str = "method") -> plt.Axes:
    """Paired differences (b − a of the `compared` pair, all concepts) with 95% bootstrap CIs, McNemar p on the
    right."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3.2))
    rows = comparisons[comparisons.concept_class == "all"].reset_index(drop=True)
    y = list(range(len(rows)))[::-1]  # first comparison on top
    ax.errorbar(
        rows["diff"],
        y,
        xerr=[rows["diff"] - rows.ci_low, rows.ci_high - rows["diff"]],
        fmt="o",
        color="black",
        capsize=2,
        markersize=4,
    )
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(y, rows[f"{compared}_a"])
    for yi, p in zip(y, rows.p_mcnemar):
        ax.annotate(f"p={p:.2g}", (1.02, yi), xycoords=("axes fraction", "data"), va="center", fontsize=7)
    ax.set(xlabel=f"{rows[f'{compared}_b'].iloc[0]} − {compared} (steerability)", title=title)
    return ax


def plot_baselines(tables: dict, comparisons, methods: list[str], model: str) -> plt.Figure:
    """Notebook 05's figure, one row per protocol: steerability per class and method (95% CIs), and the paired
    differences ours − method over all concepts (bootstrap CIs, exact McNemar p)."""
    fig, axes = plt.subplots(
        len(tables), 2, figsize=(15, 3.4 * len(tables)), squeeze=False, gridspec_kw=dict(width_ratios=[3.2, 1])
    )
    for (bars, diffs), (protocol, table) in zip(axes, tables.items()):
        name = protocol.replace("_", "-")
        plot_steerability(table, methods, ax=bars, title=f"{model}: {name}", compared="method")
        bars.get_legend().remove()
        plot_paired_differences(comparisons[comparisons.protocol == protocol], ax=diffs, title=f"paired, {name}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncols=len(methods), fontsize=8, frameon=False, bbox_to_anchor=(0.4, -0.04)
    )
    fig.tight_layout()
    return fig


PROTOCOL_COLOURS = dict(zip(("best_of_grid", "held_out"), sns.color_palette("deep", 2)))


def plot_factor(factors, factor: str, model: str) -> plt.Figure:
    """Notebook 06, one factor: dev steerability (95% CIs) of the paper's arm and each level, both protocols."""
    rows = factors[(factors.factor == factor) | (factors.arm == "paper")]
    arms = list(dict.fromkeys(rows.arm))
    fig, ax = plt.subplots(figsize=(5.2, 0.5 + 0.55 * len(arms)))
    height = 0.38
    for k, (protocol, colour) in enumerate(PROTOCOL_COLOURS.items()):
        part = rows[rows.protocol == protocol].set_index("arm").loc[arms]
        y = [i + (k - 0.5) * height for i in range(len(arms))]
        ax.barh(y, part.steerability, height, color=colour, label=protocol.replace("_", "-"))
        _ci_bars(ax, y, part, horizontal=True)
    ax.set_yticks(range(len(arms)), [a.split(": ", 1)[-1] for a in arms])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="steerability on the development split", title=f"{model}: {factor}")
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_grid_levels(grid) -> plt.Figure:
    """Notebook 06, the grid factor: steerability against the number of coefficients, per arm and protocol."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
    for ax, (protocol, rows) in zip(axes, grid.groupby("protocol", sort=False)):
        sns.pointplot(rows, x="grid", y="steerability", hue="arm", seed=0, ax=ax, dodge=0.3, markersize=4)
        ax.set(
            title=protocol.replace("_", "-"),
            xlabel="coefficient grid (subset of the study's)",
            ylabel="steerability on the development split",
            ylim=(0, 1.05),
        )
        ax.tick_params(axis="x", rotation=20)
        ax.legend(fontsize=7, title=None)
    return fig


def plot_response_profile(profile, arms: list[str]) -> plt.Figure:
    """Notebook 06: mean judge score and share of repetitive responses against eps, one line per arm."""
    rows = profile[profile.arm.isin(arms)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, value, label in zip(axes, ("score", "repetitive"), ("mean judge score", "share judged repetitive")):
        if value in rows:
            sns.lineplot(rows, x="coefficient", y=value, hue="arm", marker="o", seed=0, ax=ax)
        ax.set(xlabel="eps (grid value)", ylabel=label, ylim=(0, 1.05 if value == "repetitive" else None))
        ax.legend(fontsize=6, title=None)
    return fig


def plot_working_window(responses, window: tuple[float, ...], title: str = "") -> plt.Figure:
    """Notebook 07: the share judged on-concept, kept by the coherence gate and in another language against eps,
    for the vector and its random control (the unsteered answers at eps 0); the chosen window shaded."""
    long = responses.melt(
        id_vars=["arm", "coefficient"], value_vars=["on_concept", "coherent", "other_language"], var_name="share"
    )
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), sharex=True)
    for ax, (share, label) in zip(
        axes, [("on_concept", "judged on-concept"), ("coherent", "kept by the coherence gate"),
               ("other_language", "in another script")]
    ):  # fmt: skip
        sns.lineplot(long[long.share == share], x="coefficient", y="value", hue="arm", marker="o", seed=0, ax=ax)
        ax.axvspan(min(window), max(window), color="0.9", zorder=0)
        ax.set(xlabel="eps (relative to block norm)", ylabel=f"share {label}", ylim=(-0.02, 1.02))
        ax.legend(fontsize=6, title=None)
    fig.suptitle(title, fontsize=9)
    return fig


def plot_diagnosis(separation, logprobs, arms: list[str]) -> plt.Figure:
    """Notebook 06's generation-free diagnosis: per arm, held-out AUC against unprefixed prompts and against other
    concepts of the class (mean over blocks); log-probability of the concept's first token against eps."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw=dict(width_ratios=[1.1, 1]))
    long = separation.melt(
        id_vars="arm", value_vars=["auc_unprefixed", "auc_class"], var_name="against", value_name="AUC"
    ).replace({"auc_unprefixed": "unprefixed", "auc_class": "same-class concepts"})
    sns.barplot(long, y="arm", x="AUC", hue="against", seed=0, ax=axes[0], errorbar=None)
    axes[0].set(xlim=(0.4, 1.0), ylabel="", xlabel="held-out AUC (mean over concepts and blocks)")
    axes[0].axvline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7, title="against", loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, frameon=False)
    sns.lineplot(
        logprobs[logprobs.arm.isin(arms)],
        x="coefficient",
        y="logprob",
        hue="arm",
        marker="o",
        errorbar=("ci", 95),
        seed=0,
        ax=axes[1],
    )
    axes[1].set(xlabel="eps (0 = unsteered)", ylabel="log p(concept's first token)\nat the first answer position")
    axes[1].legend(fontsize=6, title=None)
    return fig


def plot_steering_strip(strip, title: str = "", width: int = 34) -> plt.Figure:
    """A grid of responses: one row per concept, one column per eps (smallest to largest), each cell the
    response's first words with the judge's verdict, green where it scored 1."""
    import textwrap

    concepts, coefficients = list(dict.fromkeys(strip.concept)), sorted(strip.coefficient.unique())
    fig, ax = plt.subplots(figsize=(2.2 * len(coefficients) + 1.2, 1.05 * len(concepts) + 0.6))
    ax.set(xlim=(0, len(coefficients)), ylim=(len(concepts), 0), title=title)
    ax.set_xticks([i + 0.5 for i in range(len(coefficients))], [f"eps {c:g}" for c in coefficients])
    ax.set_yticks([i + 0.5 for i in range(len(concepts))], concepts)
    ax.tick_params(length=0)
    ax.grid(False)
    for row in strip.itertuples():
        x, y = coefficients.index(row.coefficient), concepts.index(row.concept)
        ax.add_patch(plt.Rectangle((x, y), 1, 1, color="#d9f0d3" if row.score else "#f7f7f7", ec="white", lw=2))
        words = " ".join(str(row.response).split()[:22])
        text = textwrap.fill(words, width, max_lines=5, placeholder=" …")
        ax.text(
            x + 0.04,
            y + 0.06,
            f"[{row.score}: {row.reason}]\n{text}",
            va="top",
            ha="left",
            fontsize=6.5,
            family="DejaVu Sans",
        )
    return fig

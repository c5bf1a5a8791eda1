"""Every figure of Orbital-CLIP in one style: one 3.5-inch panel per class (a journal column),
8-pt type, PNG at one dpi and vector PDF, all written through `save_figure`.
"""

import contextlib
import math
import textwrap

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.gridspec import GridSpecFromSubplotSpec
from sklearn.metrics import precision_recall_curve, roc_curve

from orbital_clip.metrics import reliability_table
from orbital_clip.report.tables import COMPARISON_LABELS, format_value

FIGURE_NAMES = ("confusion_matrix", "roc_curves", "pr_curves", "calibration", "prob_histograms")
PANEL_WIDTH_IN = 3.5  # one journal column
PANEL_HEIGHT_IN = 3.2
FONT_PT = 8  # the smallest size journals accept in print
FIGURE_DPI = 300


# ----------------------------------------------------------------------------------------------
# Figures: one 3.5-inch panel per class (a journal column), 8-pt type, PNG and vector PDF


@contextlib.contextmanager
def figure_style():
    """matplotlib (Agg) with 8-pt type throughout and editable text in the PDF."""
    matplotlib.use("Agg")  # files only: no display, the same output on a headless server
    with plt.rc_context({"font.size": FONT_PT, "axes.titlesize": FONT_PT, "axes.labelsize": FONT_PT,
                         "xtick.labelsize": FONT_PT, "ytick.labelsize": FONT_PT,
                         "legend.fontsize": FONT_PT, "figure.titlesize": FONT_PT,
                         "pdf.fonttype": 42, "ps.fonttype": 42, "axes.linewidth": 0.8,
                         "lines.linewidth": 1.4}):
        yield plt


def panel_grid(plt, n_panels, ncols=2, height_in=PANEL_HEIGHT_IN):
    """A figure of n panels, `ncols` per row, each one column wide; unused cells hidden."""
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_WIDTH_IN * ncols, height_in * nrows),
                             squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def save_figure(plt, fig, save, stem, formats=("png", "pdf")):
    """stem.png (FIGURE_DPI) and stem.pdf (vector) through `save(fig, file_name, **savefig_kwargs)`,
    called inside `figure_style` because the PDF font type is read when the file is written.
    The one place a figure's dpi is set: every figure of the project is saved here."""
    fig.tight_layout()
    options = {"png": {"dpi": FIGURE_DPI}, "pdf": {}}
    for ext in formats:
        save(fig, f"{stem}.{ext}", **options[ext])
    plt.close(fig)


def wrap(name, width=16):
    """A class name broken over lines between words (never abbreviated)."""
    return textwrap.fill(name, width, break_long_words=False, break_on_hyphens=False)


def plot_confusion_matrices(matrices, folders, save):
    """One heatmap per (title, matrix): colour by row %, each cell its count and row %."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(matrices), height_in=PANEL_WIDTH_IN)
        for ax, (title, cm) in zip(axes, matrices):
            cm = np.asarray(cm, dtype=np.int64)
            support = cm.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                row_pct = np.where(support > 0, 100.0 * cm / support, np.nan)
            annot = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.1f}%" if support[i, 0] else f"{cm[i, j]}\n–"
                               for j in range(len(folders))] for i in range(len(folders))])
            labels = [wrap(f, 9) for f in folders]
            sns.heatmap(np.nan_to_num(row_pct), annot=annot, fmt="", cmap="Blues", vmin=0, vmax=100,
                        xticklabels=labels, yticklabels=labels, linewidths=0.5, square=True,
                        cbar_kws={"label": "% of the true class", "shrink": 0.7},
                        annot_kws={"fontsize": FONT_PT}, ax=ax)
            ax.set(xlabel="predicted class", ylabel="true class", title=title)
            plt.setp(ax.get_xticklabels(), rotation=0)
            plt.setp(ax.get_yticklabels(), rotation=0, va="center")
        save_figure(plt, fig, save, "confusion_matrix")


def mark_operating_points(ax, points, kind):
    """Argmax and threshold-rule points of the rare class on its ROC (kind 'roc') or PR panel."""
    for label, stats, marker in points:
        if stats["sensitivity"] is None:
            continue
        if kind == "roc" and stats["specificity"] is not None:
            ax.plot(1 - stats["specificity"], stats["sensitivity"], marker, ms=6, mec="black", label=label)
        elif kind == "pr" and stats["ppv"] is not None:
            ax.plot(stats["sensitivity"], stats["ppv"], marker, ms=6, mec="black", label=label)


def operating_markers(operating):
    if not operating:
        return []
    return [("argmax", operating["argmax"], "o"),
            (f"p ≥ {operating['threshold']:.3f} ({operating['source']})", operating["rule"], "D")]


def plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, save):
    """One-vs-rest ROC panel per class (AUROC with CI; the operating point on the rare class)."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auroc"] is not None:
                fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
                ax.plot(fpr, tpr, color=f"C{k}",
                        label=f"AUROC {format_value(stats['auroc'], stats['auroc_ci'])}")
                overlay.plot(fpr, tpr, color=f"C{k}", label=wrap(folder, 30))
            else:
                ax.text(0.5, 0.5, "AUROC n/a\n(class absent or alone)", ha="center", va="center")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="chance")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "roc")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                   ylabel="sensitivity", title=f"{folder} vs rest (n = {stats['support']})")
            ax.set_aspect("equal")
            ax.legend(loc="lower right", frameon=False)
        overlay.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":")
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                    ylabel="sensitivity", title="All classes, macro AUROC "
                    + format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]))
        overlay.set_aspect("equal")
        overlay.legend(loc="lower right", frameon=False)
        save_figure(plt, fig, save, "roc_curves")


def plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, save):
    """One-vs-rest precision-recall panel per class, with the prevalence (chance) line."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auprc"] is not None:
                precision, recall, _ = precision_recall_curve(y_true == k, probs[:, k])
                ax.step(recall, precision, where="post", color=f"C{k}",
                        label=f"AUPRC {format_value(stats['auprc'], stats['auprc_ci'])}")
                overlay.step(recall, precision, where="post", color=f"C{k}", label=wrap(folder, 30))
                ax.axhline(stats["prevalence"], color="grey", lw=0.8, linestyle=":",
                           label=f"prevalence {stats['prevalence']:.3f} (random-ranking AUPRC "
                                 f"{format_value(stats['auprc_baseline'])})")
            else:
                ax.text(0.5, 0.5, "AUPRC n/a\n(class absent or alone)", ha="center", va="center")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "pr")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                   ylabel="precision (PPV)", title=f"{folder} vs rest (n = {stats['support']})")
            ax.legend(loc="best", frameon=False)
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                    ylabel="precision (PPV)", title="All classes, macro AUPRC "
                    + format_value(metrics["macro_auprc"], metrics["macro_auprc_ci"]))
        overlay.legend(loc="lower left", frameon=False)
        save_figure(plt, fig, save, "pr_curves")


def plot_calibration(y_true, probs, probs_cal, folders, n_bins, save):
    """Reliability diagram per class (observed frequency against mean predicted probability in
    equal-width bins) over a bar chart of the images per bin, uncalibrated and, when a validation
    temperature exists, temperature-scaled; a last panel for the max probability (the ECE)."""
    panels = [(f"p({folder})", k) for k, folder in enumerate(folders)] + [("max probability", None)]
    sets = [("uncalibrated", probs, "C0")] + ([("temperature-scaled", probs_cal, "C3")]
                                               if probs_cal is not None else [])
    edges = np.linspace(0, 1, n_bins + 1)
    with figure_style() as plt:
        fig, cells = panel_grid(plt, len(panels), height_in=PANEL_HEIGHT_IN + 0.6)
        for cell, (title, k) in zip(cells, panels):
            spec = cell.get_subplotspec()
            cell.remove()
            inner = GridSpecFromSubplotSpec(2, 1, subplot_spec=spec, height_ratios=(3, 1), hspace=0.08)
            ax, ax_count = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="perfect")
            for offset, (label, p, colour) in enumerate(sets):
                scores = p.max(axis=1) if k is None else p[:, k]
                hits = p.argmax(axis=1) == y_true if k is None else y_true == k
                count, mean_score, observed = reliability_table(scores, hits, n_bins)
                ax.plot(mean_score, observed, "o-", color=colour, ms=3, label=label)
                width = 0.9 / n_bins / len(sets)
                bars = ax_count.bar(edges[:-1] + (offset + 0.5) * width + 0.05 / n_bins, count,
                                    width=width, color=colour, alpha=0.6)
                if offset == 0:
                    ax_count.bar_label(bars, labels=[str(c) if c else "" for c in count],
                                       fontsize=FONT_PT - 1 if n_bins > 10 else FONT_PT, padding=1)
            ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency",
                   title=title if k is not None else "max probability vs accuracy (ECE)")
            ax.tick_params(labelbottom=False)
            ax.legend(loc="upper left", frameon=False)
            ax_count.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
            ax_count.set_ylim(0, max(1, ax_count.get_ylim()[1]) * 1.45)  # room for the labels
        save_figure(plt, fig, save, "calibration")


def plot_prob_histograms(y_true, probs, folders, operating, rare_index, save):
    """Per class, the distribution of its probability in each true class (share of that true
    class, so the rare class stays visible); the operating threshold on the rare class."""
    bins = np.linspace(0, 1, 21)
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1)
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            for j, true_folder in enumerate(folders):
                mine = y_true == j
                if mine.any():
                    ax.hist(probs[mine, k], bins=bins, weights=np.full(mine.sum(), 1.0 / mine.sum()),
                            histtype="step", lw=1.4, color=f"C{j}",
                            label=f"{wrap(true_folder, 30)} (n = {int(mine.sum())})")
            if k == rare_index and operating:
                ax.axvline(operating["threshold"], color="black", lw=1, linestyle="--",
                           label=f"threshold {operating['threshold']:.3f}")
            ax.set(xlim=(0, 1), xlabel=f"p({folder})", ylabel="share of the true class",
                   title=f"Probability of {folder}")
        handles, labels = [], []
        for ax in axes[:-1]:  # one legend for all panels, in the last cell
            for handle, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(handle), labels.append(label)
        axes[-1].axis("off")
        axes[-1].legend(handles, labels, loc="center", frameon=False, title="true class")
        save_figure(plt, fig, save, "prob_histograms")


def write_figures(save, y_true, probs, probs_cal, folders, metrics, operating, rare_index):
    """Every figure, PNG and PDF."""
    matrices = [("argmax", metrics["confusion_matrix"])]
    if operating:
        matrices.append((f"{folders[rare_index]} if p ≥ {operating['threshold']:.3f}",
                         operating["confusion_matrix"]))
    plot_confusion_matrices(matrices, folders, save)
    plot_roc_curves(y_true, probs, folders, metrics, operating, rare_index, save)
    plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, save)
    plot_calibration(y_true, probs, probs_cal, folders, metrics["ece_bins"], save)
    plot_prob_histograms(y_true, probs, folders, operating, rare_index, save)


def plot_sequential(sequential, folders, save):
    """Per class sensitivity (left) and specificity (right) against step, Wilson 95% CIs."""
    steps = sequential["steps"]
    x = np.arange(len(steps))
    with figure_style() as plt:
        fig, axes = panel_grid(plt, 2)
        for ax, measure in zip(axes, ("sensitivity", "specificity")):
            for k, folder in enumerate(folders):
                rows = [r for r in sequential["per_step"]
                        if r["class"] == folder and r["measure"] == measure]
                value = np.array([np.nan if r["value"] is None else r["value"] for r in rows])
                low = np.array([np.nan if r["ci"] is None else r["ci"][0] for r in rows])
                high = np.array([np.nan if r["ci"] is None else r["ci"][1] for r in rows])
                shift = (k - (len(folders) - 1) / 2) * 0.06  # side by side, CIs do not overlap
                ax.errorbar(x + shift, value, yerr=[value - low, high - value], marker="o", ms=4,
                            capsize=3, color=f"C{k}", label=wrap(folder, 30))
            ax.set(ylim=(-0.02, 1.02), xlim=(-0.4, len(steps) - 0.6), ylabel=measure,
                   title=f"{measure.capitalize()} by step (95% Wilson CI)")
            # '+' joins what each step adds (image+demographics): one line per part, no overlap
            ax.set_xticks(x, ["\n+".join(wrap(part, 14) for part in s.split("+")) for s in steps])
            ax.legend(loc="best", frameon=False)
        save_figure(plt, fig, save, "sequential")


def forest_rows(rows, label_of, value_key, ci_key):
    """(labels, values, lows, highs) of the rows with a finite value, for a forest plot."""
    kept = [r for r in rows if r[value_key] is not None]
    lows = [r[ci_key][0] if r[ci_key] else r[value_key] for r in kept]
    highs = [r[ci_key][1] if r[ci_key] else r[value_key] for r in kept]
    return [label_of(r) for r in kept], [r[value_key] for r in kept], lows, highs


def plot_forest(panels, save, stem, xlabel, reference_line=None):
    """One forest panel per (title, labels, values, lows, highs[, fixed]): a point and its 95% CI
    per row, a dotted vertical line at `reference_line` (0 for differences). A row marked in
    `fixed` (an estimate whose interval cannot vary) is a hollow point without an interval, so
    it neither looks the most precise nor sets the axis range."""
    with figure_style() as plt:
        heights = [max(1.2, 0.28 * len(p[1]) + 0.8) for p in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(PANEL_WIDTH_IN * 2, sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, labels, values, lows, highs, *rest) in zip(axes[:, 0], panels):
            y = np.arange(len(labels))[::-1]
            fixed = np.asarray(rest[0] if rest else [False] * len(labels), bool)
            values, lows, highs = (np.asarray(a, dtype=float) for a in (values, lows, highs))
            ax.errorbar(values[~fixed], y[~fixed], fmt="o", color="C0", ms=4, capsize=2, lw=1,
                        xerr=[(values - lows)[~fixed], (highs - values)[~fixed]])
            if fixed.any():
                ax.plot(values[fixed], y[fixed], "o", mfc="none", color="C0", ms=4)
                labels = [f"{label} (no variation)" if f else label for label, f in zip(labels, fixed)]
            if reference_line is not None:
                ax.axvline(reference_line, color="grey", lw=0.8, linestyle=":")
            ax.set_yticks(y, [wrap(label, 40) for label in labels])
            ax.set(title=title, xlabel=xlabel)
        save_figure(plt, fig, save, stem)


def plot_comparison(comparison, save):
    """comparison.png: per metric, ours − each model with its paired-bootstrap 95% CI."""
    panels = []
    for metric, label in COMPARISON_LABELS.items():
        rows = [r for r in comparison["rows"] if r["metric"] == metric]
        labels, values, lows, highs = forest_rows(rows, lambda r: r["model"], "difference", "difference_ci")
        if labels:
            panels.append((label, labels, values, lows, highs))
    if panels:
        plot_forest(panels, save, "comparison", "ours − model (95% CI)", reference_line=0.0)


def plot_subgroups(analysis, save):
    """subgroups.png: per metric, each attribute level's value and 95% CI (small levels marked)."""
    panels = []
    for name, title in (("accuracy", "accuracy"), ("rare_sensitivity", "rare-class sensitivity (Wilson)"),
                        ("rare_auroc", "rare-class AUROC")):
        rows = [dict(row, attribute=block["attribute"]) for block in analysis
                if block.get("model", "ours") == "ours" for row in block["rows"]]  # ours only
        labels, values, lows, highs = forest_rows(
            rows, lambda r: f"{r['attribute']} = {r['level']} (n {r['n']}){' *' if r['small_n'] else ''}",
            name, f"{name}_ci")
        # a bootstrap interval of a level that cannot vary is absent: a hollow point
        fixed = [bool(r.get("no_variation")) and name != "rare_sensitivity"
                 for r in rows if r[name] is not None]
        if labels:
            panels.append((title, labels, values, lows, highs, fixed))
    if panels:
        plot_forest(panels, save, "subgroups", "value (95% CI); * small subgroup")

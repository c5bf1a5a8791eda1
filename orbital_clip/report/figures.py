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
from matplotlib.transforms import ScaledTranslation
from sklearn.metrics import precision_recall_curve, roc_curve

from orbital_clip.metrics import reliability_table
from orbital_clip.report.tables import COMPARISON_LABELS, format_value, short_model_name

FIGURE_NAMES = ("confusion_matrix", "roc_curves", "pr_curves", "calibration", "prob_histograms")
PANEL_WIDTH_IN = 3.5  # one journal column
PANEL_HEIGHT_IN = 3.2
FONT_PT = 8  # the smallest size journals accept in print
FIGURE_DPI = 300
TITLE_CHARS = 44  # a panel title wraps here: 8-pt type over one column's axes
LEGEND_CHARS = 36  # a legend entry wraps here, so a legend below a panel stays within its column
LEGEND_ROOM_IN = 0.25  # extra height per legend line below a panel


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


def legend_below(ax, handles=None, labels=None, **kwargs):
    """A legend under the axes, below its tick labels and x label, so it covers neither data nor
    text however long the entries (wrapped at LEGEND_CHARS); tight_layout makes room for it.
    The offset is in points, measured once, because the label heights do not change with the
    axes size that tight_layout later sets."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    below = ax.xaxis.get_tightbbox(renderer)
    offset_pt = 4 + (max(0.0, ax.bbox.y0 - below.y0) * 72 / fig.dpi if below is not None else 0)
    anchor = ax.transAxes + ScaledTranslation(0, -offset_pt / 72, fig.dpi_scale_trans)
    return ax.legend(handles, [wrap(label, LEGEND_CHARS) for label in labels], loc="upper center",
                     bbox_to_anchor=(0.5, 0), bbox_transform=anchor, frameon=False,
                     borderaxespad=0, **kwargs)


def legend_room_in(n_entries, lines_per_entry=1):
    """Extra panel height (inches) for a legend of n entries below the axes."""
    return LEGEND_ROOM_IN * n_entries * lines_per_entry


def plot_confusion_matrices(matrices, folders, save, stem="confusion_matrix", columns=None,
                            xlabel="predicted class"):
    """One heatmap per (title, matrix): colour by row %, each cell its count and row %.
    `columns`: the column labels when they are not `folders` (an answer file's outcomes outside
    the classes, one column each after the classes)."""
    columns = list(folders) if columns is None else list(columns)
    n, n_columns = len(folders), len(columns)
    cell_in = max(0.5, 2.0 / n)  # room for a count and a row % in every cell
    side_in = cell_in * n + 2.6  # heatmap, colour bar and the wrapped tick labels
    width_in = cell_in * n_columns + 2.6  # outcome columns widen the panel, cells stay square
    with figure_style() as plt:
        ncols = 1 if n_columns >= 5 else 2  # six columns or more: one matrix per row, full width
        fig, axes = panel_grid(plt, len(matrices), ncols=ncols, height_in=side_in)
        fig.set_size_inches(max(PANEL_WIDTH_IN, width_in + 0.4) * min(ncols, len(matrices)),
                            side_in * math.ceil(len(matrices) / ncols))
        for ax, (title, cm) in zip(axes, matrices):
            cm = np.asarray(cm, dtype=np.int64)
            support = cm.sum(axis=1, keepdims=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                row_pct = np.where(support > 0, 100.0 * cm / support, np.nan)
            annot = np.array([[f"{cm[i, j]}\n{row_pct[i, j]:.1f}%" if support[i, 0] else f"{cm[i, j]}\n–"
                               for j in range(n_columns)] for i in range(n)])
            sns.heatmap(np.nan_to_num(row_pct), annot=annot, fmt="", cmap="Blues", vmin=0, vmax=100,
                        xticklabels=[wrap(f, 24) for f in columns],
                        yticklabels=[wrap(f, 24) for f in folders], linewidths=0.5, square=True,
                        cbar_kws={"label": "% of the true class", "shrink": 0.7},
                        annot_kws={"fontsize": FONT_PT}, ax=ax)
            ax.set(xlabel=xlabel, ylabel="true class", title=wrap(title, TITLE_CHARS))
            plt.setp(ax.get_xticklabels(), rotation=90, ha="center", va="top")
            plt.setp(ax.get_yticklabels(), rotation=0, va="center")
        save_figure(plt, fig, save, stem)


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
        fig, axes = panel_grid(plt, len(folders) + 1,
                               height_in=PANEL_HEIGHT_IN + legend_room_in(max(4, len(folders)), 1.5))
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auroc"] is not None:
                fpr, tpr, _ = roc_curve(y_true == k, probs[:, k])
                ax.plot(fpr, tpr, color=f"C{k}",
                        label=f"AUROC {format_value(stats['auroc'], stats['auroc_ci'])}")
                overlay.plot(fpr, tpr, color=f"C{k}", label=folder)
            else:
                ax.text(0.5, 0.5, "AUROC n/a\n(class absent or alone)", ha="center", va="center")
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":", label="chance")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "roc")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                   ylabel="sensitivity", title=wrap(f"{folder} vs rest (n = {stats['support']})", TITLE_CHARS))
            ax.set_aspect("equal")
            legend_below(ax)
        overlay.plot([0, 1], [0, 1], color="grey", lw=0.8, linestyle=":")
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 − specificity",
                    ylabel="sensitivity", title="All classes, macro AUROC "
                    + format_value(metrics["macro_auroc"], metrics["macro_auroc_ci"]))
        overlay.set_aspect("equal")
        legend_below(overlay)
        save_figure(plt, fig, save, "roc_curves")


def plot_pr_curves(y_true, probs, folders, metrics, operating, rare_index, save):
    """One-vs-rest precision-recall panel per class, with the prevalence (chance) line."""
    with figure_style() as plt:
        fig, axes = panel_grid(plt, len(folders) + 1,
                               height_in=PANEL_HEIGHT_IN + legend_room_in(max(5, len(folders)), 1.5))
        overlay = axes[-1]
        for k, (ax, folder) in enumerate(zip(axes, folders)):
            stats = metrics["per_class"][folder]
            if stats["auprc"] is not None:
                precision, recall, _ = precision_recall_curve(y_true == k, probs[:, k])
                ax.step(recall, precision, where="post", color=f"C{k}",
                        label=f"AUPRC {format_value(stats['auprc'], stats['auprc_ci'])}")
                overlay.step(recall, precision, where="post", color=f"C{k}", label=folder)
                ax.axhline(stats["prevalence"], color="grey", lw=0.8, linestyle=":",
                           label=f"prevalence {stats['prevalence']:.3f} (random-ranking AUPRC "
                                 f"{format_value(stats['auprc_baseline'])})")
            else:
                ax.text(0.5, 0.5, "AUPRC n/a\n(class absent or alone)", ha="center", va="center")
            if k == rare_index:
                mark_operating_points(ax, operating_markers(operating), "pr")
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                   ylabel="precision (PPV)", title=wrap(f"{folder} vs rest (n = {stats['support']})", TITLE_CHARS))
            legend_below(ax)
        overlay.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall (sensitivity)",
                    ylabel="precision (PPV)", title="All classes, macro AUPRC "
                    + format_value(metrics["macro_auprc"], metrics["macro_auprc_ci"]))
        legend_below(overlay)
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
        fig, cells = panel_grid(plt, len(panels), height_in=PANEL_HEIGHT_IN + 0.6 + legend_room_in(len(sets) + 1))
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
                   title=wrap(title if k is not None else "max probability vs accuracy (ECE)", TITLE_CHARS))
            ax.tick_params(labelbottom=False)
            ax_count.set(xlim=(0, 1), xlabel="predicted probability", ylabel="images")
            ax_count.set_ylim(0, max(1, ax_count.get_ylim()[1]) * 1.45)  # room for the labels
            legend_below(ax_count, *ax.get_legend_handles_labels())
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
                            label=f"{wrap(true_folder, LEGEND_CHARS)} (n = {int(mine.sum())})")
            if k == rare_index and operating:
                ax.axvline(operating["threshold"], color="black", lw=1, linestyle="--",
                           label=f"threshold {operating['threshold']:.3f}")
            ax.set(xlim=(0, 1), xlabel=wrap(f"p({folder})", TITLE_CHARS), ylabel="share of the true class",
                   title=wrap(f"Probability of {folder}", TITLE_CHARS))
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


def plot_sequential(sequential, folders, save, stem="sequential", population=None):
    """Per class sensitivity (left) and specificity (right) against step, Wilson 95% CIs;
    `population` (which images, e.g. 'all 40 images, non-answers as misses') heads the figure."""
    steps = sequential["steps"]
    x = np.arange(len(steps))
    with figure_style() as plt:
        fig, axes = panel_grid(plt, 2, height_in=PANEL_HEIGHT_IN + legend_room_in(len(folders), 1.5))
        for ax, measure in zip(axes, ("sensitivity", "specificity")):
            for k, folder in enumerate(folders):
                rows = [r for r in sequential["per_step"]
                        if r["class"] == folder and r["measure"] == measure]
                value = np.array([np.nan if r["value"] is None else r["value"] for r in rows])
                low = np.array([np.nan if r["ci"] is None else r["ci"][0] for r in rows])
                high = np.array([np.nan if r["ci"] is None else r["ci"][1] for r in rows])
                shift = (k - (len(folders) - 1) / 2) * 0.06  # side by side, CIs do not overlap
                ax.errorbar(x + shift, value, yerr=[value - low, high - value], marker="o", ms=4,
                            capsize=3, color=f"C{k}", label=folder)
            ax.set(ylim=(-0.02, 1.02), xlim=(-0.4, len(steps) - 0.6), ylabel=measure,
                   title=f"{measure.capitalize()} by step (95% Wilson CI)")
            # '+' joins what each step adds (image+demographics): one line per part, no overlap
            ax.set_xticks(x, ["\n+".join(wrap(part, 14) for part in s.split("+")) for s in steps])
        legend_below(axes[0])  # one legend: both panels draw the same classes
        if population:
            fig.suptitle(wrap(population, 2 * TITLE_CHARS))
        save_figure(plt, fig, save, stem)


def forest_rows(rows, label_of, value_key, ci_key):
    """(labels, values, lows, highs) of the rows with a finite value, for a forest plot."""
    kept = [r for r in rows if r[value_key] is not None]
    lows = [r[ci_key][0] if r[ci_key] else r[value_key] for r in kept]
    highs = [r[ci_key][1] if r[ci_key] else r[value_key] for r in kept]
    return [label_of(r) for r in kept], [r[value_key] for r in kept], lows, highs


def proportion_limits(lows, highs, min_span=0.2, pad=0.03):
    """x limits for values in [0, 1]: the intervals with a little room, never outside [0, 1]
    and never narrower than `min_span` (all values 1.0 would otherwise give 0.96-1.04)."""
    low, high = max(0.0, min(lows) - pad), min(1.0, max(highs) + pad)
    if high - low < min_span:
        low, high = (max(0.0, high - min_span), high) if high > 0.5 else (low, min(1.0, low + min_span))
    return low, high


def plot_forest(panels, save, stem, xlabel, reference_line=None, proportions=False):
    """One forest panel per (title, labels, values, lows, highs[, fixed]): a point and its 95% CI
    per row, a dotted vertical line at `reference_line` (0 for differences). A row marked in
    `fixed` (an estimate whose interval cannot vary) is a hollow point without an interval, so
    it does not look the most precise. With `proportions` the axis stays within [0, 1]
    (`proportion_limits`) and a point on the edge is drawn whole."""
    with figure_style() as plt:
        heights = [max(1.2, 0.28 * len(p[1]) + 0.8) for p in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(PANEL_WIDTH_IN * 2, sum(heights)),
                                 gridspec_kw={"height_ratios": heights}, squeeze=False)
        for ax, (title, labels, values, lows, highs, *rest) in zip(axes[:, 0], panels):
            y = np.arange(len(labels))[::-1]
            fixed = np.asarray(rest[0] if rest else [False] * len(labels), bool)
            values, lows, highs = (np.asarray(a, dtype=float) for a in (values, lows, highs))
            ax.errorbar(values[~fixed], y[~fixed], fmt="o", color="C0", ms=4, capsize=2, lw=1,
                        xerr=[(values - lows)[~fixed], (highs - values)[~fixed]],
                        clip_on=not proportions)
            if fixed.any():
                ax.plot(values[fixed], y[fixed], "o", mfc="none", color="C0", ms=4, clip_on=not proportions)
                labels = [f"{label} (no variation)" if f else label for label, f in zip(labels, fixed)]
            if proportions:  # the intervals that can vary, and the points that cannot
                ax.set_xlim(*proportion_limits([*lows[~fixed], *values[fixed]],
                                               [*highs[~fixed], *values[fixed]]))
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
        labels, values, lows, highs = forest_rows(rows, lambda r: short_model_name(r["model"]),
                                                  "difference", "difference_ci")
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
        plot_forest(panels, save, "subgroups", "value (95% CI); * small subgroup", proportions=True)


def plot_decision_curve(curve, rare_class, save):
    """decision_curve.png: net benefit of 'p(rare) >= pt' against treat-all and treat-none across
    threshold probabilities pt, the stored operating threshold marked (Vickers & Elkin 2006)."""
    threshold = np.asarray(curve["threshold"])
    model, treat_all = np.asarray(curve["net_benefit"]), np.asarray(curve["treat_all"])
    odds = threshold[0] / (1 - threshold[0])
    prevalence = (treat_all[0] + odds) / (1 + odds)  # treat-all = prev - (1 - prev) * odds, inverted
    with figure_style() as plt:
        fig, ax = plt.subplots(figsize=(PANEL_WIDTH_IN * 1.4, PANEL_HEIGHT_IN + legend_room_in(4)))
        ax.plot(threshold, treat_all, color="C1", linestyle="--", label="treat all")
        ax.plot(threshold, model, color="C0", label=f"model (p({rare_class}) >= pt)")
        # thin, dashed and on top: where the model's net benefit is 0 it would hide a solid line
        ax.axhline(0.0, color="dimgrey", lw=0.8, linestyle=(0, (4, 3)), zorder=3, label="treat none")
        if curve.get("operating_threshold") is not None:
            ax.axvline(curve["operating_threshold"], color="C3", lw=0.9, linestyle=":",
                       label=f"operating threshold {curve['operating_threshold']:.2f}")
        top = max(float(np.nanmax(model)), prevalence, 0.01)
        operating = curve.get("operating_threshold") or 0.0
        # a rare class's decisions are taken at low pt; the CSV holds every threshold up to 0.99
        right = 0.5 if operating <= 0.4 else 1.0
        ax.set(xlim=(0, right), ylim=(-0.25 * top, 1.15 * top), xlabel="threshold probability pt",
               ylabel="net benefit", title=f"decision curve: {rare_class}")
        handles, labels = ax.get_legend_handles_labels()
        order = [1, 0, 2] + list(range(3, len(handles)))  # the model first, as it is read
        legend_below(ax, [handles[i] for i in order], [labels[i] for i in order])
        save_figure(plt, fig, save, "decision_curve")

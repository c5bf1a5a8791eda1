"""Every figure the report writes, for 2, 3, 4 and 6 classes with long clinical names: no text
box overlaps another or leaves the figure, no legend covers data, axis labels or ticks; proportion
axes stay in [0, 1]; model names are short; each figure has a vector PDF beside its PNG."""

import re

import numpy as np
import pytest
from matplotlib.lines import Line2D

from orbital_clip import metrics, report
from test_answer_files import answers, run_steps  # noqa: F401 (a fixture: labels-only answer files)

LONG_NAMES = ["thyroid eye disease with compressive optic neuropathy",
              "healthy eyes without any orbital or ocular finding",
              "non-orbital disease of the anterior segment",
              "idiopathic orbital inflammation (orbital pseudotumour)",
              "lymphoproliferative lesion of the orbit and adnexa",
              "cavernous venous malformation of the orbit"]
CLASS_COUNTS = (2, 3, 4, 6)
TOLERANCE_PX = 1.0  # anti-aliasing: boxes that touch by a pixel do not collide


def example(n_classes, seed=0, n_per_class=25):
    """Labels, softmax probabilities (some signal, some errors), metrics with CIs, an operating point."""
    rng = np.random.default_rng(seed)
    y_true = np.repeat(np.arange(n_classes), n_per_class)
    logits = rng.normal(size=(len(y_true), n_classes))
    logits[np.arange(len(y_true)), y_true] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    folders = LONG_NAMES[:n_classes]
    result = metrics.compute_metrics(y_true, probs, folders, n_bootstrap=30)
    operating = dict(metrics.operating_point_metrics(y_true, probs, 0, 0.3), threshold=0.3,
                     source="validation", **{"class": folders[0]})
    return y_true, probs, folders, result, operating


def overlaps(a, b, tolerance=TOLERANCE_PX):
    """Whether two display boxes share more than `tolerance` pixels each way."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance
            and min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance)


def text_boxes(fig, renderer):
    """(description, box) of every drawn non-empty text outside legends: titles, axis labels,
    the tick labels matplotlib draws (those in view), texts in axes and on the figure."""
    texts = list(fig.texts) + [t for t in (getattr(fig, "_suptitle", None),) if t is not None]
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison and not ax.texts:
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.axison:
            for axis in (ax.xaxis, ax.yaxis):
                texts += [axis.label, axis.get_offset_text()]
                texts += [label for tick in axis._update_ticks() for label in (tick.label1, tick.label2)
                          if tick.get_visible() and label.get_visible()]
    return [(repr(t.get_text())[:50], t.get_window_extent(renderer)) for t in texts
            if t.get_visible() and t.get_text().strip()]


def legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)


def line_points(line, steps=40):
    """Display coordinates along a line (each segment sampled), so a legend over a segment shows."""
    xy = line.get_transform().transform(np.column_stack(line.get_data()).astype(float))
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return xy
    t = np.linspace(0, 1, steps)[:, None, None]
    return (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)


def layout_problems(fig):
    """Every collision in a drawn figure, in words ([] for a clean figure)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    problems = []
    texts = text_boxes(fig, renderer)
    boxes = texts + [(f"legend of {i}", legend.get_window_extent(renderer))
                     for i, legend in enumerate(legends(fig))]
    for name, box in boxes:
        if (box.x0 < page.x0 - TOLERANCE_PX or box.y0 < page.y0 - TOLERANCE_PX
                or box.x1 > page.x1 + TOLERANCE_PX or box.y1 > page.y1 + TOLERANCE_PX):
            problems.append(f"{name} leaves the figure")
    for i, (name_a, a) in enumerate(boxes):
        for name_b, b in boxes[i + 1:]:
            if overlaps(a, b):
                problems.append(f"{name_a} overlaps {name_b}")
    for legend in legends(fig):
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_visible() and line not in legend.legend_handles:
                    inside = line_points(line)
                    inside = inside[(inside[:, 0] > box.x0 + TOLERANCE_PX) & (inside[:, 0] < box.x1 - TOLERANCE_PX)
                                    & (inside[:, 1] > box.y0 + TOLERANCE_PX) & (inside[:, 1] < box.y1 - TOLERANCE_PX)]
                    if len(inside):
                        problems.append(f"a legend covers the data line {line.get_label()!r}")
    return problems


class Checked:
    """A `save` for the plot functions: checks each figure's layout once, records what was saved."""

    def __init__(self):
        self.saved, self.problems, self.figures = [], {}, {}

    def __call__(self, fig, name, **kwargs):
        stem = name.rsplit(".", 1)[0]
        if stem not in self.problems:
            self.problems[stem] = layout_problems(fig)
            self.figures[stem] = fig
        self.saved.append(name)


def draw_every_figure(n_classes, save):
    """Every figure of report.figures for one class count, through `save`."""
    y_true, probs, folders, result, operating = example(n_classes)
    probs_cal = probs ** 0.8 / (probs ** 0.8).sum(axis=1, keepdims=True)
    report.write_figures(save, y_true, probs, None, folders, result, operating, 0)
    report.plot_calibration(y_true, probs, probs_cal, folders, result["ece_bins"], save)
    steps = ["image", "image+demographics", "image+demographics+symptoms"]
    preds = np.array([np.where(np.random.default_rng(s).random(len(y_true)) < 0.7, y_true,
                               (y_true + 1) % n_classes) for s in range(3)])
    report.plot_sequential(metrics.sequential_analysis(y_true, preds, folders, steps, n_bootstrap=0),
                           folders, save)
    others = [metrics.ComparedModel("baseline /data/runs/zero_shot_vit_b32/clip_model_epoch_best.pt",
                                    probs[::-1].argmax(axis=1), probs[::-1]),
              metrics.ComparedModel("resnet50", np.roll(probs, 1, axis=0).argmax(axis=1), None)]
    report.plot_comparison(metrics.compare_predictions(
        y_true, metrics.ComparedModel("ours", probs.argmax(axis=1), probs), others, n_bootstrap=30), save)
    perfect = np.eye(n_classes)[y_true] * 0.9 + 0.1 / n_classes  # AUROC 1 in every level
    sites = np.where(np.arange(len(y_true)) % 2, "Moorfields Eye Hospital, London", "site B")
    report.plot_subgroups(metrics.subgroup_analysis(y_true, perfect, {"site": sites}, n_bootstrap=30), save)


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_no_text_collides_and_no_legend_covers_data(n_classes):
    save = Checked()
    draw_every_figure(n_classes, save)
    assert set(save.problems) >= {*report.FIGURE_NAMES, "sequential", "comparison", "subgroups"}
    assert {stem: found for stem, found in save.problems.items() if found} == {}
    for stem in save.problems:  # a vector PDF beside each PNG
        assert {f"{stem}.png", f"{stem}.pdf"} <= set(save.saved)


@pytest.mark.slow
def test_proportion_axes_stay_in_0_1_and_model_names_are_short():
    save = Checked()
    draw_every_figure(3, save)
    for ax in save.figures["subgroups"].axes:
        low, high = ax.get_xlim()
        assert 0 <= low < high <= 1 and high - low >= 0.2 - 1e-9, (ax.get_title(), low, high)
    labels = [t.get_text() for ax in save.figures["comparison"].axes for t in ax.get_yticklabels()]
    assert "/data/runs" not in " ".join(labels)
    assert any("zero_shot_vit_b32" in label for label in labels) and "resnet50" in labels


def test_the_overlap_check_sees_a_legend_over_data_and_colliding_labels():
    """The checker itself: a legend over a curve and two tick labels on top of each other."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.plot([0, 1], [0.5, 0.5], label="a long legend entry that covers the middle")
    ax.legend(loc="center")
    ax.set_xticks([0.5, 0.51], ["first label", "second label"])
    found = layout_problems(fig)
    plt.close(fig)
    assert any("covers the data line" in p for p in found)
    assert any("'first label' overlaps 'second label'" in p for p in found)


def test_short_model_name():
    assert report.short_model_name("resnet50") == "resnet50"
    assert (report.short_model_name("baseline /data/runs/zs_vit/clip_model_epoch_best.pt")
            == "baseline zs_vit/clip_model_epoch_best.pt")
    assert len(report.short_model_name("x" * 80)) <= 56


@pytest.mark.slow
def test_training_curves_legends_cover_no_data(tmp_path, monkeypatch):
    from orbital_clip.train import card
    found = {}
    monkeypatch.setattr(card.outputs, "atomic_save_figure",
                        lambda fig, path, **kwargs: found.setdefault(path.name, layout_problems(fig)))
    rng = np.random.default_rng(0)
    history = [{"epoch": e, "train_loss": 2.5 - 0.1 * e, "val_loss": 1.2 - 0.05 * e,
                "accuracy": 0.5 + 0.04 * e, "balanced_accuracy": 0.45 + 0.045 * e,
                "macro_f1": 0.4 + 0.05 * e, "macro_auroc": 0.6 + 0.03 * e + rng.uniform(0, 0.02),
                "rare_sensitivity": 0.1 + 0.08 * e, "is_best": e == 8} for e in range(1, 11)]
    card.write_history(tmp_path, history, "balanced_accuracy")
    assert found == {"training_curves.png": []}


# -- report.md embeds every figure written and links no other ---------------------------------------

PNG_LINK = re.compile(r"\]\(([^)]+\.png)\)")


def assert_report_matches_figures(folder):
    """Every PNG in `folder` is embedded in its report.md and every linked PNG exists there."""
    text = (folder / "report.md").read_text(encoding="utf-8")
    linked = {name for name in PNG_LINK.findall(text) if "/" not in name}  # thumbnails live below
    written = {path.name for path in folder.glob("*.png")}
    assert linked == written, (folder, linked ^ written)
    for name in written:
        assert f"]({name})" in text and f"![" in text.split(f"]({name})")[0].rsplit("\n", 1)[-1]


def test_report_embeds_exactly_the_figures_it_is_given():
    y_true, probs, folders, result, operating = example(3)
    run = {"source": "answer file", "predictions_file": "a.csv", "step": "image", "predictions_sha256": "0",
           "class_order": "as given", "class_folders": folders, "probabilities": False, "test_dir": "t",
           "confidence_level": 0.95, "bootstrap_unit": "image", "bootstrap": 0, "seed": 0,
           "versions": {}, "rare_class": folders[0], "figures": True}
    flow = report.flow_counts(list(y_true), ["ok"] * len(y_true), folders, True)
    for written in ([], ["confusion_matrix.png"], ["confusion_matrix.png", "roc_curves.png", "comparison.png"]):
        text = report.render_report(run, flow, result, folders, figures_written=written)
        assert set(PNG_LINK.findall(text)) == set(written)
        assert ("calibration.png (not drawn)" in text) and ("## Figures" in text) == bool(written)


@pytest.mark.slow
def test_answer_mode_report_links_only_the_figures_it_drew(answers, tmp_path):
    """Labels only: the confusion matrices (answered, and every image with outcome columns) and
    the sequential figures (primary and answered-only), no ROC/PR/calibration links."""
    cohort, files, label_map = answers
    out = tmp_path / "out"
    assert run_steps(cohort, files, label_map, out, "--figures") == 0
    assert {p.name for p in out.glob("*.png")} == {"confusion_matrix.png", "confusion_matrix_itd.png",
                                                   "sequential.png", "sequential_answered.png"}
    for folder in [out, *[p for p in out.iterdir() if p.is_dir()]]:
        if (folder / "report.md").is_file():
            assert_report_matches_figures(folder)


@pytest.mark.slow
def test_checkpoint_report_embeds_comparison_and_subgroup_figures(make_cohort, checkpoint, tmp_path):
    from test_compare import write_metadata
    from test_inference import run_inference
    test_dir = make_cohort("external", (4, 8, 6), seed=1)
    write_metadata(test_dir, tmp_path / "meta.csv")
    first = tmp_path / "first"
    assert run_inference(test_dir, checkpoint, first) == 0
    out = tmp_path / "out"
    assert run_inference(test_dir, checkpoint, out, "--compare", f"again={first / 'predictions.csv'}",
                         "--metadata", str(tmp_path / "meta.csv"), "--subgroups", "site", figures=True) == 0
    assert {"comparison.png", "subgroups.png", "roc_curves.png"} <= {p.name for p in out.glob("*.png")}
    assert_report_matches_figures(out)

"""Class-activation maps (Grad-CAM, Selvaraju et al. 2017, computed by captum's LayerGradCam) of
what an image tower looked at: for the CLIP image tower (ViT and ResNet towers) the gradient of
the image-text similarity (or a linear probe's logit) of one class, for the torchvision CNN
baselines the gradient of that class's logit. inference.py --explain N draws them for the N most
confident errors and the most confident correct image of each class, overlaid on the original
image at its own aspect ratio, into failure_analysis/ and report.md.

captum rather than pytorch-grad-cam: captum depends on torch, numpy and matplotlib only (all
already here); pytorch-grad-cam pulls opencv-python (~60 MB) for resizing we do with torch.

A map says where the gradient of one class score meets strong activations in one layer; it is a
coarse (grid of patches or the last feature map) and a partial account, not a segmentation.
"""

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from orbital_clip import images
from orbital_clip import models as model_lib
from orbital_clip import zero_shot
from orbital_clip.evaluation import EXPLAIN_PREFIX, FAILURE_DIR, figure_saver
from orbital_clip.model_loading import linear_head, linear_head_logits
from orbital_clip.report.tables import relative_path

EXPLAIN_CORRECT_PER_CLASS = 1  # correct images shown per class beside the errors, for contrast
MAP_ALPHA = 0.45  # overlay opacity: the anatomy under the map stays visible
DISPLAY_PX = 320  # longer side of the original drawn under a map


@dataclasses.dataclass
class ExplainedCase:
    """One explained image: which, why chosen, and the two maps in model-input coordinates."""
    index: int  # row in the cohort
    kind: str  # 'error' or 'correct'
    rank: int
    true: int
    pred: int
    confidence: float  # probability of the predicted class
    maps: dict  # class index -> (H, W) float map in [0, 1] over the model's square input


# ----------------------------------------------------------------------------------------------
# Pure functions


def cases_to_explain(y_true, probs, n_errors, n_correct_per_class=EXPLAIN_CORRECT_PER_CLASS):
    """[(row, kind, rank)]: the `n_errors` most confident errors (by the predicted class's
    probability), then the most confident `n_correct_per_class` correct rows of each class."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    pred, confidence = probs.argmax(axis=1), probs.max(axis=1)
    # stable sort on -confidence: ties keep cohort order, so the choice is reproducible
    errors = [i for i in np.argsort(-confidence, kind="stable") if pred[i] != y_true[i]]
    chosen = [(int(i), "error", rank) for rank, i in enumerate(errors[:n_errors], 1)]
    for k in range(probs.shape[1]):
        correct = [i for i in np.argsort(-confidence, kind="stable") if pred[i] == y_true[i] == k]
        chosen += [(int(i), "correct", rank) for rank, i in enumerate(correct[:n_correct_per_class], 1)]
    return chosen


def normalise_map(cam):
    """A (H, W) map scaled to [0, 1] (all zeros stays zeros: no class evidence in this layer)."""
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float64)), 0.0, None)
    peak = cam.max()
    return cam / peak if peak > 0 else cam


def input_region(width_px, height_px, resize_mode):
    """Where the model's square input lies on the original image: (box, inner) with box =
    (left, top, right, bottom) in original pixels and inner = the same rectangle as fractions
    (left, top, right, bottom) of the square input. 'shortest' (open_clip's and the CNN's
    default: resize the shorter side, centre-crop) sees the central square only; 'squash'
    stretches the whole image; 'longest' fits the whole image and pads the rest."""
    w, h = float(width_px), float(height_px)
    if resize_mode == "squash":
        return (0.0, 0.0, w, h), (0.0, 0.0, 1.0, 1.0)
    if resize_mode == "longest":
        side = max(w, h)
        left, top = (side - w) / 2 / side, (side - h) / 2 / side
        return (0.0, 0.0, w, h), (left, top, 1.0 - left, 1.0 - top)
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return (left, top, left + side, top + side), (0.0, 0.0, 1.0, 1.0)


def map_correlation(a, b):
    """Spearman rank correlation of two maps' pixels (Adebayo et al. 2018 compare maps so):
    1 = the same ordering of where the evidence is."""
    from scipy.stats import spearmanr
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


# ----------------------------------------------------------------------------------------------
# Grad-CAM through captum


class GridTap(torch.nn.Module):
    """Identity on a (B, D, h, w) grid of ViT patch tokens: the layer captum's Grad-CAM reads."""

    def forward(self, grid):
        return grid


@contextlib.contextmanager
def vit_patch_grid(visual):
    """While active, the input of a ViT tower's last block passes through a GridTap as a
    (B, D, h, w) grid. The last block's input, not its output: only the class token of the output
    reaches the embedding, so the patch tokens there get no gradient (as pytorch-grad-cam advises)."""
    tap = GridTap()
    transformer = visual.transformer
    grid_h, grid_w = visual.grid_size
    batch_first = getattr(transformer, "batch_first", True)

    def through_tap(_module, inputs):
        x = inputs[0] if batch_first else inputs[0].transpose(0, 1)  # (B, L, D)
        n_prefix = x.shape[1] - grid_h * grid_w  # class token (and any register tokens)
        patches = x[:, n_prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], grid_h, grid_w)
        patches = tap(patches).reshape(x.shape[0], x.shape[2], -1).transpose(1, 2)
        x = torch.cat([x[:, :n_prefix], patches], dim=1)
        return (x if batch_first else x.transpose(0, 1), *inputs[1:])

    handle = transformer.resblocks[-1].register_forward_pre_hook(through_tap)
    try:
        yield tap
    finally:
        handle.remove()


@contextlib.contextmanager
def clip_cam_layer(visual):
    """The layer Grad-CAM reads in an open_clip image tower: a ViT's patch grid, a ModifiedResNet's
    last stage; anything else is refused by name."""
    if hasattr(visual, "transformer") and hasattr(visual, "grid_size"):
        with vit_patch_grid(visual) as tap:
            yield tap
    elif hasattr(visual, "layer4"):
        yield visual.layer4
    else:
        raise ValueError(f"--explain: no class-activation layer known for the image tower "
                         f"{type(visual).__name__} (ViT and ResNet towers are supported)")


def cnn_cam_layer(model, arch):
    """The last convolutional stage of a torchvision baseline (baselines.train_cnn --arch)."""
    if arch.startswith("resnet"):
        return model.layer4
    if arch.startswith(("densenet", "efficientnet")):
        return model.features
    raise ValueError(f"--explain: no class-activation layer known for --arch {arch} (a ViT "
                     "baseline has no convolutional map; use the CLIP ViT path)")


def grad_cam(forward, layer, inputs, targets):
    """(B, H, W) maps in [0, 1] of `forward` (images -> class scores (B, C)) for one target class
    per image, read at `layer` and upsampled to the input size."""
    from captum.attr import LayerAttribution, LayerGradCam
    inputs = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        cam = LayerGradCam(forward, layer).attribute(inputs, target=list(targets),
                                                     relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), tuple(inputs.shape[-2:]), "bilinear")
    return np.stack([normalise_map(c[0].cpu().numpy()) for c in cam])


def clip_scores(bundle, device):
    """images (B, 3, H, W) -> the class scores inference reports for one model: a linear probe's
    logits, else the scaled cosine similarity to each class's prompt embedding."""
    model = bundle.model
    head = linear_head(bundle.checkpoint, bundle.folders)  # rows in the labelled class order
    if head is not None:
        head = tuple(t.to(device) for t in head)
        return lambda x: linear_head_logits(model.encode_image(x), head).float()
    with torch.no_grad():
        classifier = zero_shot.build_zero_shot_classifier(
            model, bundle.tokenizer, [list(c.eval) for c in bundle.classes], device).float()
    scale = model_lib.logit_scale(model, bundle.logit_scale_mode).detach().float()
    return lambda x: zero_shot.zero_shot_logits(model.encode_image(x), classifier, scale)


def explain_clip(bundle, image_batch, targets, device):
    """(B, H, W) Grad-CAM maps of the CLIP image tower for one class per image."""
    model = bundle.model.float().eval()
    with clip_cam_layer(model.visual) as layer:
        return grad_cam(clip_scores(bundle, device), layer, image_batch.to(device), targets)


# ----------------------------------------------------------------------------------------------
# Files: one figure per explained image in failure_analysis/, a section of report.md


def explain_cohort(bundle, items, y_true, probs, n_errors, device):
    """ExplainedCases of the chosen rows (`items`, `y_true`, `probs`: the scored images), with
    the maps of the predicted and of the true class (one map when they agree)."""
    chosen = cases_to_explain(y_true, probs, n_errors)
    cases, tensors = [], []
    for row, kind, rank in chosen:
        try:
            tensors.append(bundle.preprocess(images.read_image(items[row][0])))
        except images.ImageReadError:  # changed on disk since it was scored
            continue
        pred = int(probs[row].argmax())
        cases.append(ExplainedCase(row, kind, rank, int(y_true[row]), pred,
                                   float(probs[row, pred]), {}))
    if not cases:
        return []
    batch = torch.stack(tensors)
    for attribute in ("pred", "true"):
        targets = [getattr(case, attribute) for case in cases]
        for case, cam in zip(cases, explain_clip(bundle, batch, targets, device)):
            case.maps.setdefault(getattr(case, attribute), cam)
    return cases


def overlay_panel(ax, image, cam, resize_mode, title):
    """The original image at its own aspect ratio with `cam` drawn over the part the model saw
    (the rest, cropped away before the model, is left without colour)."""
    image = image.copy()
    image.thumbnail((DISPLAY_PX, DISPLAY_PX))
    (left, top, right, bottom), (fl, ft, fr, fb) = input_region(image.width, image.height, resize_mode)
    size = cam.shape
    inner = cam[int(round(ft * size[0])):int(round(fb * size[0])) or None,
                int(round(fl * size[1])):int(round(fr * size[1])) or None]
    ax.imshow(image, extent=(0, image.width, image.height, 0))
    ax.imshow(inner, cmap="jet", alpha=MAP_ALPHA, vmin=0.0, vmax=1.0, interpolation="bilinear",
              extent=(left, right, bottom, top))
    if (left, top, right, bottom) != (0.0, 0.0, float(image.width), float(image.height)):
        from matplotlib.patches import Rectangle
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, lw=0.8,
                               ls="--", ec="white"))
    ax.set_xlim(0, image.width)
    ax.set_ylim(image.height, 0)
    ax.set_title(title)
    ax.axis("off")


def save_case_figure(case, path, folders, resize_mode, save):
    """One figure per case: the original, then the map of the predicted and of the true class."""
    from orbital_clip.report.figures import figure_style, save_figure
    image = images.read_image(path)
    panels = [(None, "original")] + [(k, f"{'predicted' if k == case.pred else 'true'}: "
                                         f"{folders[k]}") for k in case.maps]
    with figure_style() as plt:
        aspect = image.height / image.width
        fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.2 * aspect + 0.3),
                                 squeeze=False)
        for ax, (k, title) in zip(axes[0], panels):
            if k is None:
                ax.imshow(image)
                ax.set_title(title)
                ax.axis("off")
            else:
                overlay_panel(ax, image, case.maps[k], resize_mode, title)
        stem = f"{EXPLAIN_PREFIX}{case.kind}_{case.rank}" + (f"_true{case.true}" if case.kind == "correct" else "")
        save_figure(plt, fig, save, stem, formats=("png",))
    return f"{stem}.png"


def write_explanations(output_dir, bundle, cohort, scored, probs, n_errors, device, anonymize=None):
    """Maps of the N most confident errors and the most confident correct image per class into
    failure_analysis/, and the report.md section (a list of lines) that shows them."""
    index = np.flatnonzero(scored)
    items = [cohort.items[i] for i in index]
    cases = explain_cohort(bundle, items, cohort.labels()[index], probs[index], n_errors, device)
    resize_mode = (getattr(bundle.model.visual, "preprocess_cfg", None) or {}).get("resize_mode", "shortest")
    return write_case_figures(output_dir, cases, items, bundle.folders, resize_mode,
                              f"the {bundle.model_name} image tower", cohort.root, anonymize)


def write_case_figures(output_dir, cases, items, folders, resize_mode, what, root, anonymize=None):
    """One figure per ExplainedCase in output_dir/failure_analysis/ (earlier maps removed) and
    the markdown section listing them; `what` names the model in its text."""
    folder = Path(output_dir) / FAILURE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{EXPLAIN_PREFIX}*.png"):
        old.unlink()
    lines = ["", "## What the model looked at (--explain)", "",
             f"Grad-CAM maps (captum) of {what} for the score of the predicted and of the true "
             "class, over the original image; a dashed box marks the central part the model saw "
             "(the rest was cropped away before it). Red: where the class score's gradient meets "
             "strong activations. A map is coarse (one cell per patch or feature-map position) and "
             "shows where evidence was read, not why; see docs/baselines.md.", "",
             "| case | image | true | predicted | p(predicted) | file |", "| --- | --- | --- | --- | ---: | --- |"]
    for case in cases:
        path = items[case.index][0]
        name = save_case_figure(case, path, folders, resize_mode, figure_saver(folder))
        rel = relative_path(path, root)
        lines.append(f"| {case.kind} {case.rank} | ![map]({FAILURE_DIR}/{name}) | "
                     f"{folders[case.true]} | {folders[case.pred]} | "
                     f"{case.confidence:.3f} | `{anonymize(rel) if anonymize else rel}` |")
    if not cases:
        lines.append("| – | no readable image to explain | | | | |")
    return lines


# ----------------------------------------------------------------------------------------------
# The CNN baselines: python -m orbital_clip.explain --cnn-run DIR --test-dir DIR --explain N


def explain_cnn_run(run_dir, test_dir, n_errors, out_dir, device="cpu"):
    """Maps of a baselines.train_cnn run (its cnn_model_best.pt and predictions.csv, whose paths
    are relative to `test_dir`) into out_dir/failure_analysis/ and out_dir/explain.md."""
    import pandas as pd
    from orbital_clip import checkpoint as ckpt
    from orbital_clip import cnn
    from orbital_clip import outputs
    record = ckpt.read_checkpoint(Path(run_dir) / cnn.BEST_NAME)
    folders, arch = list(record.class_folders), record.arch
    model = cnn.build_model(arch, Path(run_dir) / cnn.BEST_NAME, folders, record.image_size_px, 0)[0]
    model = model.to(device).eval()
    frame = pd.read_csv(Path(run_dir) / cnn.PREDICTIONS_NAME)
    frame = frame[(frame["status"] == "ok") & frame["true_label"].isin(folders)].reset_index(drop=True)
    items = [(Path(test_dir) / path, folders.index(label)) for path, label in zip(frame["path"], frame["true_label"])]
    probs = frame[[f"prob_{f}" for f in folders]].to_numpy()
    y_true = np.array([label for _path, label in items])
    transform = cnn.make_transforms(record.image_size_px)[1]
    cases, tensors = [], []
    for row, kind, rank in cases_to_explain(y_true, probs, n_errors):
        tensors.append(transform(images.read_image(items[row][0])))
        pred = int(probs[row].argmax())
        cases.append(ExplainedCase(row, kind, rank, int(y_true[row]), pred, float(probs[row, pred]), {}))
    layer = cnn_cam_layer(model, arch)
    for attribute in ("pred", "true") if cases else ():
        targets = [getattr(case, attribute) for case in cases]
        for case, cam in zip(cases, grad_cam(model, layer, torch.stack(tensors).to(device), targets)):
            case.maps.setdefault(getattr(case, attribute), cam)
    lines = write_case_figures(out_dir, cases, items, folders, "shortest", f"the {arch} baseline", test_dir)
    outputs.atomic_write_text(Path(out_dir) / "explain.md", "\n".join(lines).lstrip() + "\n")
    return cases


def main(argv=None):
    """python -m orbital_clip.explain: Grad-CAM maps of a CNN baseline's run."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Grad-CAM maps of a baselines.train_cnn run")
    parser.add_argument("--cnn-run", required=True, help="the --out-dir of python -m baselines.train_cnn")
    parser.add_argument("--test-dir", required=True, help="the --test-dir that run predicted")
    parser.add_argument("--explain", type=int, default=3, metavar="N",
                        help="the N most confident errors (and each class's most confident correct image)")
    parser.add_argument("--out-dir", required=True, help="where explain.md and failure_analysis/ go")
    args = parser.parse_args(argv)
    if args.explain < 1:
        parser.error(f"--explain must be >= 1, got {args.explain}")
    for flag, value in (("--cnn-run", args.cnn_run), ("--test-dir", args.test_dir)):
        if not Path(value).is_dir():
            parser.error(f"{flag} {value}: no such folder")
    try:
        explain_cnn_run(args.cnn_run, args.test_dir, args.explain, args.out_dir)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

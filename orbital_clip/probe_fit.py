"""The linear probe's fit (linear_probe.py and its few-shot curves): class-weighted logistic
regression (scikit-learn) on frozen, L2-normalised image features, C swept on validation.
Its own module so that the probe's pipeline (probe.py) and the few-shot curves (fewshot.py)
both import it, neither the other."""
import dataclasses

import numpy as np
import torch

from orbital_clip.metrics import mean_nll, selection_metrics, softmax
from orbital_clip.model_loading import linear_head_logits

# C = 1 / L2 strength, every half decade from 1e-4 to 1e6 (L2-normalised features need a large C
# when classes differ little in direction): the selected C is logged and stored;
# one at either end of the grid means the grid should be widened (--c-grid).
C_GRID = tuple(float(10.0 ** e) for e in np.arange(-4.0, 6.5, 0.5))
MAX_ITER = 2000  # lbfgs iterations; the normalised features converge well before on our cohorts


@dataclasses.dataclass
class ProbeFit:
    """A fitted probe: the head, its C and the validation sweep that chose it."""
    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    c: float
    sweep: list  # one dict per C: c, val_balanced_accuracy, val_loss, selected


# ----------------------------------------------------------------------------------------------
# Pure functions


def fit_logistic(features, labels, n_classes, c, seed):
    """(weight (C, D), bias (C,)) of a class-weighted multinomial logistic regression, in the
    form `linear_head_logits` applies: a two-class fit is written as logits (0, w.x + b)."""
    from sklearn.linear_model import LogisticRegression
    missing = sorted(set(range(n_classes)) - set(np.asarray(labels).tolist()))
    if missing:
        raise ValueError(f"no training image of class index {missing}: a probe needs every class")
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER, random_state=seed)
    model.fit(features, labels)
    weight, bias = model.coef_.astype(np.float64), model.intercept_.astype(np.float64)
    if n_classes == 2:  # scikit-learn keeps one row for two classes; softmax(0, z) = sigmoid(z)
        weight, bias = np.vstack([np.zeros_like(weight), weight]), np.array([0.0, bias[0]])
    return weight, bias


def head_logits(features, weight, bias):
    """Logits (N, C) of features (N, D) under a numpy head (model_loading's one rule)."""
    return linear_head_logits(torch.from_numpy(np.asarray(features, dtype=np.float32)),
                              (torch.from_numpy(weight), torch.from_numpy(bias))).numpy()


def sweep_c(train_x, train_y, val_x, val_y, n_classes, grid=C_GRID, seed=0):
    """The ProbeFit whose C gives the highest validation balanced accuracy; ties go to the lower
    validation loss (cross-entropy), then to the smaller C (the stronger regularisation)."""
    rows, fits = [], []
    for c in grid:
        weight, bias = fit_logistic(train_x, train_y, n_classes, c, seed)
        logits = head_logits(val_x, weight, bias)
        chosen = selection_metrics(val_y, softmax(logits))
        rows.append({"c": float(c), "val_balanced_accuracy": chosen["balanced_accuracy"],
                     "val_accuracy": chosen["accuracy"], "val_loss": mean_nll(logits, val_y),
                     "selected": False})
        fits.append((weight, bias))
    order = sorted(range(len(rows)), key=lambda i: (-np.nan_to_num(rows[i]["val_balanced_accuracy"],
                                                                   nan=-1.0),
                                                    rows[i]["val_loss"], rows[i]["c"]))
    best = order[0]
    rows[best]["selected"] = True
    return ProbeFit(fits[best][0], fits[best][1], rows[best]["c"], rows)

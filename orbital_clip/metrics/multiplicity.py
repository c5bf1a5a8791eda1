"""Multiplicity: Holm's (1979) step-down adjustment of a declared family of p-values (the primary
endpoint against each compared model). Only the family is adjusted and confirmatory; every other
p-value in the report is exploratory, and the tables say so.
"""

import numpy as np

PRIMARY_ENDPOINT = "rare_sensitivity"  # of our model vs each compared model, the default family


def holm_adjust(pvalues):
    """Holm-adjusted p-values in the input order (None stays None and is not counted in the
    family): the k-th smallest of m p-values is multiplied by m - k + 1, then made monotone and
    capped at 1, as statsmodels' multipletests(method='holm')."""
    index = [i for i, p in enumerate(pvalues) if p is not None]
    adjusted = [None] * len(pvalues)
    if not index:
        return adjusted
    p = np.array([pvalues[i] for i in index], np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    stepped = np.minimum(np.maximum.accumulate(scaled), 1.0)
    for rank, position in enumerate(order):
        adjusted[index[position]] = float(stepped[rank])
    return adjusted

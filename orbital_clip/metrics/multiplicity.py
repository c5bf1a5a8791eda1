"""Multiplicity: Holm's (1979) step-down adjustment of a declared family of p-values (the primary
endpoints against each compared model). Only the family is adjusted and confirmatory; every other
p-value in the report is exploratory, and the tables say so.
"""

import numpy as np

# Co-primary, intention to diagnose, of our model vs each compared model: the rare class's
# sensitivity and its specificity (a non-answer on a non-rare image counted as a false positive),
# so a model that calls every image rare, or abstains on the non-rare ones, cannot win on
# sensitivity alone.
PRIMARY_ENDPOINTS = ("rare_sensitivity", "rare_specificity")


def holm_adjust(pvalues):
    """Holm-adjusted p-values in the input order, as statsmodels' multipletests(method='holm'):
    the k-th smallest of m p-values is multiplied by m - k + 1, made monotone and capped at 1.

    The family is declared before the data, so a hypothesis without a p-value (None: no test
    could be run) still counts in m, as p = 1 (never rejected); its own adjusted value stays None.
    """
    adjusted = [None] * len(pvalues)
    if not len(pvalues):
        return adjusted
    p = np.array([1.0 if q is None else q for q in pvalues], np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    stepped = np.minimum(np.maximum.accumulate(scaled), 1.0)
    for rank, position in enumerate(order):
        if pvalues[position] is not None:
            adjusted[position] = float(stepped[rank])
    return adjusted

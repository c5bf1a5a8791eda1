"""Decision-curve analysis (Vickers & Elkin 2006, Med Decis Making 26:565-574): the net benefit
of calling the rare class when p >= pt, across threshold probabilities pt, against treating
every patient (treat-all) and none (net benefit 0). Net benefit = TP/n - FP/n * pt / (1 - pt):
true positives found per image, less false positives weighted by the harm-to-benefit odds that
pt expresses.
"""

import numpy as np

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)  # pt from 1% to 99%


def net_benefit(positive, p, thresholds=DEFAULT_THRESHOLDS):
    """Net benefit of the rule 'p >= pt' and of treat-all at each threshold pt.

    Returns
    -------
    dict of (T,) arrays: threshold, tp, fp, net_benefit, treat_all (treat-none is 0 throughout);
    NaN at pt = 1, where the harm-to-benefit odds pt / (1 - pt) are infinite and net benefit is
    not defined.
    """
    positive = np.asarray(positive, bool)
    p = np.asarray(p, np.float64)
    pt = np.asarray(thresholds, np.float64)
    n = len(p)
    called = p[None, :] >= pt[:, None]  # (T, N)
    tp = (called & positive[None, :]).sum(axis=1)
    fp = (called & ~positive[None, :]).sum(axis=1)
    with np.errstate(divide="ignore"):
        odds = np.where(pt < 1.0, pt / np.where(pt < 1.0, 1.0 - pt, 1.0), np.nan)
    prevalence = positive.mean() if n else np.nan
    return {"threshold": pt, "tp": tp, "fp": fp, "net_benefit": tp / n - fp / n * odds,
            "treat_all": prevalence - (1.0 - prevalence) * odds}


def net_benefit_at(positive, p, threshold):
    """Net benefit of 'p >= threshold' at that one threshold (the stored operating point); None
    where it is not defined (threshold 1, or no image), so metrics.json stays strict JSON."""
    value = float(net_benefit(positive, p, [threshold])["net_benefit"][0])
    return value if np.isfinite(value) else None

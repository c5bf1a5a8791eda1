"""Intervals of one binomial proportion by a named method (--ci-method): Wilson's score interval
(the default: good coverage at small n) or Clopper-Pearson's exact interval (never below the
nominal coverage, wider; what some journals ask for with few events).
"""

from scipy.stats import beta

from orbital_clip.metrics.classification import CONFIDENCE_LEVEL, wilson_interval

CI_METHODS = ("wilson", "clopper-pearson")


def clopper_pearson_interval(k, n, confidence=CONFIDENCE_LEVEL):
    """Clopper-Pearson (1934) exact interval from the beta quantiles; None when n is 0."""
    if n == 0:
        return None
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1.0 - tail, k + 1, n - k))
    return [low, high]


def proportion_interval(k, n, confidence=CONFIDENCE_LEVEL, method="wilson"):
    """[low, high] of k / n by `method` (one of CI_METHODS), or None when n is 0."""
    if method == "wilson":
        return wilson_interval(k, n, confidence)
    if method == "clopper-pearson":
        return clopper_pearson_interval(k, n, confidence)
    raise ValueError(f"unknown interval method {method!r}; one of {', '.join(CI_METHODS)}")

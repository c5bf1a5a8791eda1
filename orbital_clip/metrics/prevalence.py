"""PPV and NPV at a clinical prevalence other than the cohort's (--prevalence), from sensitivity
and specificity by Bayes' theorem, with the logit intervals of Mercaldo, Lau & Zhou (2007, Stat
Med 26:2170-2183): logit PPV = log(prev/(1-prev)) + log(sens) - log(1-spec), whose variance
by the delta method is (1-sens)/(sens n1) + spec/((1-spec) n0) (n1 positive, n0 negative
images; sensitivity and specificity are independent binomials), and the mirror for NPV. When a
cell is 0 (sens or spec of 1) every cell gets 0.5 added first, their 'adjusted logit' interval.
"""

import math

from scipy.stats import norm

from orbital_clip.metrics.classification import CONFIDENCE_LEVEL


def expit(x):
    return 1.0 / (1.0 + math.exp(-x))


def predictive_values(sensitivity, specificity, prevalence):
    """(PPV, NPV) at `prevalence` by Bayes' theorem; None where a denominator is 0."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return (tp / (tp + fp) if tp + fp else None, tn / (tn + fn) if tn + fn else None)


def predictive_values_at_prevalence(tp, fn, tn, fp, prevalence, confidence=CONFIDENCE_LEVEL):
    """PPV and NPV at `prevalence` (0 < prevalence < 1) from the cohort's counts, with
    Mercaldo's logit intervals (see the module docstring).

    Returns
    -------
    dict: prevalence, sensitivity, specificity, ppv, ppv_ci, npv, npv_ci, adjusted (0.5 added);
    None where the cohort has no positive or no negative image.
    """
    out = {"prevalence": prevalence, "sensitivity": None, "specificity": None, "ppv": None,
           "ppv_ci": None, "npv": None, "npv_ci": None, "adjusted": False}
    n1, n0 = tp + fn, tn + fp
    if n1 == 0 or n0 == 0:
        return out
    out["sensitivity"], out["specificity"] = tp / n1, tn / n0
    out["ppv"], out["npv"] = predictive_values(tp / n1, tn / n0, prevalence)
    if min(tp, fn, tn, fp) == 0:
        tp, fn, tn, fp = (count + 0.5 for count in (tp, fn, tn, fp))
        n1, n0, out["adjusted"] = n1 + 1, n0 + 1, True
    sens, spec = tp / n1, tn / n0
    z = norm.ppf(0.5 + confidence / 2.0)
    prior = math.log(prevalence / (1 - prevalence))
    ppv_logit = prior + math.log(sens) - math.log(1 - spec)
    ppv_se = math.sqrt((1 - sens) / (sens * n1) + spec / ((1 - spec) * n0))
    npv_logit = -prior + math.log(spec) - math.log(1 - sens)
    npv_se = math.sqrt(sens / ((1 - sens) * n1) + (1 - spec) / (spec * n0))
    if out["ppv"] is not None:  # no positive call at all: no PPV, and no interval for it
        out["ppv_ci"] = [expit(ppv_logit - z * ppv_se), expit(ppv_logit + z * ppv_se)]
    if out["npv"] is not None:
        out["npv_ci"] = [expit(npv_logit - z * npv_se), expit(npv_logit + z * npv_se)]
    return out

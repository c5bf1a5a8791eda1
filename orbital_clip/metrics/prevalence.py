"""PPV and NPV at a clinical prevalence other than the cohort's (--prevalence), from sensitivity
and specificity by Bayes' theorem, with the logit intervals of Mercaldo, Lau & Zhou (2007, Stat
Med 26:2170-2183): logit PPV = log(prev/(1-prev)) + log(sens) - log(1-spec), whose variance
by the delta method is (1-sens)/(sens n1) + spec/((1-spec) n0) (n1 positive, n0 negative
images; sensitivity and specificity are independent binomials), and the mirror for NPV.

When a cell is 0 the logit is infinite, and Mercaldo et al.'s 'adjusted logit' is used, as the R
package bdpv computes it: sensitivity and specificity become (x + z^2/2) / (n + z^2) (Agresti &
Coull's adjustment; z the normal quantile of the confidence level), n1 and n0 become n + z^2 in
the variance, and the point estimate is Bayes' theorem on the adjusted sensitivity and
specificity too, so it is the centre (on the logit scale) of its own interval. With no zero cell
the plain logit interval is used (bdpv's unadjusted one); the plain plug-in estimates are kept
as ppv_unadjusted / npv_unadjusted either way.
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
    dict: prevalence, sensitivity, specificity (the cohort's), ppv, ppv_ci, npv, npv_ci (adjusted
    when `adjusted`), ppv_unadjusted, npv_unadjusted (the plain plug-in), adjusted (a zero cell:
    Mercaldo's adjusted logit); None where the cohort has no positive or no negative image, and
    PPV None where nothing was called positive (NPV where nothing was called negative).
    """
    out = {"prevalence": prevalence, "sensitivity": None, "specificity": None, "ppv": None,
           "ppv_ci": None, "npv": None, "npv_ci": None, "ppv_unadjusted": None,
           "npv_unadjusted": None, "adjusted": False}
    n1, n0 = tp + fn, tn + fp
    if n1 == 0 or n0 == 0:
        return out
    out["sensitivity"], out["specificity"] = tp / n1, tn / n0
    out["ppv_unadjusted"], out["npv_unadjusted"] = predictive_values(tp / n1, tn / n0, prevalence)
    z = norm.ppf(0.5 + confidence / 2.0)
    extra = z * z if min(tp, fn, tn, fp) == 0 else 0.0  # Mercaldo's adjusted logit, as bdpv
    out["adjusted"] = bool(extra)
    n1, n0 = n1 + extra, n0 + extra
    sens, spec = (tp + extra / 2) / n1, (tn + extra / 2) / n0
    prior = math.log(prevalence / (1 - prevalence))
    ppv_logit = prior + math.log(sens) - math.log(1 - spec)
    ppv_se = math.sqrt((1 - sens) / (sens * n1) + spec / ((1 - spec) * n0))
    npv_logit = -prior + math.log(spec) - math.log(1 - sens)
    npv_se = math.sqrt(sens / ((1 - sens) * n1) + (1 - spec) / (spec * n0))
    if out["ppv_unadjusted"] is not None:  # no positive call at all: no PPV, and no interval
        out["ppv"] = expit(ppv_logit)
        out["ppv_ci"] = [expit(ppv_logit - z * ppv_se), expit(ppv_logit + z * ppv_se)]
    if out["npv_unadjusted"] is not None:
        out["npv"] = expit(npv_logit)
        out["npv_ci"] = [expit(npv_logit - z * npv_se), expit(npv_logit + z * npv_se)]
    return out

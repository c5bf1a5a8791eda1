"""Paired tests when images come in patients: Obuchowski's (1997) clustered DeLong variance of
an AUROC and of the difference of two correlated AUROCs, and an exact (sign-flip) form of the
clustered McNemar test for when few patients are discordant. Pure: arrays in, plain
dicts out; the plain DeLong and Obuchowski's large-sample McNemar live in `compare`.
"""

import math

import numpy as np
from scipy.stats import norm

from orbital_clip.metrics.bootstrap import group_indices
from orbital_clip.metrics.compare import delong_placements



def cluster_components(positive, scores, group_index, n_groups):
    """Per patient i: (V10_i, V01_i, m_i, n_i), the sums of DeLong's placements of its positive
    and negative images and its positive and negative counts (Obuchowski 1997, eqs. 3-4)."""
    auc, v10, v01 = delong_placements(positive, scores)
    pos_group, neg_group = group_index[positive], group_index[~positive]
    return (auc, np.bincount(pos_group, v10, n_groups), np.bincount(neg_group, v01, n_groups),
            np.bincount(pos_group, minlength=n_groups).astype(float),
            np.bincount(neg_group, minlength=n_groups).astype(float))


def clustered_auc_covariance(positive, score_list, groups):
    """AUROCs of several scorings of the same images and their covariance matrix, with the
    patient as the independent unit (Obuchowski 1997, Biometrics 53:567-578).

    With a_i = V10_i - m_i A and b_i = V01_i - n_i A for patient i, M positives and N negatives
    in all, I10 (I01) patients holding a positive (negative) image and I patients:
    Cov(A_r, A_s) = I10/(I10-1) sum a_r a_s / M^2 + I01/(I01-1) sum b_r b_s / N^2
                    + I/(I-1) sum (a_r b_s + b_r a_s) / (M N).
    With one image per patient the cross term vanishes and this is DeLong's (1988) variance.

    Returns
    -------
    (aucs (R,), covariance (R, R)), or (None, None) when fewer than two patients hold a
    positive or a negative image.
    """
    positive = np.asarray(positive, bool)
    index = group_indices(groups, len(positive))
    n_groups = int(index.max()) + 1 if len(index) else 0
    parts = [cluster_components(positive, s, index, n_groups) for s in score_list]
    m_i, n_i = parts[0][3], parts[0][4]
    i10, i01, big_m, big_n = int((m_i > 0).sum()), int((n_i > 0).sum()), m_i.sum(), n_i.sum()
    if i10 < 2 or i01 < 2:
        return None, None
    aucs = np.array([p[0] for p in parts])
    a = np.stack([p[1] - m_i * auc for p, auc in zip(parts, aucs)])  # (R, I)
    b = np.stack([p[2] - n_i * auc for p, auc in zip(parts, aucs)])
    cross = a @ b.T
    cov = (i10 / (i10 - 1) * (a @ a.T) / big_m ** 2 + i01 / (i01 - 1) * (b @ b.T) / big_n ** 2
           + n_groups / (n_groups - 1) * (cross + cross.T) / (big_m * big_n))
    return aucs, cov


def clustered_delong_test(positive, scores_a, scores_b, groups):
    """Obuchowski's clustered form of DeLong's test of two correlated AUROCs: the same keys as
    `compare.delong_test` (auroc_a, auroc_b, difference, se, z, p) plus se_a, se_b."""
    out = {key: None for key in ("auroc_a", "auroc_b", "difference", "se", "z", "p", "se_a", "se_b")}
    aucs, cov = clustered_auc_covariance(positive, [scores_a, scores_b], groups)
    if aucs is None:
        return out
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    out.update(auroc_a=float(aucs[0]), auroc_b=float(aucs[1]), difference=float(aucs[0] - aucs[1]),
               se_a=math.sqrt(max(cov[0, 0], 0.0)), se_b=math.sqrt(max(cov[1, 1], 0.0)))
    if variance > 1e-15:
        out["se"] = math.sqrt(variance)
        out["z"] = out["difference"] / out["se"]
        out["p"] = float(2.0 * norm.sf(abs(out["z"])))
    return out


def sign_flip_distribution(sums):
    """Exact null distribution of sum(s_k D_k) over independent fair signs s_k = +-1, for integer
    D_k: (values, probabilities), built by convolution (one patient at a time), so it stays
    exact for any number of patients (O(K x sum|D_k|) rather than 2^K patterns)."""
    sums = np.abs(np.asarray(sums, np.int64))
    total = int(sums.sum())
    prob = np.zeros(2 * total + 1)
    prob[total] = 1.0  # index total is a sum of 0
    for d in sums:
        prob = 0.5 * (np.roll(prob, d) + np.roll(prob, -d))  # no wrap: |partial sum| <= total
    return np.arange(-total, total + 1), prob


def clustered_mcnemar_exact(correct_a, correct_b, groups):
    """Exact clustered McNemar: under 'no difference' the two models' answers are exchangeable
    within a patient, so each patient's D_k = sum(correct_a - correct_b) keeps or flips its sign
    with probability 1/2. p = P(|sum of signed D_k| >= |observed sum|) from the exact sign-flip
    distribution (`sign_flip_distribution`). With one image per patient this is the exact
    two-sided McNemar (binomial) test.

    Returns
    -------
    dict: difference (mean over images), n_discordant_patients, p, method ('exact sign-flip');
    without a discordant patient p is 1 (the only outcome, 0, is as extreme as observed) and
    method says 'no discordant patient'; p is None only without an image.
    """
    d = np.asarray(correct_a, np.int64) - np.asarray(correct_b, np.int64)
    index = group_indices(groups, len(d))
    sums = np.bincount(index, d).round().astype(np.int64) if len(d) else np.zeros(0, np.int64)
    sums = sums[sums != 0]
    out = {"difference": float(d.mean()) if len(d) else None,
           "n_discordant_patients": int(len(sums)), "p": None, "method": None}
    if not len(sums):
        return out if not len(d) else dict(out, p=1.0, method="exact sign-flip (no discordant patient)")
    values, prob = sign_flip_distribution(sums)
    extreme = np.abs(values) >= abs(int(sums.sum()))  # as extreme as observed, either direction
    out.update(p=float(min(1.0, prob[extreme].sum())), method="exact sign-flip")
    return out

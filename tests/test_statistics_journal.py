"""The statistics a journal's statistician asks for (issue 28), each number against a reference:
statsmodels, scipy, scikit-learn, or a worked example computed by hand in the comments."""
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from orbital_clip import metrics
from orbital_clip.metrics import clustered, decision, intervals, itd, multiplicity, patient_level
from orbital_clip.metrics import prevalence, recalibration


def random_scores(seed, n, ties=True):
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.35
    a = positive * 0.8 + rng.normal(0, 1, n)
    b = positive * 0.4 + rng.normal(0, 1, n)
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    return positive, a, b


# ---- 1. clustered DeLong (Obuchowski 1997) and the exact clustered McNemar


def test_clustered_delong_with_one_image_per_patient_is_plain_delong():
    positive, a, b = random_scores(0, 60)
    plain = metrics.delong_test(positive, a, b)
    ours = clustered.clustered_delong_test(positive, a, b, [f"p{i}" for i in range(60)])
    for key in ("auroc_a", "auroc_b", "difference", "se", "z", "p"):
        assert ours[key] == pytest.approx(plain[key], rel=1e-10)


def test_clustered_auc_variance_hand_computed_example():
    """Patients A (pos 0.8, neg 0.4), B (pos 0.6, neg 0.7), C (pos 0.9), D (neg 0.2).
    V10 = 1, 2/3, 1; V01 = 1, 2/3, 1 (neg 0.4, 0.7, 0.2): AUC = 8/9. a_i = V10_i - m_i A =
    1/9, -2/9, 1/9, 0; b_i = V01_i - n_i A = 1/9, -2/9, 0, 1/9. M = N = 3, I10 = I01 = 3, I = 4:
    Var = 3/2 * (6/81) / 9 + 3/2 * (6/81) / 9 + 4/3 * 2 * (5/81) / 9 = 2/81 + 40/2187 = 94/2187,
    against DeLong's 2/81 = 54/2187 when the patients' two images are taken as independent."""
    positive = np.array([1, 0, 1, 0, 1, 0], bool)
    scores = np.array([0.8, 0.4, 0.6, 0.7, 0.9, 0.2])
    groups = ["A", "A", "B", "B", "C", "D"]
    aucs, cov = clustered.clustered_auc_covariance(positive, [scores], groups)
    assert aucs[0] == pytest.approx(8 / 9)
    assert cov[0, 0] == pytest.approx(94 / 2187)
    aucs, cov = clustered.clustered_auc_covariance(positive, [scores], ["A", "B", "C", "D", "E", "F"])
    assert cov[0, 0] == pytest.approx(54 / 2187)


def test_clustered_delong_is_unchanged_when_each_image_is_duplicated_within_its_patient():
    """A copy of an image within its patient adds no information: Obuchowski's variance stays
    exactly the same, while DeLong's (images independent) shrinks."""
    positive, a, b = random_scores(1, 40)
    groups = np.repeat(np.arange(20), 2).astype(str)
    once = clustered.clustered_delong_test(positive, a, b, groups)
    twice = clustered.clustered_delong_test(np.tile(positive, 2), np.tile(a, 2), np.tile(b, 2),
                                            np.tile(groups, 2))
    assert twice["se"] == pytest.approx(once["se"], rel=1e-10)
    assert twice["p"] == pytest.approx(once["p"], rel=1e-10)
    plain_twice = metrics.delong_test(np.tile(positive, 2), np.tile(a, 2), np.tile(b, 2))
    assert plain_twice["se"] < 0.8 * once["se"]


def test_exact_clustered_mcnemar_is_the_exact_mcnemar_with_one_image_per_patient():
    rng = np.random.default_rng(2)
    a, b = rng.random(30) < 0.7, rng.random(30) < 0.5
    result = clustered.clustered_mcnemar_exact(a, b, np.arange(30).astype(str))
    discordant = int(np.sum(a != b))
    assert result["n_discordant_patients"] == discordant
    assert result["p"] == pytest.approx(binomtest(int(np.sum(a & ~b)), discordant, 0.5).pvalue)


def test_exact_clustered_mcnemar_hand_computed_example():
    """Patient sums D = (2, 1, -1), observed sum 2. Of the 8 sign patterns, |sum| = 4, 2, 2, 0,
    0, 2, 2, 4: six reach 2, so p = 6/8; a concordant patient (D = 0) changes nothing."""
    a = np.array([1, 1, 1, 0, 1, 1], bool)
    b = np.array([0, 0, 0, 1, 1, 1], bool)
    result = clustered.clustered_mcnemar_exact(a, b, ["x", "x", "y", "z", "w", "w"])
    assert result["n_discordant_patients"] == 3 and result["method"] == "exact sign-flip"
    assert result["p"] == pytest.approx(6 / 8)


def test_exact_sign_flip_stays_exact_with_many_discordant_patients():
    """120 patients, one image each: the convolution gives the binomial test exactly, where
    enumerating 2^k sign patterns would be impossible."""
    rng = np.random.default_rng(3)
    a, b = rng.random(120) < 0.7, rng.random(120) < 0.5
    result = clustered.clustered_mcnemar_exact(a, b, np.arange(120).astype(str))
    exact = binomtest(int(np.sum(a & ~b)), int(np.sum(a != b)), 0.5).pvalue
    assert result["p"] == pytest.approx(exact, rel=1e-9)


def test_sign_flip_distribution_of_patient_sums_by_enumeration():
    """D = (3, 1, 2, 2, 1): the convolution equals the 32 sign patterns counted one by one."""
    sums = np.array([3, 1, 2, 2, 1])
    values, prob = clustered.sign_flip_distribution(sums)
    patterns = np.array(np.meshgrid(*[[1, -1]] * 5)).reshape(5, -1).T @ sums
    for value, p in zip(values, prob):
        assert p == pytest.approx(np.mean(patterns == value))


# ---- 2. intention to diagnose: abstentions are errors, each model's abstention rate


def test_itd_comparison_hand_example_against_statsmodels():
    """Five images (rare class 1 = the last three). Ours misses image 2 (unreadable) and 5;
    the reader abstains on the two hardest rare images and is right on every one it answers."""
    from statsmodels.stats.contingency_tables import mcnemar
    from statsmodels.stats.proportion import proportion_confint
    y = np.array([0, 0, 1, 1, 1])
    ours = np.array([0, -1, 1, 1, 0])
    reader = np.array([0, 0, -1, -1, 1])
    rows = itd.itd_comparison(y, ours, [("reader", reader)], rare_index=1)
    assert [r["n_abstained"] for r in rows] == [1, 2]
    assert rows[1]["abstention_rate"] == pytest.approx(0.4)
    assert rows[1]["abstention_rate_ci"] == pytest.approx(list(proportion_confint(2, 5, method="wilson")))
    assert rows[0]["itd_accuracy"] == pytest.approx(3 / 5) and rows[1]["itd_accuracy"] == pytest.approx(3 / 5)
    assert rows[0]["itd_rare_sensitivity"] == pytest.approx(2 / 3)
    assert rows[1]["itd_rare_sensitivity"] == pytest.approx(1 / 3)  # answered-only it would be 1/1
    assert rows[1]["accuracy_difference"] == pytest.approx(0.0)
    assert rows[1]["rare_sensitivity_difference"] == pytest.approx(1 / 3)
    # discordant: ours only right on images 3, 4; reader only right on images 2, 5
    expected = mcnemar([[1, 2], [2, 0]], exact=True).pvalue
    assert rows[1]["p_accuracy"] == pytest.approx(expected)
    cp = itd.itd_comparison(y, ours, [("reader", reader)], 1, method="clopper-pearson")
    assert cp[1]["abstention_rate_ci"] == pytest.approx(list(proportion_confint(2, 5, method="beta")))


def test_primary_family_is_holm_adjusted_as_statsmodels():
    from statsmodels.stats.multitest import multipletests
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1], [40, 30])
    ours = np.where(rng.random(70) < 0.85, y, 1 - y)
    others = [(f"m{k}", np.where(rng.random(70) < q, y, np.where(rng.random(70) < 0.2, -1, 1 - y)))
              for k, q in enumerate((0.5, 0.6, 0.8))]
    rows = itd.itd_comparison(y, ours, others, rare_index=1)
    family = itd.primary_comparisons(rows)
    raw = [row["p"] for row in family]
    assert raw == ([row["p_rare_sensitivity"] for row in rows[1:]]
                   + [row["p_rare_specificity"] for row in rows[1:]])
    assert [row["p_holm"] for row in family] == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert all(row["family_size"] == 6 and row["status"].startswith("primary") for row in family)


def reviewers_cohort():
    """18 images, rare class 0 = the first six. Ours misses rare images 0 and 1 (calls them 1);
    b misses all six rare (images 2-5 discordant, all in ours' favour: exact McNemar p =
    2 * 0.5**4 = 0.125); c misses the same two as ours: no discordant rare image."""
    y = np.array([0] * 6 + [1] * 6 + [2] * 6)
    ours = y.copy()
    ours[[0, 1]] = 1
    b = y.copy()
    b[:6] = 1
    c = y.copy()
    c[[0, 1]] = 2
    return y, ours, b, c


def test_a_comparison_without_discordant_pairs_has_p_1_and_stays_in_the_family():
    """The exact McNemar p with no discordant pair is 1, and the family is declared before the
    data: b's Holm p on the sensitivity family is statsmodels' on [0.125, 1] (size 2), not 0.125
    from a family shrunk to 1."""
    from statsmodels.stats.multitest import multipletests
    y, ours, b, c = reviewers_cohort()
    rows = itd.itd_comparison(y, ours, [("b", b), ("c", c)], rare_index=0)
    assert rows[1]["p_rare_sensitivity"] == pytest.approx(binomtest(4, 4).pvalue)  # 0.125
    assert rows[2]["p_rare_sensitivity"] == 1.0
    assert rows[2]["p_rare_sensitivity_note"] == "no discordant pairs"
    sensitivity_only = itd.primary_comparisons(rows, ("rare_sensitivity",))
    assert [r["p_holm"] for r in sensitivity_only] == pytest.approx(
        list(multipletests([0.125, 1.0], method="holm")[1]))  # [0.25, 1]
    assert [r["family_size"] for r in sensitivity_only] == [2, 2]
    family = itd.primary_comparisons(rows)
    assert [r["family_size"] for r in family] == [4] * 4
    assert [r["p_holm"] for r in family] == pytest.approx(
        list(multipletests([r["p"] for r in family], method="holm")[1]))
    grouped = itd.itd_comparison(y, ours, [("c", c)], 0, groups=np.arange(18).astype(str))
    assert grouped[1]["p_rare_sensitivity"] == 1.0  # the clustered sign-flip form says the same


def test_holm_counts_a_missing_p_in_the_declared_family_as_p_1():
    from statsmodels.stats.multitest import multipletests
    p = [0.01, None, 0.04, 0.03, 0.5]
    expected = multipletests([0.01, 1.0, 0.04, 0.03, 0.5], method="holm")[1]
    adjusted = multiplicity.holm_adjust(p)
    assert adjusted[1] is None
    assert [adjusted[i] for i in (0, 2, 3, 4)] == pytest.approx([expected[i] for i in (0, 2, 3, 4)])


@pytest.mark.parametrize("name", ["calls every image rare", "abstains on every non-rare image"])
def test_an_over_caller_or_a_non_rare_abstainer_does_not_beat_ours_on_the_primary_family(name):
    """Both reach ITD rare sensitivity 1 (ours 4/6, not significant: 2 discordant), but the
    co-primary ITD specificity (a non-answer on a non-rare image counted as a false positive)
    is 0 against ours' 12/12: 12 discordant, exact p = 2 * 0.5**12, Holm x 2 (family of 2)."""
    y, ours, _, _ = reviewers_cohort()
    other = np.zeros_like(y) if name.startswith("calls") else np.where(y == 0, y, -1)
    rows = itd.itd_comparison(y, ours, [(name, other)], rare_index=0)
    assert rows[1]["itd_rare_specificity"] == 0.0 and rows[0]["itd_rare_specificity"] == 1.0
    family = {r["endpoint"]: r for r in itd.primary_comparisons(rows)}
    sensitivity, specificity = family["itd_rare_sensitivity"], family["itd_rare_specificity"]
    assert sensitivity["difference"] == pytest.approx(-1 / 3) and sensitivity["p_holm"] > 0.05
    assert specificity["difference"] == pytest.approx(1.0)
    assert specificity["p"] == pytest.approx(binomtest(12, 12).pvalue)
    assert specificity["p_holm"] == pytest.approx(2 * binomtest(12, 12).pvalue)
    assert specificity["p_holm"] < 0.05  # ours significantly better where the other pays


# ---- 3. calibration slope and calibration-in-the-large


@pytest.fixture
def miscalibrated():
    rng = np.random.default_rng(5)
    true_logit = rng.normal(-1.0, 1.5, 300)
    y = rng.random(300) < 1 / (1 + np.exp(-true_logit))
    p = 1 / (1 + np.exp(-(2.0 * true_logit - 0.5)))  # too extreme and too low
    return y, p


@pytest.mark.slow
def test_calibration_slope_and_intercept_equal_statsmodels(miscalibrated):
    import statsmodels.api as sm
    y, p = miscalibrated
    lp = np.log(p / (1 - p))
    slope_fit = sm.Logit(y.astype(float), sm.add_constant(lp)).fit(disp=0)
    large_fit = sm.GLM(y.astype(float), np.ones((len(y), 1)), family=sm.families.Binomial(),
                       offset=lp).fit()
    got = recalibration.calibration_slope_intercept(y, p)
    assert got["slope"] == pytest.approx(slope_fit.params[1], rel=1e-8)
    assert got["slope_ci"] == pytest.approx(list(slope_fit.conf_int()[1]), rel=1e-6)
    assert got["intercept"] == pytest.approx(large_fit.params[0], rel=1e-8)
    assert got["intercept_ci"] == pytest.approx(list(large_fit.conf_int()[0]), rel=1e-6)
    assert got["slope"] < 1 and got["intercept"] > 0  # too extreme, risks too low: as planted


def test_calibration_of_perfectly_calibrated_probabilities_is_near_one_and_zero():
    rng = np.random.default_rng(6)
    p = rng.uniform(0.02, 0.98, 20000)
    y = rng.random(20000) < p
    got = recalibration.calibration_slope_intercept(y, p)
    assert got["slope_ci"][0] < 1 < got["slope_ci"][1]
    assert got["intercept_ci"][0] < 0 < got["intercept_ci"][1]


def test_per_class_recalibration_uses_each_class_column():
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    probs = np.tile([[0.5, 0.3, 0.2]], (10, 1))
    probs[y == 2] = [0.1, 0.2, 0.7]
    probs[y == 1] = [0.2, 0.6, 0.2]
    out = recalibration.per_class_recalibration(y, probs, ["a", "b", "c"])
    assert out["c"]["expected"] == pytest.approx(probs[:, 2].mean())
    assert out["c"]["observed"] == pytest.approx(0.3)
    assert out["a"]["n_positive"] == 4


def test_separation_gives_no_slope_rather_than_a_huge_one():
    got = recalibration.calibration_slope_intercept([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert got["slope"] is None and got["intercept"] is not None


# ---- 4. decision-curve analysis


def test_net_benefit_worked_example():
    """Five patients, two with the disease, p = 0.9, 0.4 (diseased), 0.6, 0.2, 0.1.
    pt = 0.3: treated 0.9, 0.6, 0.4 -> TP 2, FP 1: NB = 2/5 - 1/5 * 0.3/0.7 = 0.314286; treat-all
    0.4 - 0.6 * 0.3/0.7 = 0.142857. pt = 0.5: TP 1, FP 1: NB = 1/5 - 1/5 * 1 = 0; treat-all -0.2."""
    positive = np.array([1, 1, 0, 0, 0], bool)
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    curve = decision.net_benefit(positive, p, [0.3, 0.5])
    assert curve["tp"].tolist() == [2, 1] and curve["fp"].tolist() == [1, 1]
    assert curve["net_benefit"] == pytest.approx([0.4 - 0.2 * 3 / 7, 0.0])
    assert curve["treat_all"] == pytest.approx([0.4 - 0.6 * 3 / 7, -0.2])
    assert decision.net_benefit_at(positive, p, 0.4) == pytest.approx(2 / 5 - 1 / 5 * 0.4 / 0.6)


# ---- 5. PPV and NPV at a clinical prevalence


def test_net_benefit_at_threshold_1_is_not_defined_and_metrics_json_stays_strict():
    import json
    from orbital_clip.report.journal import decision_markdown
    value = decision.net_benefit_at([1, 0], [1.0, 0.2], 1.0)
    assert value is None
    json.dumps({"operating_net_benefit": value}, allow_nan=False)
    assert decision.net_benefit_at([1, 0], [1.0, 0.2], 0.5) == pytest.approx(0.5)  # 1/2 - 0
    curve = {"operating_threshold": 1.0, "operating_net_benefit": value}
    assert "net benefit n/a (at pt = 1" in decision_markdown({"decision_curve": curve, "rare_class": "r"}, False)[0]


def test_predictive_values_at_the_cohorts_own_prevalence_are_the_cohorts():
    got = prevalence.predictive_values_at_prevalence(tp=45, fn=5, tn=80, fp=20, prevalence=50 / 150)
    assert got["ppv"] == pytest.approx(45 / 65) and got["npv"] == pytest.approx(80 / 85)


def test_mercaldo_logit_interval_hand_computed():
    """sens 45/50 = 0.9, spec 80/100 = 0.8, prevalence 0.1: PPV = 0.09 / (0.09 + 0.18) = 1/3.
    Var(logit PPV) = 0.1 / (0.9 * 50) + 0.8 / (0.2 * 100) = 0.0422222, SE 0.205480;
    logit 1/3 = -0.693147 +- 1.959964 * 0.205480 = [-1.095881, -0.290413] -> [0.250512, 0.427903].
    NPV = 0.72 / 0.73; Var(logit NPV) = 0.9 / (0.1 * 50) + 0.2 / (0.8 * 100) = 0.1825."""
    got = prevalence.predictive_values_at_prevalence(tp=45, fn=5, tn=80, fp=20, prevalence=0.1)
    assert got["ppv"] == pytest.approx(1 / 3)
    assert got["ppv_ci"] == pytest.approx([0.250512, 0.427903], abs=2e-6)
    assert got["npv"] == pytest.approx(0.72 / 0.73)
    logit_npv = math.log(0.72 / 0.01)
    half = 1.959964 * math.sqrt(0.1825)
    expected = [1 / (1 + math.exp(-(logit_npv - half))), 1 / (1 + math.exp(-(logit_npv + half)))]
    assert got["npv_ci"] == pytest.approx(expected, abs=1e-6)
    assert not got["adjusted"]


def test_mercaldo_adjusted_logit_equals_bdpv_on_the_reviewers_cells():
    """tp 10, fn 0, tn 50, fp 3 at prevalence 0.03 (a zero cell): bdpv's adjusted logit takes
    sens = (10 + z^2/2) / (10 + z^2) = 0.86123, spec = (50 + z^2/2) / (53 + z^2) = 0.91338 and
    gives PPV 0.235 [0.114, 0.424]; the plain plug-in PPV is 0.03 / (0.03 + 3/53 * 0.97) = 0.353."""
    got = prevalence.predictive_values_at_prevalence(10, 0, 50, 3, 0.03)
    assert got["adjusted"]
    assert got["ppv"] == pytest.approx(0.235, abs=5e-4)
    assert got["ppv_ci"] == pytest.approx([0.114, 0.424], abs=5e-4)
    assert got["ppv_unadjusted"] == pytest.approx(0.03 / (0.03 + 3 / 53 * 0.97))
    z2 = 1.959964 ** 2
    sens, spec = (10 + z2 / 2) / (10 + z2), (50 + z2 / 2) / (53 + z2)
    assert got["npv"] == pytest.approx(spec * 0.97 / (spec * 0.97 + (1 - sens) * 0.03))


def test_a_perfect_test_at_low_prevalence_has_its_estimate_inside_its_interval():
    got = prevalence.predictive_values_at_prevalence(tp=10, fn=0, tn=50, fp=0, prevalence=0.01)
    assert got["adjusted"] and got["ppv_unadjusted"] == 1.0
    assert got["ppv_ci"][0] <= got["ppv"] <= got["ppv_ci"][1] < 1


def test_predictive_value_estimates_lie_inside_their_intervals_on_every_small_table():
    import itertools
    for tp, fn, tn, fp in itertools.product(range(4), repeat=4):
        for prev in (0.01, 0.3, 0.9):
            got = prevalence.predictive_values_at_prevalence(tp, fn, tn, fp, prev)
            for key in ("ppv", "npv"):
                if got[key] is not None:
                    low, high = got[key + "_ci"]
                    assert low - 1e-12 <= got[key] <= high + 1e-12, (tp, fn, tn, fp, prev, key, got)


# ---- 7. Clopper-Pearson beside Wilson; sensitivity at a fixed specificity


@pytest.mark.parametrize("k,n", [(0, 7), (3, 7), (7, 7), (12, 40)])
def test_interval_methods_equal_statsmodels(k, n):
    from statsmodels.stats.proportion import proportion_confint
    assert intervals.proportion_interval(k, n, method="clopper-pearson") == pytest.approx(
        list(proportion_confint(k, n, method="beta")))
    assert intervals.proportion_interval(k, n, method="wilson") == pytest.approx(
        list(proportion_confint(k, n, method="wilson")))
    with pytest.raises(ValueError, match="clopper-pearson"):
        intervals.proportion_interval(k, n, method="wald")


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_sensitivity_at_fixed_specificity_reads_sklearns_roc_curve(target):
    from sklearn.metrics import roc_curve
    positive, scores, _ = random_scores(7, 120)
    fpr, tpr, _thresholds = roc_curve(positive, scores)
    got = patient_level.at_fixed_point(positive, scores, target, "specificity")
    assert got["value"] == pytest.approx(tpr[fpr <= 1 - target + 1e-12].max())
    assert got["achieved"] >= target
    reverse = patient_level.at_fixed_point(positive, scores, target, "sensitivity")
    assert reverse["value"] == pytest.approx(1 - fpr[tpr >= target - 1e-12].min())
    called = scores >= got["threshold"]
    assert got["value"] == pytest.approx(called[positive].mean())
    assert got["achieved"] == pytest.approx((~called[~positive]).mean())


def test_fixed_point_bootstrap_interval_surrounds_the_value_and_is_patient_level_with_groups():
    positive, scores, _ = random_scores(8, 80)
    groups = np.repeat(np.arange(40), 2).astype(str)
    got = patient_level.at_fixed_point(positive, scores, 0.8, groups=groups, n_bootstrap=300, seed=1)
    low, high = got["ci_bootstrap"]
    assert low <= got["value"] <= high and got["bootstrap_unit"] == "patient"
    assert got["n_resamples"] == 300


# ---- 8. patient-level intervals for every per-class metric


def test_per_class_intervals_equal_the_operating_points_patient_bootstrap_and_wilson():
    """The same resamples as the operating point's patient-level interval (one rule, one home):
    class k's sensitivity and specificity intervals under argmax are the same numbers."""
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(30), 3).astype(str)
    y = np.repeat(rng.integers(0, 3, 30), 3)
    pred = np.where(rng.random(90) < 0.7, y, rng.integers(0, 3, 90))
    rows = patient_level.per_class_intervals(y, pred, ["a", "b", "c"], groups, 400, seed=3)
    by = {(r["class"], r["metric"]): r for r in rows}
    cm = metrics.confusion_matrices(y, pred, 3)
    for k, name in enumerate("abc"):
        reference = metrics.per_class_metrics(cm, k)
        expected = metrics.patient_level_intervals(y == k, pred == k, y, metrics.group_indices(groups, 90),
                                                   400, 3)
        for metric in ("sensitivity", "specificity", "ppv", "npv"):
            assert by[(name, metric)]["value"] == pytest.approx(reference[metric])
            assert by[(name, metric)]["ci"] == pytest.approx(reference[f"{metric}_ci"])
        for metric in ("sensitivity", "specificity"):
            assert by[(name, metric)]["ci_patient"] == pytest.approx(expected[f"{metric}_ci_patient"])
        assert by[(name, "ppv")]["ci_patient_unit"].startswith("patient")


def test_patient_level_interval_is_na_where_a_cluster_bootstrap_cannot_vary():
    """0/6 and 6/6 (every resample gives the same proportion) and a class seen in one patient
    only: n/a with the reason, never a zero-width interval; an ordinary k/n keeps its interval."""
    from orbital_clip.report.journal import journal_markdown
    groups = np.repeat(np.arange(12), 2).astype(str)  # 12 patients, 2 images each
    y = np.repeat([0] * 3 + [1] * 9, 2)  # class a: patients 0-2; b: 3-11
    pred = y.copy()
    pred[[0, 1, 2, 3, 4, 5]] = 1  # every a image called b: a's sensitivity 0/6
    pred[[6, 8]] = 0  # b called a on two images of two patients
    y[[22, 23]] = 2  # class c: one patient (11), both images right
    pred[[22, 23]] = 2
    rows = patient_level.per_class_intervals(y, pred, ["a", "b", "c"], groups, 200, seed=0)
    by = {(r["class"], r["metric"]): r for r in rows}
    assert (by["a", "sensitivity"]["k"], by["a", "sensitivity"]["n"]) == (0, 6)
    assert by["a", "sensitivity"]["ci_patient"] is None
    assert by["a", "sensitivity"]["ci_patient_note"].startswith("0/6")
    assert by["c", "specificity"]["k"] == by["c", "specificity"]["n"] == 22
    assert by["c", "specificity"]["ci_patient"] is None and "22/22" in by["c", "specificity"]["ci_patient_note"]
    assert by["c", "sensitivity"]["ci_patient"] is None  # 2/2 in one patient
    assert by["c", "sensitivity"]["ci_patient_note"].startswith("1 patient")
    ordinary = by["b", "sensitivity"]  # 12/14 over 7 patients: a real interval
    assert ordinary["ci_patient"][0] < ordinary["value"] <= ordinary["ci_patient"][1]
    assert ordinary["ci_patient_note"] == ""
    journal = {"unit": "patient", "ci_method": "wilson", "per_class": rows, "recalibration": None,
               "decision_curve": None, "fixed_points": None, "prevalence": None}
    text = "\n".join(journal_markdown(journal))
    assert "| a | sensitivity | 0/6 | " in text and "n/a (0/6: every resample gives 0" in text
    assert "0.000–0.000" not in text


# ---- the flags: refused by name (exit 2), accepted values reach args


@pytest.mark.parametrize("extra, message", [
    (["--prevalence", "0"], "--prevalence must be in (0, 1)"),
    (["--prevalence", "1"], "--prevalence must be in (0, 1)"),
    (["--fixed-specificity", "0"], "--fixed-specificity must be in (0, 1]"),
    (["--fixed-sensitivity", "1.5"], "--fixed-sensitivity must be in (0, 1]"),
    (["--ci-method", "wald"], "--ci-method"),
])
def test_journal_flags_are_refused_by_name(tmp_path, extra, message, capsys):
    from orbital_clip import scoring as inference
    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["--test-dir", str(tmp_path), "--checkpoint", "x.pt", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_journal_flags_reach_both_commands(tmp_path):
    from orbital_clip import scoring as inference
    from orbital_clip import scoring_args
    argv = ["--test-dir", str(tmp_path), "--prevalence", "0.02", "--ci-method", "clopper-pearson",
            "--fixed-specificity", "0.95"]
    model = inference.parse_args(argv + ["--checkpoint", "x.pt"])
    answers = scoring_args.build_parser("", model=False).parse_args(argv + ["--predictions", "a.csv"])
    for args in (model, answers):
        assert (args.prevalence, args.ci_method, args.fixed_specificity, args.fixed_sensitivity) == (
            0.02, "clopper-pearson", 0.95, 0.9)


# ---- invariance: the order of the rows and the names of the patients change nothing


def test_patient_level_numbers_do_not_move_when_rows_are_permuted_and_patients_renamed():
    rng = np.random.default_rng(10)
    groups = np.repeat(np.arange(25), 2)
    y = np.repeat(rng.integers(0, 3, 25), 2)
    pred = np.where(rng.random(50) < 0.7, y, rng.integers(0, 3, 50))
    score = rng.random(50) + 0.4 * (y == 0)
    names = np.array([f"P{g:02d}" for g in groups])
    perm = rng.permutation(50)
    renamed = np.array([f"Q{g:02d}" for g in groups])  # same sort order, other names
    first = patient_level.per_class_intervals(y, pred, ["a", "b", "c"], names, 200, seed=4)
    second = patient_level.per_class_intervals(y[perm], pred[perm], ["a", "b", "c"], renamed[perm], 200, seed=4)
    assert np.allclose([r["ci_patient"] for r in first], [r["ci_patient"] for r in second])
    other_b = score * 0.5 + rng.random(50) * 0.5
    one = clustered.clustered_delong_test(y == 0, score, other_b, names)
    two = clustered.clustered_delong_test((y == 0)[perm], score[perm], other_b[perm], renamed[perm])
    assert two["se"] == pytest.approx(one["se"]) and two["p"] == pytest.approx(one["p"])
    mc = clustered.clustered_mcnemar_exact(pred == y, (pred == y)[::-1], names)
    mc2 = clustered.clustered_mcnemar_exact((pred == y)[perm], (pred == y)[::-1][perm], renamed[perm])
    assert mc["p"] == pytest.approx(mc2["p"])

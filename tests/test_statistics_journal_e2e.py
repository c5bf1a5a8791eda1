"""Issue 28 end to end: inference.py on a tiny cohort with patients and two compared readers
writes the journal tables, and their numbers equal recomputations from predictions.csv
(statsmodels, hand formulas) and report.md carries every section."""
import json

import numpy as np
import pandas as pd
import pytest

from test_inference import run_inference  # noqa: E402

PATIENT_RE = r"(Patient \d+)"


def reader_file(ours, path, changed, no_answer, seed):
    """A reader's answers: ours with `changed` rows moved to the next class and `no_answer` rows
    unanswered, probabilities rolled with the answer."""
    folders = [c[len("prob_"):] for c in ours.columns if c.startswith("prob_")]
    other = ours[["path", "pred_label"] + [f"prob_{f}" for f in folders]].copy()
    for i in changed:
        other.loc[i, "pred_label"] = folders[(folders.index(other.loc[i, "pred_label"]) + 1) % len(folders)]
        other.loc[i, [f"prob_{f}" for f in folders]] = np.roll(
            ours.loc[i, [f"prob_{f}" for f in folders]].to_numpy(float), 1)
    other["status"] = "ok"
    other.loc[no_answer, "status"] = "failed: no answer"
    other.sample(frac=1.0, random_state=seed).to_csv(path, index=False)
    return other


@pytest.mark.slow
def test_journal_tables_on_a_patient_cohort_equal_recomputations(patient_cohort, checkpoint, tmp_path):
    import statsmodels.api as sm
    from statsmodels.stats.multitest import multipletests
    first = tmp_path / "first"
    assert run_inference(patient_cohort.root, checkpoint, first, "--group-regex", PATIENT_RE) == 0
    ours = pd.read_csv(first / "predictions.csv", keep_default_na=False)
    readers = {"a": reader_file(ours, tmp_path / "a.csv", [0, 3, 5, 9], [2], 0),
               "b": reader_file(ours, tmp_path / "b.csv", [1, 4], [6, 7, 8], 1)}
    out = tmp_path / "out"
    assert run_inference(patient_cohort.root, checkpoint, out, "--group-regex", PATIENT_RE,
                         "--compare", f"a={tmp_path / 'a.csv'}", f"b={tmp_path / 'b.csv'}",
                         "--threshold", "0.1", "--decision-rule", "threshold", "--prevalence", "0.01",
                         "--ci-method", "clopper-pearson", figures=True) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    journal, rare = metrics["journal"], metrics["rare_class"]
    folders = metrics["class_folders"]
    y = ours["true_label"].map(folders.index).to_numpy()
    probs = ours[[f"prob_{f}" for f in folders]].to_numpy(float)
    pred = probs.argmax(axis=1)
    k = folders.index(rare)
    positive, called = y == k, pred == k

    # per-class: values as per_class_metrics.csv, Clopper-Pearson image CIs, patient CIs named
    table = pd.read_csv(out / "per_class_intervals.csv").set_index(["class", "metric"])
    sens = table.loc[(rare, "sensitivity")]
    assert sens["value"] == pytest.approx((positive & called).sum() / positive.sum())
    assert sens["ci_unit"] == "image (clopper-pearson)"
    if 0 < sens["k"] < sens["n"]:
        assert sens["ci_patient_unit"].startswith("patient")
    else:  # 0/n or n/n: a bootstrap of patients cannot vary, so n/a with the reason
        assert pd.isna(sens["ci_patient"]) and sens["ci_patient_note"].startswith(f"{sens['k']}/")
    assert table["ci_patient_unit"].fillna("").str.startswith("patient").any()
    assert journal["unit"] == "patient"

    # calibration slope of the rare class: statsmodels Logit on predictions.csv's column
    lp = np.log(probs[:, k] / (1 - probs[:, k]))
    fit = sm.Logit(positive.astype(float), sm.add_constant(lp)).fit(disp=0)
    slope = pd.read_csv(out / "calibration_slope.csv").set_index("class").loc[rare, "slope"]
    assert slope == pytest.approx(fit.params[1], rel=1e-6)

    # decision curve by the formula where the tiny model's p(rare) (0.06-0.13) splits the cohort
    curve = pd.read_csv(out / "decision_curve.csv").set_index("threshold")
    n = len(y)
    for pt in (0.09, 0.1, 0.11):
        treated = probs[:, k] >= pt
        assert 0 < treated.sum() < n
        expected = (treated & positive).sum() / n - (treated & ~positive).sum() / n * pt / (1 - pt)
        assert curve.loc[pt, "net_benefit_model"] == pytest.approx(expected)
    assert journal["decision_curve"]["operating_threshold"] == pytest.approx(0.1)
    assert (out / "decision_curve.png").is_file()

    # PPV at prevalence 0.01 of the operating rule, by Bayes from its sensitivity and specificity
    rule = probs[:, k] >= 0.1
    se, sp = (positive & rule).sum() / positive.sum(), (~positive & ~rule).sum() / (~positive).sum()
    assert 0 < se and sp < 1
    ppv = pd.read_csv(out / "prevalence.csv").set_index("rule").loc["p >= 0.1", "ppv"]
    assert ppv == pytest.approx(se * 0.01 / (se * 0.01 + (1 - sp) * 0.99))

    # intention to diagnose: each reader's abstentions counted as errors; Holm as statsmodels
    itd = pd.read_csv(out / "itd_comparison.csv").set_index("model")
    assert itd.loc["b", "n_abstained"] == 3 and itd.loc["b", "abstention_rate"] == pytest.approx(3 / n)
    b = readers["b"].set_index("path").loc[ours["path"]]
    b_pred = np.where(b["status"] == "ok", b["pred_label"].map(folders.index), -1)
    assert itd.loc["b", "itd_accuracy"] == pytest.approx(np.mean(b_pred == y))
    # ours in the comparison is the declared rule (p >= 0.1), the per-class table argmax
    rule = probs[:, k] >= 0.1
    decided = np.where(rule, k, pred)
    assert itd.loc["ours", "itd_accuracy"] == pytest.approx(np.mean(decided == y))
    assert itd.loc["ours", "itd_rare_sensitivity"] == pytest.approx(rule[positive].mean())
    assert rule[positive].mean() != called[positive].mean()  # the two rules differ here
    assert itd.loc["ours", "itd_rare_specificity"] == pytest.approx(np.mean(decided[~positive] != k))
    assert itd.loc["b", "itd_rare_specificity"] == pytest.approx(  # b's abstentions: false positives
        np.mean((b_pred[~positive] >= 0) & (b_pred[~positive] != k)))
    primary = pd.read_csv(out / "primary_endpoint.csv", keep_default_na=False)
    raw = [itd.loc[m, f"p_{e}"] for e in ("rare_sensitivity", "rare_specificity") for m in ("a", "b")]
    assert primary["endpoint"].tolist() == ["itd_rare_sensitivity"] * 2 + ["itd_rare_specificity"] * 2
    assert primary["model"].tolist() == ["a", "b", "a", "b"] and set(primary["family_size"]) == {4}
    assert primary["p"].tolist() == pytest.approx(raw)
    assert primary["p_holm"].tolist() == pytest.approx(list(multipletests(raw, method="holm")[1]))
    assert set(pd.read_csv(out / "clustered_tests.csv")["model"]) == {"a", "b"}

    comparison = pd.read_csv(out / "comparison.csv", keep_default_na=False)
    assert len(comparison) and set(comparison["p_status"]) == {"exploratory"}

    report = (out / "report.md").read_text()
    from orbital_clip.report.tables import COMPARISON_P_NOTE
    section = report.split("## Comparison with other models")[1]
    assert section.lstrip().startswith(COMPARISON_P_NOTE)
    for heading in ("### Per-class metrics with patient-level intervals", "### Calibration slope and intercept",
                    "### Decision curve", "### Intention-to-diagnose comparison and primary endpoint",
                    "Holm", "patient CI", "exploratory", "PPV"):
        assert heading in report


@pytest.mark.slow
def test_score_answers_writes_the_journal_tables_of_an_answer_file(patient_cohort, checkpoint, tmp_path):
    """score_answers.py (an answer file, no model): --prevalence and the patient-level table
    follow the file's answers; no comparison without compared models."""
    from orbital_clip import answers
    first = tmp_path / "first"
    assert run_inference(patient_cohort.root, checkpoint, first, "--group-regex", PATIENT_RE) == 0
    ours = pd.read_csv(first / "predictions.csv", keep_default_na=False)
    reader = reader_file(ours, tmp_path / "a.csv", [0, 3, 5, 9, 12, 20], [2], 0)
    out = tmp_path / "answers"
    assert answers.main(["--test-dir", str(patient_cohort.root), "--predictions", f"a={tmp_path / 'a.csv'}",
                         "--out-dir", str(out), "--group-regex", PATIENT_RE, "--bootstrap", "50",
                         "--prevalence", "0.05", "--no-figures"]) == 0
    folders = json.loads((out / "metrics.json").read_text())["class_folders"]
    reader = reader.set_index("path").loc[ours["path"]]
    y = ours["true_label"].map(folders.index).to_numpy()
    answered = (reader["status"] == "ok").to_numpy()
    pred = reader["pred_label"].map(folders.index).to_numpy()
    positive, called = (y == 0)[answered], (pred == 0)[answered]
    se, sp = (positive & called).sum() / positive.sum(), (~positive & ~called).sum() / (~positive).sum()
    row = pd.read_csv(out / "prevalence.csv").iloc[0]
    assert row["rule"] == "argmax" and row["sensitivity"] == pytest.approx(se)
    if se > 0 or sp < 1:
        assert row["npv_unadjusted"] == pytest.approx(sp * 0.95 / (sp * 0.95 + (1 - se) * 0.05))
    table = pd.read_csv(out / "per_class_intervals.csv").set_index(["class", "metric"])
    assert table.loc[(folders[0], "specificity"), "value"] == pytest.approx(sp)
    spec = table.loc[(folders[0], "specificity")]
    assert (spec["ci_patient_unit"].startswith("patient") if 0 < spec["k"] < spec["n"]
            else spec["ci_patient_note"] != "")
    assert not (out / "itd_comparison.csv").exists()
    assert "### Per-class metrics with patient-level intervals" in (out / "report.md").read_text()

"""The tables and report.md section of metrics.json's `journal` block (issue 28): patient-level
per-class intervals, calibration slope and intercept, the decision curve, sensitivity at a fixed
specificity, PPV/NPV at a clinical prevalence, the intention-to-diagnose comparison and the
Holm-adjusted primary family. Every table names the unit of its intervals; every p-value outside
the primary family is labelled exploratory.
"""

import pandas as pd

from orbital_clip.report.tables import format_value

EXPLORATORY = "exploratory (not adjusted for multiplicity)"


def interval_text(ci):
    return "" if not ci else f"{ci[0]:.4f}–{ci[1]:.4f}"


def p_text(p):
    return "n/a" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def per_class_frame(journal):
    """per_class_intervals.csv: class, metric, k/n, value, image-level and patient-level CI."""
    return pd.DataFrame([{"class": r["class"], "metric": r["metric"], "k": r["k"], "n": r["n"],
                          "value": r["value"], "ci": interval_text(r["ci"]), "ci_unit": r["ci_unit"],
                          "ci_patient": interval_text(r["ci_patient"]),
                          "ci_patient_unit": r["ci_patient_unit"] or "",
                          "ci_patient_note": r.get("ci_patient_note", ""),
                          "n_resamples": r["n_resamples"]} for r in journal["per_class"]])


def recalibration_frame(journal):
    rows = []
    for name, r in (journal["recalibration"] or {}).items():
        rows.append({"class": name, "rare_class": name == journal["rare_class"], "n": r["n"],
                     "observed": r["observed"], "expected": r["expected"],
                     "slope": r["slope"], "slope_ci": interval_text(r["slope_ci"]),
                     "intercept": r["intercept"], "intercept_ci": interval_text(r["intercept_ci"]),
                     "ci_unit": "image (Wald, logistic recalibration)"})
    return pd.DataFrame(rows)


def decision_frame(journal):
    curve = journal["decision_curve"]
    return pd.DataFrame({"threshold": curve["threshold"], "tp": curve["tp"], "fp": curve["fp"],
                         "net_benefit_model": curve["net_benefit"], "net_benefit_treat_all": curve["treat_all"],
                         "net_benefit_treat_none": 0.0})


def fixed_frame(journal):
    return pd.DataFrame([{"fixed": r["fixed"], "target": r["target"], "threshold": r["threshold"],
                          "achieved": r["achieved"], "metric": r["metric"], "value": r["value"],
                          "ci": interval_text(r["ci"]), "ci_unit": r["ci_unit"],
                          "ci_bootstrap": interval_text(r["ci_bootstrap"]),
                          "ci_bootstrap_unit": r["bootstrap_unit"] or "",
                          "n_resamples": r["n_resamples"]} for r in journal["fixed_points"]])


def prevalence_frame(journal):
    return pd.DataFrame([{"class": journal["rare_class"], "rule": r["rule"], "prevalence": r["prevalence"],
                          "sensitivity": r["sensitivity"], "specificity": r["specificity"],
                          "ppv": r["ppv"], "ppv_ci": interval_text(r["ppv_ci"]), "npv": r["npv"],
                          "npv_ci": interval_text(r["npv_ci"]), "adjusted_logit": r["adjusted"],
                          "ppv_unadjusted": r.get("ppv_unadjusted"), "npv_unadjusted": r.get("npv_unadjusted"),
                          "ci_unit": "image (Mercaldo logit)"} for r in journal["prevalence"]])


def itd_frame(journal):
    rows = []
    for r in journal["itd_comparison"]:
        row = {key: (interval_text(v) if key.endswith("_ci") else v) for key, v in r.items()}
        row["p_status"] = "" if r["p_accuracy"] is None else EXPLORATORY
        row["ci_unit"] = f"image ({r['ci_method']})"
        rows.append(row)
    return pd.DataFrame(rows)


def journal_frames(journal):
    """{file name: DataFrame} of every block present in `journal`."""
    frames = {"per_class_intervals.csv": per_class_frame(journal)}
    for name, key, build in (("calibration_slope.csv", "recalibration", recalibration_frame),
                             ("decision_curve.csv", "decision_curve", decision_frame),
                             ("fixed_points.csv", "fixed_points", fixed_frame),
                             ("prevalence.csv", "prevalence", prevalence_frame),
                             ("itd_comparison.csv", "itd_comparison", itd_frame),
                             ("primary_endpoint.csv", "primary", lambda j: pd.DataFrame(j["primary"])),
                             ("clustered_tests.csv", "clustered_tests",
                              lambda j: pd.DataFrame([dict(r, p_status=EXPLORATORY) for r in j["clustered_tests"]]))):
        if journal.get(key):
            frames[name] = build(journal)
    return frames


def per_class_markdown(journal):
    """The per-class table with both units: image (Wilson / Clopper-Pearson) and patient."""
    grouped = journal["unit"] == "patient"
    lines = [f"Per-class one-vs-rest metrics under argmax. Intervals: image-level "
             f"({journal['ci_method']})" + ("; patient-level (cluster bootstrap of patients; n/a, "
                                            "with the reason, at 0/n, n/n or with fewer than 2 "
                                            "patients in the denominator, where resampling patients "
                                            "cannot vary)."
                                            if grouped else "; no patients known, so no patient-level interval."),
             "", "| class | metric | k/n | value (image CI) |" + (" patient CI |" if grouped else ""),
             "| --- | --- | --- | --- |" + (" --- |" if grouped else "")]
    for r in journal["per_class"]:
        ci = r["ci_patient"]
        note = f" ({r['ci_patient_note']})" if r.get("ci_patient_note") else ""
        patient = (f" {ci[0]:.3f}–{ci[1]:.3f} |" if ci else f" n/a{note} |") if grouped else ""
        lines.append(f"| {r['class']} | {r['metric']} | {r['k']}/{r['n']} | "
                     f"{format_value(r['value'], r['ci'])} |{patient}")
    return lines


def calibration_markdown(journal):
    lines = ["Logistic recalibration, one-vs-rest (ideal: slope 1, calibration-in-the-large 0; "
             "slope < 1: probabilities too extreme; intercept > 0: risks too low). "
             "Intervals: Wald, images.", "",
             "| class | observed rate | mean p | slope (95% CI) | calibration-in-the-large (95% CI) |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in journal["recalibration"].items():
        rare = " (rare)" if name == journal["rare_class"] else ""
        lines.append(f"| {name}{rare} | {format_value(r['observed'])} | {format_value(r['expected'])} | "
                     f"{format_value(r['slope'], r['slope_ci'])} | "
                     f"{format_value(r['intercept'], r['intercept_ci'])} |")
    return lines


def decision_markdown(journal, figures):
    curve, rare = journal["decision_curve"], journal["rare_class"]
    line = (f"Net benefit of calling {rare} when p({rare}) >= pt, against treat-all and treat-none "
            "(Vickers & Elkin 2006), pt from 0.01 to 0.99: decision_curve.csv.")
    if curve["operating_threshold"] is not None:
        benefit = curve["operating_net_benefit"]
        line += (f" At the stored operating threshold {curve['operating_threshold']:.3f}: net benefit "
                 + ("n/a (at pt = 1 the harm-to-benefit odds pt/(1 - pt) are infinite)."
                    if benefit is None else f"{benefit:.4f}."))
    return [line] + (["", "![decision curve](decision_curve.png)"] if figures else [])


def points_markdown(journal):
    lines = []
    for r in journal["fixed_points"] or []:
        boot = (f"; {r['bootstrap_unit']}-level bootstrap with the threshold re-chosen "
                f"{interval_text(r['ci_bootstrap'])}" if r["ci_bootstrap"] else "")
        lines.append(f"- {r['metric']} at {r['fixed']} >= {r['target']:g}: "
                     f"{format_value(r['value'], r['ci'])} (image, {journal['ci_method']}{boot})")
    for prev in journal["prevalence"] or []:
        lines.append(f"- At a prevalence of {prev['prevalence']:g} ({journal['rare_class']}, {prev['rule']}): "
                     f"PPV {format_value(prev['ppv'], prev['ppv_ci'], 4)}, NPV "
                     f"{format_value(prev['npv'], prev['npv_ci'], 4)} (Mercaldo logit intervals"
                     f"{'; a zero cell, so adjusted: sensitivity and specificity as (x + z²/2)/(n + z²), estimate included' if prev['adjusted'] else ''}; images).")
    return lines


def p_with_note(p, note):
    """'1.000 (no discordant pairs)': a p-value and why it is what it is, when there is a why."""
    return p_text(p) + (f" ({note})" if note else "")


def comparison_markdown(journal):
    """The intention-to-diagnose comparison and the Holm-adjusted primary family."""
    rare = journal["rare_class"]
    lines = [f"Intention to diagnose: every image received, a non-answer or unreadable image "
             f"counted as an error — on a non-{rare} image as a false positive "
             f"({journal['ci_method']} intervals, images; paired p exact McNemar"
             f"{', clustered by patient (sign-flip)' if journal['unit'] == 'patient' else ''}, "
             f"{EXPLORATORY}).", "",
             f"| model | abstained (rate, CI) | ITD accuracy | ITD {rare} sensitivity | "
             f"ITD {rare} specificity | p accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in journal["itd_comparison"]:
        lines.append(f"| {r['model']} | {r['n_abstained']}/{r['n']} "
                     f"({format_value(r['abstention_rate'], r['abstention_rate_ci'])}) | "
                     f"{format_value(r['itd_accuracy'], r['itd_accuracy_ci'])} | "
                     f"{format_value(r['itd_rare_sensitivity'], r['itd_rare_sensitivity_ci'])} | "
                     f"{format_value(r.get('itd_rare_specificity'), r.get('itd_rare_specificity_ci'))} | "
                     f"{p_with_note(r['p_accuracy'], r.get('p_accuracy_note')) if r['model'] != 'ours' else '—'} |")
    family = journal["primary"]
    lines += ["", f"**Primary endpoints** (declared, co-primary: {rare} sensitivity and {rare} "
              "specificity, intention to diagnose, ours vs each compared model; one family of "
              f"{family[0]['family_size'] if family else 0}, Holm-adjusted; a comparison without a "
              "discordant pair has exact p = 1 and stays in the family). Every other p-value in "
              "this report is exploratory.", "",
              "| endpoint | model | ours | model | difference | p | p (Holm) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in family:
        lines.append(f"| {r['endpoint']} | {r['model']} | {format_value(r['ours'])} | "
                     f"{format_value(r['model_value'])} | {format_value(r['difference'])} | "
                     f"{p_with_note(r['p'], r.get('p_note'))} | {p_text(r['p_holm'])} |")
    for r in journal.get("clustered_tests") or []:
        lines.append(f"\nClustered tests vs {r['model']} ({r['n_patients']} patients, {EXPLORATORY}): "
                     f"accuracy exact clustered McNemar p {p_text(r['p_mcnemar_clustered_exact'])}; "
                     f"rare AUROC clustered DeLong (Obuchowski) p {p_text(r['p_delong_clustered'])}.")
    return lines


def journal_markdown(journal, figures=True):
    """report.md's section for a journal's statistical review, or [] without the block."""
    if not journal:
        return []
    lines = ["", "## Statistics for a journal's review", "", "### Per-class metrics with patient-level intervals", ""]
    lines += per_class_markdown(journal)
    if journal["recalibration"]:
        lines += ["", "### Calibration slope and intercept", ""] + calibration_markdown(journal)
    if journal["decision_curve"]:
        lines += ["", "### Decision curve", ""] + decision_markdown(journal, figures)
    points = points_markdown(journal)
    if points:
        lines += ["", "### Clinically chosen points", ""] + points
    if journal.get("itd_comparison"):
        lines += ["", "### Intention-to-diagnose comparison and primary endpoint", ""]
        lines += comparison_markdown(journal)
    return lines

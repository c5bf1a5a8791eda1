"""Answer files with patients, and the second step counted as a reader would (issue 25 items 6
and 11): known-answer cohorts whose wrong answers are the ones the issue reports."""

import json

import numpy as np
import pandas as pd
import pytest

from orbital_clip import answers as answer_files
from orbital_clip import metrics
from conftest import write_csv

SUBTYPES = ["thyroid eye disease", "orbital inflammation", "orbital tumour"]


def write_cohort(root, paths):
    """Files at `paths` under root/cohort (answers are scored, images never read)."""
    cohort = root / "cohort"
    for path in paths:
        (cohort / path).parent.mkdir(parents=True, exist_ok=True)
        (cohort / path).write_bytes(b"not read")
    return cohort


def two_rare_patients(root):
    """Thyroid eye disease in 2 patients: P1 with 20 photos all answered right, P2 with 1 photo
    answered wrong (20/21 = 0.952, Wilson 0.773-0.992); the other subtypes 4 patients of 2 photos,
    all right. Returns (cohort, answer file)."""
    rows = [(f"{SUBTYPES[0]}/P1_{i}.png", SUBTYPES[0]) for i in range(20)]
    rows.append((f"{SUBTYPES[0]}/P2_0.png", SUBTYPES[1]))
    for k in (1, 2):
        rows += [(f"{SUBTYPES[k]}/P{10 * k + p}_{i}.png", SUBTYPES[k]) for p in range(4) for i in range(2)]
    cohort = write_cohort(root, [path for path, _ in rows])
    return cohort, write_csv(root / "answers.csv", ["path", "answer"], rows)


def score(cohort, answers, out, *extra):
    return answer_files.main(["--test-dir", str(cohort), "--predictions", str(answers),
                              "--classes", *SUBTYPES, "--out-dir", str(out),
                              "--bootstrap", "400", "--seed", "1", "--no-figures", *extra])


def test_answer_file_sensitivity_with_patients_gets_the_patient_level_interval(tmp_path):
    cohort, answers = two_rare_patients(tmp_path)
    assert score(cohort, answers, tmp_path / "out", "--group-regex", r"^(P\d+)_") == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    ted = result["per_class"][SUBTYPES[0]]
    assert ted["sensitivity"] == pytest.approx(20 / 21)
    assert ted["sensitivity_ci"] == pytest.approx([0.773, 0.992], abs=1e-3)  # Wilson: images
    # two patients resampled: P1 twice (1.0), P2 twice (0.0) each about a quarter of the time
    assert ted["sensitivity_ci_patient"] == [0.0, 1.0]
    assert ted["sensitivity_ci_patient_n_resamples"] == 400
    assert result["interval_levels"]["per_class sensitivity_ci_patient, specificity_ci_patient"].startswith("patient")
    assert result["interval_levels"]["overall <metric>_ci"].startswith("patient")
    total = result["flow"]["rows"]["total"]
    assert (total["patients_received"], result["flow"]["rows"][SUBTYPES[0]]["patients_scored"]) == (10, 2)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "0.952 (0.000–1.000)" in report and "patients received" in report
    assert "patients with an answer naming no class" in report and "patients with an unreadable image" not in report
    table = pd.read_csv(tmp_path / "out" / "per_class_metrics.csv")
    assert table.loc[0, "sensitivity_ci_patient_low"] == 0.0


def test_class_patient_intervals_are_the_operating_points_function():
    """The one home: class k's patient interval is patient_level_intervals of 'predicted k',
    the function behind the checkpoint path's operating point (same seed, same resamples)."""
    rng = np.random.default_rng(4)
    y_true = np.repeat([0, 1, 2], 12)
    y_pred = np.where(rng.random(36) < 0.7, y_true, (y_true + 1) % 3)
    groups = np.array([f"P{i // 3}" for i in range(36)])
    base = metrics.compute_metrics(y_true, metrics.label_probs(y_pred, 3), SUBTYPES, 0)
    out = metrics.with_class_patient_intervals(base, y_true, y_pred, SUBTYPES, groups, 300, seed=5)
    for k, name in enumerate(SUBTYPES):
        op = metrics.operating_point_metrics(y_true, metrics.label_probs(y_pred, 3), k, 2.0,
                                             groups=groups, n_bootstrap=300, seed=5)
        assert out["per_class"][name]["sensitivity_ci_patient"] == op["argmax"]["sensitivity_ci_patient"]
        assert out["per_class"][name]["specificity_ci_patient"] == op["argmax"]["specificity_ci_patient"]
    assert metrics.with_class_patient_intervals(base, y_true, y_pred, SUBTYPES, None, 300) is base


@pytest.mark.slow
def test_a_checkpoints_predictions_scored_as_an_answer_file_get_the_same_patient_intervals(
        patient_cohort, checkpoint, tmp_path):
    """Invariance across paths: the same predictions, scored as a checkpoint and as an answer
    file, give every class the same patient-level sensitivity and specificity intervals."""
    from orbital_clip import scoring
    common = ["--test-dir", str(patient_cohort.root), "--group-regex", r"(Patient \d+)",
              "--bootstrap", "200", "--no-figures"]
    assert scoring.main([*common, "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / "ckpt"),
                         "--workers", "0", "--no-progress"]) == 0
    by_checkpoint = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    folders = by_checkpoint["class_folders"]
    assert answer_files.main([*common, "--predictions", str(tmp_path / "ckpt" / "predictions.csv"),
                              "--classes", *folders, "--out-dir", str(tmp_path / "answers")]) == 0
    by_answers = json.loads((tmp_path / "answers" / "metrics.json").read_text())
    for folder in folders:
        for key in ("sensitivity", "sensitivity_ci_patient", "specificity_ci_patient"):
            assert by_answers["per_class"][folder][key] == by_checkpoint["per_class"][folder][key]
    assert by_answers["interval_levels"] == by_checkpoint["interval_levels"]


# The second step counted as a reader would (item 11): 10 thyroid-eye-disease images, 4 of which
# the model never names a subtype for ("no orbital disease", "none of these", "conjunctivitis")
NOT_ORBITAL = ["No orbital disease detected", "none of these"]
STEP_NAMES = ["image", "image+demographics", "image+demographics+symptoms"]


def ted_answers(step):
    """TED images 0-5 answered at every step (4, 5, then 6 of them right), 6-9 never with a
    subtype: 6 and 7 declared outcomes, 8 and 9 unmapped (one answer in two spellings)."""
    right = 4 + step
    answers = [SUBTYPES[0] if i < right else SUBTYPES[1 + (i % 2)] for i in range(6)]
    return answers + [NOT_ORBITAL[0], NOT_ORBITAL[1], "conjunctivitis", "Conjunctivitis."]


def second_step(root):
    """Cohort (TED 10, the others 5 each, one image per patient), three answer files, a label
    map declaring 'not orbital' as an outcome. Returns (cohort, files, label map)."""
    paths = [f"{SUBTYPES[0]}/P{i}.png" for i in range(10)]
    paths += [f"{SUBTYPES[k]}/P{10 * k + i}.png" for k in (1, 2) for i in range(5)]
    cohort = write_cohort(root, paths)
    files = []
    for step in range(3):
        answers = ted_answers(step) + [SUBTYPES[1]] * 5 + [SUBTYPES[2]] * 5
        files.append(write_csv(root / f"step{step + 1}.csv", ["path", "answer"], list(zip(paths, answers))))
    label_map = root / "map.json"
    label_map.write_text(json.dumps({SUBTYPES[0]: ["TED"], "outcomes": {"not orbital": NOT_ORBITAL}}))
    return cohort, files, label_map


def test_second_step_counts_answers_outside_the_options_as_misses(tmp_path):
    cohort, files, label_map = second_step(tmp_path)
    out = tmp_path / "out"
    assert answer_files.main([
        "--test-dir", str(cohort), "--predictions", f"{STEP_NAMES[0]}={files[0]}",
        "--compare", f"{STEP_NAMES[1]}={files[1]}", f"{STEP_NAMES[2]}={files[2]}",
        "--label-map", str(label_map), "--classes", *SUBTYPES, "--out-dir", str(out),
        "--bootstrap", "200", "--no-figures"]) == 0

    def counts(name, k=0, measure="sensitivity"):
        table = pd.read_csv(out / name)
        rows = table[(table["class"] == SUBTYPES[k]) & (table["measure"] == measure)]
        return [(int(h), int(n)) for h, n in zip(rows["hits"], rows["n"])], set(table["analysis"])

    def ted_sensitivity(name):
        return counts(name)

    # primary: 0.4 -> 0.5 -> 0.6 on all 10; answered only (secondary): 0.667 -> 0.833 -> 1.0 on 6
    assert ted_sensitivity("sequential.csv") == ([(4, 10), (5, 10), (6, 10)], {"intention-to-diagnose"})
    assert ted_sensitivity("sequential_answered.csv") == ([(4, 6), (5, 6), (6, 6)], {"answered only"})
    # worst case: the 4 TED images naming no class are false calls against inflammation and
    # tumour (15 negatives each; plus TED image 4, resp. 5, answered with that subtype)
    assert counts("sequential.csv", 1, "specificity")[0] == [(10, 15), (11, 15), (11, 15)]
    assert counts("sequential.csv", 2, "specificity")[0] == [(10, 15), (10, 15), (11, 15)]
    assert counts("sequential.csv", 0, "specificity")[0] == [(10, 10)] * 3
    # answered only: the 16 images answered at every step, those 4 left out
    assert counts("sequential_answered.csv", 1, "specificity")[0] == [(10, 11), (11, 11), (11, 11)]
    for name, n, difference in (("sequential_changes.csv", 10, 0.1),
                                ("sequential_answered_changes.csv", 6, 1 / 6)):
        changes = pd.read_csv(out / name)
        row = changes[(changes["class"] == SUBTYPES[0]) & (changes["measure"] == "sensitivity")
                      & (changes["to_step"] == STEP_NAMES[1]) & changes["test"].str.startswith("McNemar")]
        # the paired change rests on the images of the per-step table above it
        assert (int(row["n"].iloc[0]), int(row["gained"].iloc[0])) == (n, 1)
        assert row["difference"].iloc[0] == pytest.approx(difference)
    matrix = pd.read_csv(out / "confusion_matrix_itd.csv").set_index("true_label")
    assert list(matrix.columns) == [*SUBTYPES, "not orbital", answer_files.UNMAPPED_OUTCOME]
    assert matrix.loc[SUBTYPES[0]].tolist() == [4, 1, 1, 2, 2]
    assert matrix.loc[SUBTYPES[1]].tolist() == [0, 5, 0, 0, 0]
    unmapped = pd.read_csv(out / "unmapped_answers.csv")
    assert unmapped.to_dict("records") == [{"answer": "conjunctivitis", "n": 2}]
    result = json.loads((out / "metrics.json").read_text())
    assert result["itd_rare_sensitivity"] == pytest.approx(0.4)
    assert result["sequential"]["n_complete"] == 20 and result["sequential_answered"]["n_complete"] == 16
    report = (out / "report.md").read_text()
    assert "unreadable (excluded)" not in report and "no class answer" in report
    assert "is a failed row" not in report and "a declared outcome is a reading outside" in report
    assert "## Answers outside the options" in report and "2 × `conjunctivitis`" in report
    assert "Primary (intention-to-diagnose, worst case): all 20 images" in report
    assert "a false positive against every other class's specificity" in report
    assert "Secondary (answered only): the 16 of 20 images" in report


def test_an_outcome_that_names_a_class_is_refused_naming_the_label_map(tmp_path, capsys):
    cohort, files, label_map = second_step(tmp_path)
    label_map.write_text(json.dumps({SUBTYPES[0]: ["TED"], "outcomes": {"not orbital": ["TED"]}}))
    assert answer_files.main(["--test-dir", str(cohort), "--predictions", str(files[0]),
                              "--label-map", str(label_map), "--classes", *SUBTYPES,
                              "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "outcome 'not orbital': 'TED' names the class 'thyroid eye disease'" in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_step_file_declares_not_orbital_as_an_outcome():
    from orbital_clip import prompts
    from orbital_clip.ask import steps
    step_set = steps.load_steps(steps.PAPER_STEPS)
    outcomes = prompts.parse_outcomes(step_set.label_map, step_set.classes)
    assert outcomes[prompts.normalise_answer("No orbital disease detected")] == "not orbital / none of these"


def test_not_orbital_on_every_image_is_a_result_not_a_failure(tmp_path):
    """A model that answers the declared outcome for every confirmed case has sensitivity 0 by
    intention to diagnose: exit 0, the outcome column in report.md; not 'nothing could be scored'."""
    cohort, files, label_map = second_step(tmp_path)
    paths = pd.read_csv(files[0])["path"]
    answers = write_csv(tmp_path / "none.csv", ["path", "answer"], [[p, NOT_ORBITAL[0]] for p in paths])
    out = tmp_path / "out"
    assert answer_files.main(["--test-dir", str(cohort), "--predictions", str(answers),
                              "--label-map", str(label_map), "--classes", *SUBTYPES,
                              "--out-dir", str(out), "--no-figures"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert (result["n"], result["itd_rare_sensitivity"]) == (0, 0.0)
    assert result["answers_outside_options"]["confusion_matrix_itd"][0] == [0, 0, 0, 10]
    assert "| thyroid eye disease | 0 | 0 | 0 | 10 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("label_map, refusal", [
    # a class's synonyms as a plain string: one synonym, as the scorer reads it (issue 25 item 11)
    ({SUBTYPES[0]: "TED", "outcomes": {"not orbital": ["TED"]}},
     "outcome 'not orbital': 'TED' names the class 'thyroid eye disease'"),
    # an outcome whose name normalises to '' would take every blank answer
    ({"outcomes": {"": ["none of these"]}}, "outcome '' has an empty name"),
    ({"outcomes": {".": ["none of these"]}}, "outcome '.' has an empty name"),
])
def test_parse_outcomes_refuses_a_class_synonym_string_and_an_empty_outcome_name(label_map, refusal):
    from orbital_clip import prompts
    with pytest.raises(prompts.LabelMapError, match=refusal):
        prompts.parse_outcomes(label_map, SUBTYPES, "map.json")
    with pytest.raises(prompts.LabelMapError, match=refusal):  # the scripts' one parse
        prompts.parse_label_map(label_map, SUBTYPES, "map.json")


def test_a_first_step_naming_no_class_keeps_both_sequential_tables_in_the_report(tmp_path):
    """Every step-1 answer a declared outcome: report.md still has the primary table (worst case:
    sensitivity and specificity 0 for every class) and the secondary one, resting on 0 images."""
    cohort, files, label_map = second_step(tmp_path)
    paths = pd.read_csv(files[0])["path"]
    none = write_csv(tmp_path / "none.csv", ["path", "answer"], [[p, NOT_ORBITAL[1]] for p in paths])
    out = tmp_path / "out"
    assert answer_files.main(["--test-dir", str(cohort), "--predictions", f"a={none}",
                              "--compare", f"b={files[2]}", "--label-map", str(label_map),
                              "--classes", *SUBTYPES, "--out-dir", str(out), "--bootstrap", "50",
                              "--no-figures"]) == 0
    report = (out / "report.md").read_text()
    assert "No answer named a class" in report
    assert "## Sequential readings" in report and "### Secondary: answered only" in report
    assert "Secondary (answered only): the 0 of 20 images" in report
    # refusing everywhere is no specificity (Wilson upper bounds as statsmodels): the images of the other subtypes are false calls
    assert "| orbital inflammation | specificity | 0.000 (0.000–0.204) [0/15] |" in report
    assert "| thyroid eye disease | specificity | 0.000 (0.000–0.278) [0/10] |" in report


def test_unmapped_answers_are_listed_as_one_code_span_each():
    from orbital_clip.report.markdown import outside_markdown
    answers = ["I cannot tell.\n| --- |\nmaybe `TED`", "``a``", "x" * 200]
    outside = {"columns": SUBTYPES, "confusion_matrix_itd": [[0, 0, 0]] * 3,
               "unmapped_answers": [{"answer": a, "n": 1} for a in answers]}
    listed = [line for line in outside_markdown(outside, SUBTYPES) if line.startswith("- 1 ×")]
    assert listed == ["- 1 × `` I cannot tell. ⏎ | --- | ⏎ maybe `TED` ``",
                      "- 1 × ``` ``a`` ```",
                      "- 1 × `" + "x" * 119 + "…`"]

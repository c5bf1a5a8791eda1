"""inference.py --predictions (answer files scored without a model) and the sequential table of
--compare steps: hand-computed answers over a 3-subtype cohort, statsmodels' McNemar and Cochran's
Q as references, the refusals, and the README's worked example on the shipped demo files."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from statsmodels.stats.contingency_tables import cochrans_q, mcnemar

from orbital_clip import answers as answer_files
from orbital_clip import evaluation
from orbital_clip import scoring as inference
from orbital_clip import metrics
from conftest import REPO_ROOT, tree_state, write_csv

ORDER = ["thyroid eye disease", "orbital inflammation", "orbital tumour"]  # --classes
TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2]
PATIENTS = ["P1", "P1", "P2", "P3", "P3", "P4", "P5", "P6", "P6"]
# answers per step; None: a failed row (step 2: an unmapped answer; step 3: an image never sent)
STEP_PREDS = [[0, 1, 2, 1, 0, 1, 2, 0, 0],
              [0, 0, None, 1, 1, 1, 2, 2, 0],
              [0, 0, 0, 1, None, 0, 2, 2, 2]]
SYNONYMS = {0: ["TED", "  graves ORBITOPATHY ", "Thyroid eye disease."],
            1: ["orbital pseudotumour", "Orbital Inflammation"], 2: ["orbital neoplasm", "TUMOUR"]}
LABEL_MAP = {"thyroid eye disease": ["TED", "Graves orbitopathy"],
             "orbital inflammation": ["orbital pseudotumour"],
             "orbital tumour": ["orbital neoplasm", "tumour"]}
STEPS = ["image", "image+demographics", "image+demographics+symptoms"]


def image_paths():
    return [f"{ORDER[label]}/{PATIENTS[i]}_{i}.png" for i, label in enumerate(TRUE)]


@pytest.fixture
def answers(tmp_path):
    """The cohort (files need not be images: answers are scored, images are not read), three
    answer files (rows shuffled, answers in synonyms and odd case) and the label map."""
    cohort = tmp_path / "subtypes"
    for path in image_paths():
        (cohort / path).parent.mkdir(parents=True, exist_ok=True)
        (cohort / path).write_bytes(b"not read")
    files = []
    for s, preds in enumerate(STEP_PREDS):
        rows = []
        for i, (path, pred) in enumerate(zip(image_paths(), preds)):
            if pred is None and s == 1:
                rows.append([path, "I cannot determine the subtype", "ok"])
            elif pred is None:
                rows.append([path, "", "failed: image missing (never sent to the model)"])
            else:
                rows.append([path, SYNONYMS[pred][(i + s) % len(SYNONYMS[pred])], "ok"])
        files.append(tmp_path / f"step{s + 1}.csv")
        write_csv(files[-1], ["path", "answer", "status"], rows[::-1])  # another order than the cohort's
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps(LABEL_MAP), encoding="utf-8")
    return cohort, files, label_map


def run_steps(cohort, files, label_map, out, *extra):
    argv = ["--test-dir", str(cohort), "--predictions", f"{STEPS[0]}={files[0]}",
            "--compare", f"{STEPS[1]}={files[1]}", f"{STEPS[2]}={files[2]}",
            "--label-map", str(label_map), "--classes", ",".join(ORDER), "--output-dir", str(out),
            "--bootstrap", "200", "--no-figures", *extra]
    return inference.main(argv)


def outcome_matrix(k, measure):
    """(images read at every step, 3) successes of class k's sensitivity or specificity."""
    complete = [i for i in range(9) if all(p[i] is not None for p in STEP_PREDS)]
    rows = []
    for i in complete:
        if (TRUE[i] == k) == (measure == "sensitivity"):
            rows.append([(p[i] == k) == (measure == "sensitivity") for p in STEP_PREDS])
    return np.array(rows, dtype=int)


def test_three_answer_files_give_the_hand_computed_sequential_table(answers, tmp_path):
    cohort, files, label_map = answers
    out = tmp_path / "out"
    assert run_steps(cohort, files, label_map, out, "--group-regex", r"^(P\d+)_") == 0
    # primary (intention-to-diagnose): every image, no class named = a miss (images 2 and 4)
    steps = pd.read_csv(out / "sequential.csv")
    sens = steps[steps["measure"] == "sensitivity"].set_index(["class", "step"])
    hand = {("thyroid eye disease", STEPS[0]): (1, 3), ("thyroid eye disease", STEPS[1]): (2, 3),
            ("thyroid eye disease", STEPS[2]): (3, 3), ("orbital inflammation", STEPS[0]): (2, 3),
            ("orbital inflammation", STEPS[1]): (3, 3), ("orbital inflammation", STEPS[2]): (1, 3),
            ("orbital tumour", STEPS[0]): (1, 3), ("orbital tumour", STEPS[1]): (2, 3),
            ("orbital tumour", STEPS[2]): (3, 3)}
    for key, (hits, n) in hand.items():
        assert (sens.loc[key, "hits"], sens.loc[key, "n"]) == (hits, n), key
        assert sens.loc[key, "ci_low"] == pytest.approx(metrics.wilson_interval(hits, n)[0])
    assert set(steps["analysis"]) == {"intention-to-diagnose"}
    itd = pd.read_csv(out / "sequential_changes.csv").set_index(["class", "measure", "to_step"])
    ted = itd.loc[("thyroid eye disease", "sensitivity", STEPS[1])]  # images 0-2: [1,0,0] -> [1,1,0]
    assert (ted["n"], ted["gained"], ted["lost"]) == (3, 1, 0)
    assert ted["difference"] == pytest.approx(1 / 3)
    # secondary (answered only): the 7 images answered at every step, in both tables
    steps = pd.read_csv(out / "sequential_answered.csv")
    sens = steps[steps["measure"] == "sensitivity"].set_index(["class", "step"])
    hand = {("thyroid eye disease", STEPS[0]): (1, 2), ("thyroid eye disease", STEPS[1]): (2, 2),
            ("orbital inflammation", STEPS[2]): (1, 2), ("orbital tumour", STEPS[1]): (2, 3)}
    for key, (hits, n) in hand.items():
        assert (sens.loc[key, "hits"], sens.loc[key, "n"]) == (hits, n), key
    changes = pd.read_csv(out / "sequential_answered_changes.csv")
    mc = changes[changes["test"].str.startswith("McNemar")].set_index(["class", "measure", "to_step"])
    ted = mc.loc[("thyroid eye disease", "sensitivity", STEPS[1])]  # images 0, 1: 1/2 -> 2/2
    assert (ted["n"], ted["difference"], ted["gained"], ted["lost"]) == (2, 0.5, 1, 0)
    infl = mc.loc[("orbital inflammation", "sensitivity", STEPS[2])]  # images 3, 5: 2/2 -> 1/2
    assert (infl["n"], infl["difference"], infl["gained"], infl["lost"]) == (2, -0.5, 0, 1)
    tumour = mc.loc[("orbital tumour", "sensitivity", STEPS[1])]  # images 6-8: [1,0,0] -> [1,1,0]
    assert tumour["p_exact"] == pytest.approx(mcnemar([[1, 0], [1, 1]], exact=True).pvalue)
    assert tumour["p_value"] == pytest.approx(0.5)  # mid-p: 2 * (P(0) - P(0)/2) with 1 discordant
    # with patients, Obuchowski's clustered test on the tumour images 6 (P5), 7 and 8 (P6)
    clustered = metrics.obuchowski_test([1, 1, 0], [1, 0, 0], ["P5", "P6", "P6"])
    assert clustered["p"] is not None and tumour["p_clustered"] == pytest.approx(clustered["p"])
    assert math.isnan(ted["p_clustered"])  # images 0 and 1 are one patient: no clustered test
    q = changes[changes["test"].str.startswith("Cochran")].set_index(["class", "measure"])
    for k, name in enumerate(ORDER):
        for measure in ("sensitivity", "specificity"):
            x = outcome_matrix(k, measure)
            row = q.loc[(name, measure)]
            assert row["n"] == len(x)
            if set(x.sum(axis=1)) <= {0, 3}:
                assert math.isnan(row["statistic"])  # no discordant image: undefined, not 0
                continue
            ref = cochrans_q(x)
            assert row["statistic"] == pytest.approx(ref.statistic), (name, measure)
            assert row["p_value"] == pytest.approx(ref.pvalue)
    assert q.loc[("thyroid eye disease", "sensitivity"), "statistic"] == pytest.approx(2.0)
    result = json.loads((out / "metrics.json").read_text())
    assert result["sequential"]["bootstrap_unit"] == "group"  # --group-regex reaches the steps
    assert (result["sequential"]["n_complete"], result["sequential_answered"]["n_complete"]) == (9, 7)


def test_each_step_is_scored_as_for_a_checkpoint_with_failed_rows_counted(answers, tmp_path):
    cohort, files, label_map = answers
    out = tmp_path / "out"
    assert run_steps(cohort, files, label_map, out) == 0
    first = json.loads((out / "metrics.json").read_text())
    assert (first["n"], first["n_received"], first["n_failed"]) == (9, 9, 0)
    assert first["confusion_matrix"] == [[1, 1, 1], [1, 2, 0], [2, 0, 1]]
    assert first["accuracy"] == pytest.approx(4 / 9) and first["accuracy_ci"] is not None
    assert first["per_class"]["thyroid eye disease"]["sensitivity"] == pytest.approx(1 / 3)
    assert first["macro_auroc"] is None and first["per_class"]["orbital tumour"]["auroc"] is None
    assert first["class_folders"] == ORDER and first["rare_class"] == "thyroid eye disease"
    second = json.loads((out / "step2_image+demographics" / "metrics.json").read_text())
    assert (second["n"], second["n_failed"]) == (8, 1)
    assert second["flow"]["reasons"] == {"unmapped answer": {ORDER[0]: 1, ORDER[1]: 0, ORDER[2]: 0}}
    # intention to diagnose: the unmapped answer counts as a miss of TED (2 of 3, not 2 of 2)
    assert second["itd_rare_sensitivity"] == pytest.approx(2 / 3)
    assert second["per_class"]["thyroid eye disease"]["sensitivity"] == pytest.approx(1.0)
    preds = pd.read_csv(out / "step2_image+demographics" / "predictions.csv", keep_default_na=False)
    # no fake probabilities; the decision (`prediction`) of an answer file is its answer
    assert list(preds.columns) == ["path", "true_label", "pred_label", "prediction", "status"]
    assert preds["prediction"].tolist() == preds["pred_label"].tolist()
    assert preds["path"].tolist() == sorted(image_paths())  # by path, not the file's order
    assert preds.set_index("path").loc[image_paths()[2], "status"] == "failed: unmapped answer 'I cannot determine the subtype'"
    third = json.loads((out / "step3_image+demographics+symptoms" / "metrics.json").read_text())
    assert third["flow"]["reasons"] == {"image missing": {ORDER[0]: 0, ORDER[1]: 1, ORDER[2]: 0}}
    cm = pd.read_csv(out / "step3_image+demographics+symptoms" / "confusion_matrix.csv")
    assert cm[ORDER].to_numpy().tolist() == [[3, 0, 0], [1, 1, 0], [0, 0, 3]]
    report = (out / "report.md").read_text()
    assert "## Sequential readings" in report and "| 2.00, df 2 (0.368) |" in report
    assert "no model was run here" in report and "the 7 of 9 images read at every step" in report


def test_probabilities_in_an_answer_file_give_auroc_and_sorted_class_order(answers, tmp_path):
    cohort, _files, _map = answers
    sorted_order = sorted(ORDER)  # no --classes: by name
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=9)
    pred = probs.argmax(axis=1)
    path = write_csv(tmp_path / "probs.csv", ["path", "pred_label", *(f"prob_{c}" for c in sorted_order)],
                     [[p, sorted_order[k], *row] for p, row, k in zip(image_paths(), probs, pred)])
    out = tmp_path / "out"
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(path), "--output-dir",
                           str(out), "--bootstrap", "0", "--no-figures"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    y = np.array([sorted_order.index(ORDER[t]) for t in TRUE])
    for k, name in enumerate(sorted_order):
        assert result["per_class"][name]["auroc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    assert result["class_folders"] == sorted_order and result["step"] == "probs"
    assert result["brier"] is not None and "sequential" not in result


def test_answer_paths_that_do_not_match_the_cohort_are_refused_naming_file_and_row(answers, tmp_path,
                                                                                  capsys):
    cohort, files, label_map = answers
    bad = tmp_path / "other_cohort.csv"
    rows = list(csv.reader(open(files[1], encoding="utf-8")))
    rows[1][0] = "orbital tumour/P9_99.png"  # first data row names an image the cohort lacks
    with open(bad, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    out = tmp_path / "out"
    before = tree_state(tmp_path)
    code = run_steps(cohort, [files[0], bad, files[2]], label_map, out)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    err = errors[0]
    assert err.startswith(f"error: --compare {STEPS[1]}= {bad}: row 2: image "
                          "'orbital tumour/P9_99.png' is not in the cohort")
    assert tree_state(tmp_path) == before  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--predictions", "{a}", "--checkpoint", "x.pt"],
     "give --checkpoint (a model to evaluate) or --predictions"),
    (["--checkpoint", "x.pt", "--label-map", "{m}"], "--label-map needs --predictions or --compare"),
    (["--checkpoint", "x.pt", "--classes", "a,b"], "--classes needs --predictions"),
    (["--predictions", "{a}", "--compare", "{b}"], ": expected NAME=FILE"),
    (["--predictions", "x={a}", "--compare", "x={b}"], "step name 'x' is used twice"),
    (["--predictions", "{a}", "--compare", "y={b}", "y={a}"], "the name 'y' is taken"),
    (["--predictions", "={a}"], "--predictions ={a}: the step NAME before '=' is empty"),
    (["--predictions", "{a}", "--compare", "={b}"], "expected NAME=FILE"),
    (["--predictions", "{a}", "--compare", "y=nowhere.csv"], "--compare y=nowhere.csv: no such file"),
    (["--predictions", "{a}", "--prompts", "{a}"], "--prompts needs a model (--checkpoint)"),
    (["--predictions", "{a}", "--threshold", "0.5"], "--threshold needs a model"),
    (["--predictions", "{a}", "--label-map", "missing.json"], "--label-map missing.json: no such file"),
    (["--predictions", "{a}", "--classes", "a,,b"], "--classes: 'a,,b': an empty item"),
])
def test_answer_flag_combinations_are_refused(answers, argv, message, capsys):
    cohort, files, label_map = answers
    argv = [arg.format(a=files[0], b=files[1], m=label_map) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        inference.parse_args(["--test-dir", str(cohort), *argv])
    assert exit_info.value.code == 2
    assert message.format(a=files[0]) in capsys.readouterr().err


def test_label_map_and_classes_refused_after_parsing_name_the_flag(answers, tmp_path, capsys):
    cohort, files, _map = answers
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"graves": ["TED"]}), encoding="utf-8")
    out = tmp_path / "out"
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(files[0]), "--label-map",
                           str(bad_map), "--output-dir", str(out)]) == 2
    assert f"--label-map {bad_map}: label map names 'graves'" in capsys.readouterr().err
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(files[0]), "--classes",
                           "thyroid eye disease,orbital tumour", "--output-dir", str(out)]) == 2
    assert "--classes must list each class folder once (missing ['orbital inflammation']" \
        in capsys.readouterr().err
    # without a label map a synonym is not a class: refused, never guessed
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(files[0]),
                           "--output-dir", str(out)]) == 2
    assert "is not a class of" in capsys.readouterr().err and not out.exists()


def test_shipped_demo_answer_files_are_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO_ROOT / "demo" / "make_subtype_demo.py"), "--out",
                    str(tmp_path / "cohort"), "--answers-dir", str(tmp_path / "answers")],
                   check=True, capture_output=True)
    for name in ("step1.csv", "step2.csv", "step3.csv", "label_map.json"):
        assert (tmp_path / "answers" / name).read_bytes() == \
            (REPO_ROOT / "demo" / "subtypes" / name).read_bytes(), name
    assert len(list((tmp_path / "cohort").rglob("*.jpg"))) == 36


@pytest.mark.slow
def test_docs_second_step_example_runs_as_written_and_gives_its_table(tmp_path):
    section = (REPO_ROOT / "docs" / "second-step.md").read_text(encoding="utf-8")
    block = section.split("\n```sh\n", 1)[1].split("\n```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    assert len(commands) == 2 and "--predictions image=demo/subtypes/step1.csv" in commands[1]
    for command in commands:  # the README's commands, demo_run/ moved into tmp_path
        command = command.strip().replace("demo_run/", f"{tmp_path}/")
        command = command.replace("python ", f"{sys.executable} ", 1)
        if not (REPO_ROOT / "score_answers.py").exists():  # until it lands: inference.py's answer mode
            command = command.replace(" score_answers.py ", " inference.py ", 1)
        done = subprocess.run(command, shell=True, cwd=REPO_ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "second_step" / "report.md").read_text(encoding="utf-8")
    rows = [line for line in section.splitlines()
            if line.startswith("| thyroid eye disease |") or line.startswith("| orbital ")]
    assert len(rows) == 3
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        q, p = cells[4].split(" (")
        assert (f"| {cells[0]} | sensitivity | {cells[1]} | {cells[2]} | {cells[3]} | "
                f"{q}, df 2 ({p} |") in report, cells[0]
    # the README's sentence on the thyroid change: the report's row
    import re
    change, low, high, gained, lost, exact, clustered = re.search(
        r"\+ symptoms: \+([0-9.]+) \(bootstrap CI ([0-9.]+)–([0-9.]+)\),\s+(\d+) gained, (\d+) lost, "
        r"McNemar exact p ([0-9.]+), Obuchowski p ([0-9.]+)", section).groups()
    assert re.search(rf"\| {re.escape(change)} \({low}–{high}\)( \[\d+\])? \| {gained} / {lost} \| ", report)
    assert f"({exact}) | {clustered} |" in report


def test_subgroups_of_an_answer_file_by_hand_without_auroc(answers, tmp_path):
    cohort, files, label_map = answers
    sexes = ["F", "F", "F", "F", "F", "M", "M", "M", "M"]
    metadata = write_csv(tmp_path / "metadata.csv", ["path", "sex"], zip(image_paths(), sexes))
    out = tmp_path / "out"
    assert run_steps(cohort, files, label_map, out, "--metadata", str(metadata), "--subgroups", "sex") == 0
    table = pd.read_csv(out / "subgroups.csv").set_index("level")
    # step 1: F images 0-4 right on 0 and 3 (2/5); M images 5-8 right on 5 and 6 (2/4)
    assert table.loc["F", "accuracy"] == pytest.approx(2 / 5) and table.loc["M", "n"] == 4
    assert table.loc["M", "accuracy"] == pytest.approx(2 / 4)
    assert table["macro_auroc"].isna().all()  # labels only: no AUROC
    # step 2 leaves out image 2 (unmapped): F right on 0, 1, 3, 4 of 4
    second = pd.read_csv(out / "step2_image+demographics" / "subgroups.csv").set_index("level")
    assert (second.loc["F", "n"], second.loc["F", "accuracy"]) == (4, pytest.approx(1.0))


def test_probabilities_that_disagree_with_the_label_are_refused_naming_row_and_image(answers, tmp_path,
                                                                                  capsys):
    cohort, _files, _map = answers
    # images 1 and 4: label TED, most probable tumour; rows in reverse, so image 4 comes first,
    # on row 6 (the header is row 1), and image 1 on row 9: the message names the first in the file
    rows = [[p, ORDER[0], *([0.1, 0.1, 0.8] if i in (1, 4) else [0.8, 0.1, 0.1])]
            for i, p in enumerate(image_paths())]
    path = write_csv(tmp_path / "disagree.csv", ["path", "pred_label", *(f"prob_{c}" for c in ORDER)],
                     rows[::-1])
    out = tmp_path / "out"
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(path), "--output-dir",
                           str(out)]) == 2
    assert (f"--predictions {path}: row 6: image '{image_paths()[4]}': its pred_label is not its "
            "most probable class") in capsys.readouterr().err
    assert not out.exists()


def test_label_map_also_maps_compare_answers_against_a_checkpoint(answers):
    import argparse
    cohort_dir, files, label_map = answers
    cohort = evaluation.Cohort(sorted((p, ORDER.index(p.parent.name)) for p in cohort_dir.rglob("*.png")),
                               True, cohort_dir)
    args = argparse.Namespace(compare=[f"mllm={files[1]}"], label_map=str(label_map))
    read = answer_files.read_compared(args, cohort, ORDER)["mllm"]
    order = cohort.relative_paths()
    expected = dict(zip(image_paths(), [0, 0, -1, 1, 1, 1, 2, 2, 0]))
    assert read.pred_index.tolist() == [expected[p] for p in order]
    assert read.statuses[order.index(image_paths()[2])] == \
        "failed: unmapped answer 'I cannot determine the subtype'"


def test_an_answer_file_with_no_scorable_answer_exits_1_after_writing_its_flow(answers, tmp_path,
                                                                              capsys):
    cohort, _files, label_map = answers
    path = write_csv(tmp_path / "refusals.csv", ["path", "answer"],
                     ([p, "I cannot determine"] for p in image_paths()))
    out = tmp_path / "out"
    assert inference.main(["--test-dir", str(cohort), "--predictions", str(path), "--label-map",
                           str(label_map), "--output-dir", str(out)]) == 1
    assert f"no answer of {path} could be scored" in capsys.readouterr().err
    result = json.loads((out / "metrics.json").read_text())
    assert (result["n"], result["n_failed"], result["itd_accuracy"]) == (0, 9, 0.0)
    assert "No answer named a class" in (out / "report.md").read_text()


def test_report_of_answers_words_the_intention_to_diagnose_line_for_answers(answers, tmp_path):
    cohort, files, label_map = answers
    out = tmp_path / "out"
    assert run_steps(cohort, files, label_map, out) == 0
    text = (out / "step2_image+demographics" / "report.md").read_text()
    # 9 received, the unmapped answer a miss: 7 right of 9 (all but images 2 and 8); TED 2 of 3
    assert ("Intention-to-diagnose (answers naming no class (an outcome outside the options, unmapped, failed) counted as errors, n = 9; Wilson "
            "intervals, images): the answers: "
            "accuracy 0.778 (") in text
    assert "thyroid eye disease sensitivity 0.667 (" in text


def output_bytes(folder):
    """{relative path: bytes} of every output file but args.json (which records its own argv)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "args.json"}


def test_score_answers_and_the_deprecated_inference_spelling_write_the_same_bytes(answers, tmp_path, capsys):
    cohort, files, label_map = answers
    old, new = tmp_path / "old", tmp_path / "new"
    assert run_steps(cohort, files, label_map, old, "--group-regex", r"^(P\d+)_") == 0
    warning = capsys.readouterr().err
    assert f"warning: {answer_files.DEPRECATED_ANSWER_MODE}" in warning.splitlines()
    argv = ["--test-dir", str(cohort), "--predictions", f"{STEPS[0]}={files[0]}",
            "--compare", f"{STEPS[1]}={files[1]}", f"{STEPS[2]}={files[2]}",
            "--label-map", str(label_map), "--classes", *ORDER, "--out-dir", str(new),
            "--bootstrap", "200", "--no-figures", "--group-regex", r"^(P\d+)_"]
    assert answer_files.main(argv) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert output_bytes(new) == output_bytes(old) and (new / "sequential.csv").is_file()


@pytest.mark.parametrize("flag", ["--checkpoint", "--prompts", "--threshold", "--cache-dir"])
def test_score_answers_has_no_model_flags(answers, flag, capsys):
    cohort, files, _label_map = answers
    with pytest.raises(SystemExit) as exit_info:
        answer_files.main(["--test-dir", str(cohort), "--predictions", str(files[0]), flag, "x"])
    assert exit_info.value.code == 2 and f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.slow
def test_score_answers_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "score_answers.py"), "--help"],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--predictions" in done.stdout and "--checkpoint " not in done.stdout

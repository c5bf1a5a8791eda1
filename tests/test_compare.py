"""--compare and --baseline (paired comparison), the external-predictions reader, DeLong's test,
the clustered McNemar test and the subgroup analysis: known answers and independent
recomputations (scikit-learn, scipy, statsmodels, explicit loops)."""

import csv

import numpy as np
import pytest

import inference

FOLDERS = ["orbital disease", "healthy eyes", "non-orbital disease"]
PATHS = ["orbital disease/a.png", "healthy eyes/b.png", "healthy eyes/c.png",
         "non-orbital disease/d.png"]
TRUE = ["orbital disease", "healthy eyes", "healthy eyes", "non-orbital disease"]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- the reader -----------------------------------------------------------------------------------

def test_reader_matches_paths_to_the_cohort_order_and_maps_probabilities_by_name(tmp_path):
    # rows in another order, prob columns in another class order, Windows separators
    rows = [["non-orbital disease\\d.png", "non-orbital disease", 0.1, 0.7, 0.2, "ok"],
            ["./orbital disease/a.png", " Orbital Disease ", 0.2, 0.1, 0.7, "ok"],
            ["healthy eyes/c.png", "", "", "", "", "failed: truncated image"],
            ["healthy eyes/b.png", "healthy eyes", 1.0, 0.0, 0.0, "ok"]]
    path = write_csv(tmp_path / "p.csv", ["path", "pred_label", "prob_healthy eyes",
                                          "prob_non-orbital disease", "prob_orbital disease", "status"], rows)
    result = inference.read_external_predictions(path, PATHS, FOLDERS)
    assert result.paths == PATHS
    assert result.pred_index.tolist() == [0, 1, -1, 2]
    assert result.statuses == ["ok", "ok", "failed: truncated image", "ok"]
    np.testing.assert_allclose(result.probs[0], [0.7, 0.2, 0.1])  # orbital, healthy, non-orbital
    np.testing.assert_allclose(result.probs[3], [0.2, 0.1, 0.7])
    np.testing.assert_allclose(result.probs[1], [0.0, 1.0, 0.0])
    assert np.isnan(result.probs[2]).all()
    assert result.answer_column == "pred_label"


def test_reader_without_probabilities_and_with_an_answer_column(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["answer", "path"],
                     [["orbital disease", p] for p in PATHS])
    result = inference.read_external_predictions(path, PATHS, FOLDERS)
    assert result.probs is None and result.answer_column == "answer"
    assert result.pred_index.tolist() == [0, 0, 0, 0]


def test_label_map_turns_unmapped_empty_and_refused_answers_into_failed_rows(tmp_path):
    answers = ["Orbital  CELLULITIS", "I cannot answer that", "", "normal"]
    path = write_csv(tmp_path / "p.csv", ["path", "answer"], list(zip(PATHS, answers)))
    label_map = {"orbital disease": ["orbital cellulitis", "thyroid eye disease"],
                 "healthy eyes": ["Normal", "no disease"]}
    result = inference.read_external_predictions(path, PATHS, FOLDERS, label_map=label_map)
    assert result.pred_index.tolist() == [0, -1, -1, 1]
    assert result.statuses == ["ok", "failed: unmapped answer 'I cannot answer that'",
                               "failed: unmapped answer ''", "ok"]


@pytest.mark.parametrize("header, rows, label_map, expected", [
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS[:3]], None,
     "no row for image 'non-orbital disease/d.png'"),
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS] + [["x/e.png", "healthy eyes"]],
     None, "row 6: image 'x/e.png' is not in the cohort"),
    (["path", "pred_label"], [[p, "healthy eyes"] for p in PATHS[:2]] + [[PATHS[0], "healthy eyes"]],
     None, "row 4: image 'orbital disease/a.png' already on row 2"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], "glaucoma"]], None,
     "row 3: pred_label 'glaucoma' is not a class"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], ""]], None,
     "row 3: pred_label '' is not a class"),
    (["path", "pred_label"], [[PATHS[0], "healthy eyes"], [PATHS[1], "healthy eyes", "x"]], None,
     "row 3: 3 fields, the header has 2"),
    (["path", "label"], [[p, "healthy eyes"] for p in PATHS], None,
     "row 1: needs a 'path' and a 'pred_label' (or 'answer') column"),
    (["path", "pred_label", "prob_orbital disease"], [[p, "healthy eyes", 0.5] for p in PATHS], None,
     "row 1: has prob_ columns but lacks 'prob_healthy eyes'"),
    (["path", "pred_label", "prob_glaucoma"], [[p, "healthy eyes", 0.5] for p in PATHS], None,
     "row 1: column 'prob_glaucoma' is not a class"),
    (["path", "pred_label", "prob_orbital disease", "prob_healthy eyes", "prob_non-orbital disease"],
     [[PATHS[0], "healthy eyes", 0.1, 0.8, 0.1], [PATHS[1], "healthy eyes", 0.1, "high", 0.1]], None,
     "row 3: probabilities"),
    (["path", "pred_label", "true_label"], [[PATHS[0], "healthy eyes", "healthy eyes"]], None,
     "row 2: true_label 'healthy eyes' of 'orbital disease/a.png' differs"),
    (["path", "pred_label"], [], None, "row 2: no data rows"),
    (["path", "answer"], [[PATHS[0], "x"]], {"glaucoma": ["g"]}, "label map names 'glaucoma'"),
])
def test_reader_refusals_name_the_flag_file_and_first_offending_row(tmp_path, header, rows,
                                                                    label_map, expected):
    path = write_csv(tmp_path / "p.csv", header, rows)
    with pytest.raises(ValueError) as info:
        inference.read_external_predictions(path, PATHS, FOLDERS, "--compare cnn=", label_map,
                                            true_labels=TRUE)
    message = str(info.value)
    assert message.startswith(f"--compare cnn= {path}: ") and "\n" not in message
    assert expected in message


def test_reader_refuses_an_empty_and_a_binary_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81\x82path")
    for path, expected in ((empty, "row 1: empty file"), (binary, "not a readable UTF-8 CSV")):
        with pytest.raises(ValueError, match=expected):
            inference.read_external_predictions(path, PATHS, FOLDERS)

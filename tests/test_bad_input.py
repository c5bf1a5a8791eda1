"""Bad input to every flag of the three scripts, in one table: each row exits with status 2, prints
one error line naming the flag or the path, and writes nothing (the whole tmp tree, inputs
included, is the same file for file, size for size and mtime for mtime before and after; an output
folder that did not exist is not created, and an existing one is left as it was).

Each row is a script and the flags appended to a valid base command (argparse keeps the last value
of a repeated flag, so a row overrides the base by repeating it); {placeholders} name the inputs."""

import json
import shutil

import pytest
import torch

from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip.split import cli as data_preprocess
from orbital_clip import scoring as inference
from demo import make_demo_cohort
from conftest import TINY_CONFIG, tree_state

SCRIPTS = {"data_preprocess": data_preprocess, "clip_train": train_cli, "inference": inference}
BASE_ARGV = {
    "data_preprocess": ["--data-root", "{cohort}", "--out-dir", "{out}", "--workers", "1", "--no-progress"],
    "clip_train": ["--train-dir", "{cohort}", "--val-dir", "{val}", "--out-dir", "{out}",
                   "--model-config", "{tiny_config}", "--lr", "1e-3", "--batch-size", "4",
                   "--epochs", "1", "--workers", "0", "--no-progress"],
    "inference": ["--test-dir", "{cohort}", "--checkpoint", "{best}", "--output-dir", "{out}",
                  "--workers", "0", "--bootstrap", "0", "--no-progress", "--no-figures"],
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Inputs written once: cohorts (labelled, empty, with an unknown class folder), a second
    architecture 'mini_clip', and the checkpoints of a real one-epoch tiny_clip run."""
    root = tmp_path_factory.mktemp("bad_input_inputs")
    make_demo_cohort.write_cohort(root / "cohort", (4, 4, 4), 0)
    make_demo_cohort.write_cohort(root / "unknown", (1, 1, 1), 1)
    (root / "unknown" / "cataract").mkdir()
    first_image = sorted((root / "cohort" / "healthy eyes").iterdir())[0]
    shutil.copy(first_image, root / "unknown" / "cataract" / "a.jpg")
    (root / "empty").mkdir()
    mini = json.loads(TINY_CONFIG.read_text())
    mini["embed_dim"], mini["vision_cfg"]["width"], mini["text_cfg"]["width"] = 32, 32, 32
    (root / "mini_clip.json").write_text(json.dumps(mini))
    run = root / "run"
    make_demo_cohort.write_cohort(root / "val", (2, 2, 2), 2)  # validation never holds training images
    assert train_cli.main(["--train-dir", str(root / "cohort"), "--val-dir", str(root / "val"),
                            "--save-dir", str(run), "--model-config", str(TINY_CONFIG), "--lr", "1e-3",
                            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress"]) == 0
    best = run / train_checkpoints.BEST_NAME
    torch.save(torch.load(best, weights_only=True)["state_dict"], root / "plain.pt")
    return {"root": root, "cohort": root / "cohort", "val": root / "val", "unknown": root / "unknown", "empty": root / "empty",
            "mini_config": root / "mini_clip.json", "tiny_config": TINY_CONFIG, "best": best,
            "last": run / train_checkpoints.LAST_NAME, "plain": root / "plain.pt"}


@pytest.fixture
def paths(shared, tmp_path, monkeypatch):
    """Placeholder -> path: the shared inputs plus this row's own folders and files."""
    monkeypatch.chdir(tmp_path)  # a relative default output would land inside the snapshot
    used = tmp_path / "used"  # a non-empty folder of an earlier run
    used.mkdir()
    (used / "notes.txt").write_text("an earlier run")
    earlier = tmp_path / "earlier_split"  # an earlier data_preprocess split
    (earlier / "train" / "healthy eyes").mkdir(parents=True)
    shutil.copy(sorted((shared["cohort"] / "healthy eyes").iterdir())[0], earlier / "train" / "healthy eyes")
    (earlier / "manifest.csv").write_text("path,label,split\n")
    (tmp_path / "a_file.txt").write_text("a file, not a folder")
    return {**{k: str(v) for k, v in shared.items()}, "tmp": str(tmp_path), "out": str(tmp_path / "out"),
            "used": str(used), "earlier": str(earlier), "file": str(tmp_path / "a_file.txt"),
            "missing": str(tmp_path / "nowhere"), "missing_pt": str(tmp_path / "nowhere.pt"),
            "missing_json": str(tmp_path / "nowhere.json")}


def row(script, extra, *expected, id):
    """A table row: `extra` flags after the script's base argv; `expected` substrings of the error."""
    return pytest.param(script, extra, 2, expected, id=f"{script} {id}")


DP, CT, INF = "data_preprocess", "clip_train", "inference"
ROWS = [
    # -- data_preprocess.py ------------------------------------------------------------------------
    row(DP, ["--val-ratio", "-0.1"], "--val-ratio", id="val-ratio -0.1"),
    row(DP, ["--val-ratio", "1.0"], "--val-ratio", id="val-ratio 1.0"),
    row(DP, ["--val-ratio", "1.5"], "--val-ratio", id="val-ratio 1.5"),
    row(DP, ["--val-ratio", "nan"], "--val-ratio", id="val-ratio nan"),
    row(DP, ["--test-ratio", "-0.2"], "--test-ratio", id="test-ratio -0.2"),
    row(DP, ["--test-ratio", "1.0"], "--test-ratio", id="test-ratio 1.0"),
    row(DP, ["--val-ratio", "0.6", "--test-ratio", "0.4"], "--val-ratio", "--test-ratio", id="ratios sum to 1"),
    row(DP, ["--folds", "1"], "--folds", id="folds 1"),
    row(DP, ["--folds", "3", "--val-ratio", "0.2"], "--folds", "--val-ratio", id="folds with val-ratio"),
    row(DP, ["--threads", "0"], "--threads", id="threads 0"),
    row(DP, ["--threads", "-1"], "--threads", id="threads -1"),
    row(DP, ["--seed", "abc"], "--seed", id="seed not a number"),
    row(DP, ["--mode", "teleport"], "--mode", id="mode unknown"),
    row(DP, ["--near-dup-distance", "33"], "--near-dup-distance", id="near-dup-distance 33"),
    row(DP, ["--near-dup-distance", "-1"], "--near-dup-distance", id="near-dup-distance -1"),
    row(DP, ["--resize-px", "8"], "--resize-px", id="resize-px 8"),
    row(DP, ["--resize-px", "64", "--mode", "symlink"], "--resize-px", id="resize-px without copy"),
    row(DP, ["--group-regex", r"P\d+"], "--group-regex", id="group-regex without a group"),
    row(DP, ["--group-regex", "(unclosed"], "--group-regex", id="group-regex invalid"),
    row(DP, ["--groups", "{missing_json}"], "--groups", "{missing_json}", id="groups missing file"),
    row(DP, ["--prompts", "{missing_json}"], "--prompts", "{missing_json}", id="prompts missing file"),
    row(DP, ["--rollback", "--overwrite"], "--rollback", id="rollback with overwrite"),
    row(DP, ["--rollback"], "--rollback", "{out}", id="rollback without a move run"),
    row(DP, ["--data-root", "{missing}"], "--data-root", "{missing}", id="data-root missing"),
    row(DP, ["--data-root", "{empty}"], "--data-root", "{empty}", id="data-root empty"),
    row(DP, ["--data-root", "{unknown}"], "--data-root", "cataract", id="data-root unknown class folder"),
    row(DP, ["--out-dir", "{earlier}"], "--out-dir", "{earlier}", id="out-dir holds an earlier split"),
    row(DP, ["--out-dir", "{file}"], "--out-dir", "{file}", id="out-dir is a file"),
    row(DP, ["--group-from-folder"], "--group-from-folder", "grouped none", id="group-from-folder without sub-folders"),
    row(DP, ["--group-regex", r"(Q\d+)"], "--group-regex", "grouped none", id="group-regex matching nothing"),
    row(DP, ["--exclude-folders", "healthy eyes"], "--exclude-folders", "class folder", id="exclude-folders a class"),
    row(DP, ["--labels", "{missing_json}"], "--labels", "{missing_json}", id="labels missing file"),
    row(DP, ["--labels", "{file}"], "--path-col", "'path'", id="labels without the path column"),
    row(DP, ["--path-col", "filename"], "--path-col", "--labels", id="path-col without labels"),
    row(DP, ["--group-col", "patient"], "--group-col", "--labels", id="group-col without labels"),
    row(DP, ["--labels", "{file}", "--exclude-folders", "x"], "--exclude-folders", id="exclude-folders with labels"),
    # -- clip_train.py -----------------------------------------------------------------------------
    row(CT, ["--batch-size", "1"], "--batch-size", id="batch-size 1"),
    row(CT, ["--batch-size", "0"], "--batch-size", id="batch-size 0"),
    row(CT, ["--batch-size", "-4"], "--batch-size", id="batch-size -4"),
    row(CT, ["--epochs", "0"], "--epochs", id="epochs 0"),
    row(CT, ["--epochs", "-1"], "--epochs", id="epochs -1"),
    row(CT, ["--lr", "0"], "--lr", id="lr 0"),
    row(CT, ["--lr", "-1e-5"], "--lr", id="lr -1e-5"),
    row(CT, ["--lr", "nan"], "--lr", id="lr nan"),
    row(CT, ["--lr", "inf"], "--lr", id="lr inf"),
    row(CT, ["--weight-decay", "-0.1"], "--weight-decay", id="weight-decay -0.1"),
    row(CT, ["--weight-decay", "nan"], "--weight-decay", id="weight-decay nan"),
    row(CT, ["--workers", "-1"], "--workers", id="workers -1"),
    row(CT, ["--accum-steps", "0"], "--accum-steps", id="accum-steps 0"),
    row(CT, ["--accum-steps", "3"], "--accum-steps", id="accum-steps above batch/2"),
    row(CT, ["--target-sensitivity", "0"], "--target-sensitivity", id="target-sensitivity 0"),
    row(CT, ["--target-sensitivity", "1.5"], "--target-sensitivity", id="target-sensitivity 1.5"),
    row(CT, ["--target-sensitivity", "-0.5"], "--target-sensitivity", id="target-sensitivity -0.5"),
    row(CT, ["--patience", "-1"], "--patience", id="patience -1"),
    row(CT, ["--lock-image", "-1"], "--lock-image", id="lock-image -1"),
    row(CT, ["--wise-ft-alphas", "0,1.5"], "--wise-ft-alphas", id="wise-ft-alphas 1.5"),
    row(CT, ["--wise-ft-alphas", "-0.5,1"], "--wise-ft-alphas", id="wise-ft-alphas -0.5"),
    row(CT, ["--warmup", "150%"], "--warmup", id="warmup 150%"),
    row(CT, ["--dist-timeout", "0"], "--dist-timeout", id="dist-timeout 0"),
    row(CT, ["--dist-timeout", "nan"], "--dist-timeout", id="dist-timeout nan"),
    row(CT, ["--loss", "hinge"], "--loss", id="loss unknown"),
    row(CT, ["--ssa", "lr"], "--ssa", id="ssa without values"),
    row(CT, ["--fold", "0"], "--fold", id="fold without a manifest"),
    row(CT, ["--ssa", "lr=1e-3,1e-4", "--train-dir", "{empty}"], "--train-dir", "{empty}",
        id="ssa with an empty train-dir"),
    row(CT, ["--ssa", "lr=-1,1e-3"], "--lr", id="ssa with a value its flag refuses"),
    row(CT, ["--precision", "fp16"], "--precision", id="precision fp16 on cpu"),
    row(CT, ["--device", "cuda"], "--device", id="device cuda without cuda"),
    row(CT, ["--train-dir", "{missing}"], "--train-dir", "{missing}", id="train-dir missing"),
    row(CT, ["--val-dir", "{missing}"], "--val-dir", "{missing}", id="val-dir missing"),
    row(CT, ["--train-dir", "{empty}"], "--train-dir", "{empty}", id="train-dir empty"),
    row(CT, ["--val-dir", "{empty}"], "--val-dir", "{empty}", id="val-dir empty"),
    row(CT, ["--train-dir", "{unknown}"], "--train-dir", "cataract", id="train-dir unknown class folder"),
    row(CT, ["--out-dir", "{used}"], "--out-dir", "{used}", id="out-dir not empty"),
    row(CT, ["--out-dir", "{file}"], "--out-dir", "{file}", id="out-dir is a file"),
    row(CT, ["--model-config", "{missing_json}"], "--model-config", id="model-config missing"),
    row(CT, ["--model-name", "ViT-B-32"], "--model-name", "ViT-B-32", "tiny_clip", id="model-name not the config's"),
    row(CT, ["--prompts", "{missing_json}"], "--prompts", id="prompts missing"),
    row(CT, ["--pretrained", "{missing_pt}"], "--pretrained", "{missing_pt}", id="pretrained missing file"),
    row(CT, ["--pretrained", "{best}", "--model-config", "{mini_config}"], "--pretrained", "tiny_clip",
        "mini_clip", id="pretrained of another architecture"),
    row(CT, ["--resume", "{missing_pt}"], "--resume", "{missing_pt}", id="resume missing file"),
    row(CT, ["--resume", "{best}"], "--resume", "{best}", id="resume a checkpoint that is not resumable"),
    row(CT, ["--resume", "{last}", "--model-config", "{mini_config}"], "--resume", "tiny_clip", "mini_clip",
        id="resume of another architecture"),
    # -- inference.py ------------------------------------------------------------------------------
    row(INF, ["--batch-size", "0"], "--batch-size", id="batch-size 0"),
    row(INF, ["--workers", "-1"], "--workers", id="workers -1"),
    row(INF, ["--bootstrap", "-1"], "--bootstrap", id="bootstrap -1"),
    row(INF, ["--ece-bins", "1"], "--ece-bins", id="ece-bins 1"),
    row(INF, ["--threshold", "1.5"], "--threshold", id="threshold 1.5"),
    row(INF, ["--threshold", "-0.1"], "--threshold", id="threshold -0.1"),
    row(INF, ["--threshold", "nan"], "--threshold", id="threshold nan"),
    row(INF, ["--wise-ft-alpha", "0.5", "1.2"], "--wise-ft-alpha", id="wise-ft-alpha 1.2"),
    row(INF, ["--wise-ft-alpha", "-0.1"], "--wise-ft-alpha", id="wise-ft-alpha -0.1"),
    row(INF, ["--wise-ft-alpha", "0.5", "0.5"], "--wise-ft-alpha", id="wise-ft-alpha twice"),
    row(INF, ["--wise-ft-base", "{plain}"], "--wise-ft-base", id="wise-ft-base without alpha"),
    row(INF, ["--wise-ft-alpha", "0.5", "--wise-ft-base", "{missing_pt}"], "--wise-ft-base",
        "{missing_pt}", id="wise-ft-base missing file"),
    row(INF, ["--wise-ft-alpha", "0.5", "--wise-ft-base", "{plain}", "--model-config", "{mini_config}"],
        "tiny_clip", "mini_clip", id="wise-ft with a model of another architecture"),
    row(INF, ["--precision", "fp8"], "--precision", id="precision unknown"),
    row(INF, ["--precision", "fp16"], "--precision", id="precision fp16 on cpu"),
    row(INF, ["--device", "cuda"], "--device", id="device cuda without cuda"),
    row(INF, ["--test-dir", "{missing}"], "--test-dir", "{missing}", id="test-dir missing"),
    row(INF, ["--test-dir", "{empty}"], "--test-dir", "{empty}", id="test-dir empty"),
    row(INF, ["--test-dir", "{unknown}"], "--test-dir", "{unknown}", "cataract", id="test-dir unknown class folder"),
    row(INF, ["--test-dir", "{file}"], "--test-dir", "{file}", id="test-dir a file, not a manifest"),
    row(INF, ["--split", "val"], "--split", id="split without a manifest"),
    row(INF, ["--checkpoint", "{missing_pt}"], "--checkpoint", "{missing_pt}", id="checkpoint missing file"),
    row(INF, ["--checkpoint", "{empty}"], "--checkpoint", "{empty}", id="checkpoint is a folder"),
    row(INF, ["--checkpoint", "no_such_tag", "--model-name", "tiny_clip"], "--checkpoint", "no_such_tag",
        id="checkpoint neither file nor tag"),
    row(INF, ["--checkpoint", "{plain}"], "--model-name", id="plain state_dict without model-name"),
    row(INF, ["--model-config", "{mini_config}"], "--model-name", "tiny_clip", "mini_clip",
        id="checkpoint of another architecture"),
    row(INF, ["--checkpoint", "{plain}", "--model-config", "{mini_config}"], "{plain}", "mini_clip",
        id="plain state_dict of another architecture"),
    row(INF, ["--model-config", "{missing_json}"], "--model-config", id="model-config missing"),
    row(INF, ["--prompts", "{missing_json}"], "--prompts", id="prompts missing"),
    row(INF, ["--baseline", "{missing_pt}"], "--baseline", "{missing_pt}", id="baseline missing file"),
    row(INF, ["--baseline-model-name", "tiny_clip"], "--baseline-model-name", id="baseline-model-name alone"),
    row(INF, ["--output-dir", "{used}"], "--output-dir", "{used}", id="output-dir not empty"),
    row(INF, ["--output-dir", "{file}"], "--output-dir", "{file}", id="output-dir is a file"),
    row(INF, ["--cache-dir", "{file}"], "--cache-dir", id="cache-dir is a file"),
    row(INF, ["--anonymize-salt", "x"], "--anonymize-salt", id="anonymize-salt alone"),
    row(INF, ["--group-regex", "(unclosed"], "--group-regex", id="group-regex invalid"),
    row(INF, ["--group-regex", r"P\d+"], "--group-regex", id="group-regex without a group"),
]


@pytest.mark.parametrize("script, extra, status, expected", ROWS)
def test_bad_input_exits_2_names_the_flag_and_writes_nothing(script, extra, status, expected, paths,
                                                              capsys):
    argv = [arg.format(**paths) for arg in BASE_ARGV[script] + extra]
    roots = (paths["tmp"], paths["root"])
    before = tree_state(*roots)
    capsys.readouterr()
    try:
        code = SCRIPTS[script].main(argv)
    except SystemExit as exit_info:  # argparse
        code = exit_info.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert code == status, err
    (line,) = [line for line in err.splitlines() if "error: " in line]
    for text in expected:
        assert text.format(**paths) in line, line
    assert tree_state(*roots) == before

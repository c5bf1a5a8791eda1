"""clip_train.py options in combination: resume (with workers, of a finished or early-stopped
run), failed rows, loss precision, WiSE-FT with every selection metric, --compile, SSA factors,
and an all-pairs covering array of the training options."""

import math
import shutil

import open_clip
import pandas as pd
import pytest
import torch

from orbital_clip.train import checkpoints as train_checkpoints
from orbital_clip.train import cli as train_cli
from orbital_clip.train import loop as train_loop
from orbital_clip.train import losses as train_losses
from orbital_clip.train import options as train_options
from orbital_clip.train import runner as train_runner
from orbital_clip.train import state as train_state
from orbital_clip import checkpoint as ckpt
from orbital_clip import cli
from orbital_clip import model_loading
from orbital_clip import models
from orbital_clip import outputs
from orbital_clip import prompts
from conftest import train_argv


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def final_weights(save_dir):
    return torch.load(save_dir / train_checkpoints.FINAL_NAME, weights_only=True)["state_dict"]


# -- resume ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_with_two_workers_equals_a_straight_run(splits, tmp_path):
    # Workers draw augmentations (random resized crops of the train transform) and the sampler
    # permutes: both must continue exactly after a resume. Balanced sampling draws from the
    # sampler's generator too.
    train_dir, val_dir = splits
    extra = ("--workers", "2", "--balanced-sampling")
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight", "--epochs", "3", *extra)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1", *extra)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "3",
                                      "--resume", "auto", *extra)) == 0
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-5), key
    one_epoch = torch.load(tmp_path / "split" / train_checkpoints.BEST_NAME, weights_only=True)
    assert one_epoch["epoch"] >= 1


@pytest.mark.slow
def test_resuming_a_finished_run_changes_no_file(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--wise-ft-alphas", "0,1")
    assert train_cli.main(argv) == 0
    before = file_bytes(save_dir)
    final = torch.load(save_dir / train_checkpoints.FINAL_NAME, weights_only=True)
    assert math.isfinite(final["temperature"]) and "accuracy" in final["metrics"]
    capsys.readouterr()
    assert train_cli.main(argv + ["--resume", "auto"]) == 0
    assert file_bytes(save_dir) == before
    err = capsys.readouterr().err
    assert "finished run" in err and "nothing to do" in err


@pytest.mark.slow
def test_resuming_an_early_stopped_run_trains_no_further(splits, tmp_path):
    # lr 1e-12 leaves the weights (and so the validation accuracy) unchanged: epoch 2 is not
    # strictly better, patience 1 stops the run there.
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "5", "--patience", "1", "--lr", "1e-12")
    assert train_cli.main(argv) == 0
    assert list(pd.read_csv(save_dir / "metrics.csv")["epoch"]) == [1, 2]
    last = torch.load(save_dir / train_checkpoints.LAST_NAME, weights_only=True)
    assert last["stopped"] is True and last["finished"] is True
    before = file_bytes(save_dir)
    assert train_cli.main(argv + ["--resume", "auto"]) == 0
    assert file_bytes(save_dir) == before


def test_rng_snapshot_restores_python_random_and_every_rank_its_own(splits, tmp_path):
    from types import SimpleNamespace
    ctx = {"args": SimpleNamespace(world_size=2, rank=1), "caption_rng": prompts.new_rng(5),
           "generator": torch.Generator().manual_seed(3)}
    import random
    random.seed(11)
    rank0 = train_state.rng_snapshot(ctx)
    ctx["caption_rng"].random()
    random.random()
    rank1 = train_state.rng_snapshot(ctx)
    expected_python, expected_caption = random.random(), ctx["caption_rng"].random()
    random.seed(0)
    ctx["caption_rng"] = prompts.new_rng(99)
    train_state.restore_rng([rank0, rank1], ctx)  # rank 1 takes the second snapshot
    assert (random.random(), ctx["caption_rng"].random()) == (expected_python, expected_caption)


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    monkeypatch.setattr(outputs.os, "cpu_count", lambda: 16)
    assert cli.default_workers("cuda") == 8
    assert cli.default_workers("cuda", local_world_size=4) == 3
    assert cli.default_workers("cuda", local_world_size=16) == 0
    assert cli.default_workers("cpu", local_world_size=2) == 0


# -- WiSE-FT with every metric, its calibration; --compile ------------------------------------------

@pytest.mark.slow
def test_wise_ft_with_macro_f1_stores_the_chosen_alphas_threshold_and_temperature(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--select-metric",
                                      "macro_f1", "--wise-ft-alphas", "0,0.5,1")) == 0
    table = pd.read_csv(save_dir / "wise_ft_validation.csv")
    assert set(train_options.SELECT_METRICS) <= set(table.columns)  # every metric, not only some
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    wise = best["wise_ft"]
    row = table.set_index("alpha").loc[wise["chosen_alpha"]]
    assert row["macro_f1"] == table["macro_f1"].max()
    assert wise["chosen_calibration"]["threshold"] == pytest.approx(row["operating_threshold"])
    assert wise["chosen_calibration"]["temperature"] == pytest.approx(row["temperature"])
    at_one = table.set_index("alpha").loc[1.0]  # the weights stored are alpha 1's, so is the top level
    assert best["temperature"] == pytest.approx(at_one["temperature"], rel=1e-6)
    assert wise["calibration"]["0.0"]["temperature"] == pytest.approx(table.set_index("alpha").loc[0.0, "temperature"])


CUSTOM_TEXT_CONFIG = {  # a tiny CustomTextCLIP (the class SigLIP and HF-text models use)
    "embed_dim": 32, "custom_text": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.parametrize("custom_text", [False, True])
@pytest.mark.slow
def test_compile_in_place_keeps_clean_keys_for_wise_ft_and_custom_text(splits, tmp_path, monkeypatch,
                                                                        custom_text):
    import functools
    import json
    # Dynamo traces for real; the 'eager' backend skips inductor's C++ build (minutes on a CPU).
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    train_dir, val_dir = splits
    extra = []
    if custom_text:
        config = tmp_path / "tiny_custom_text.json"
        config.write_text(json.dumps(CUSTOM_TEXT_CONFIG))
        extra = ["--model-config", str(config)]
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--compile",
                                      "--wise-ft-alphas", "0,1", *extra)) == 0
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    assert not any("_orig_mod" in key for key in best["state_dict"])
    assert any(key.startswith("text.") for key in best["state_dict"]) == custom_text
    assert best["wise_ft"]["chosen_alpha"] in (0.0, 1.0)
    name = "tiny_custom_text" if custom_text else "tiny_clip"
    model = open_clip.create_model(name, pretrained=str(save_dir / train_checkpoints.BEST_NAME))
    assert torch.equal(model.state_dict()["logit_scale"], best["state_dict"]["logit_scale"])


# -- SSA: on/off factors, a failing trial, refusal ----------------------------------------------------

@pytest.mark.slow
def test_ssa_sweeps_on_off_flags_and_records_a_trial_that_fails(splits, tmp_path, monkeypatch):
    import json
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    real_train = train_runner.train

    def out_of_memory_at_batch_16(args, *rest):
        if args.batch_size == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_train(args, *rest)

    monkeypatch.setattr(train_runner, "train", out_of_memory_at_batch_16)
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--batch-size", "8", "--grad-checkpointing",
                      "--ssa", "balanced-sampling=true,false", "--ssa", "grad-checkpointing=on,off",
                      "--ssa", "batch-size=16,8")
    assert train_cli.main(argv) == 0
    summary = pd.read_csv(save_dir / "ssa" / "summary.csv")
    assert list(summary["value"]) == ["true", "false", "true", "false", "16", "8"]
    failed = summary[summary["value"] == "16"].iloc[0]
    assert math.isnan(failed["value_of_metric"]) and failed["exit_code"] == 1
    assert "OutOfMemoryError" in failed["reason"] and not failed["best"]
    assert summary[summary["value"] == "8"]["best"].item()
    trials = save_dir / "ssa" / "trials"
    recorded = {p.name: json.loads((p / "args.json").read_text())["args"] for p in trials.iterdir()
                if (p / "args.json").exists()}
    assert recorded["stage1_balanced-sampling=false"]["balanced_sampling"] is False
    assert recorded["stage1_balanced-sampling=true"]["balanced_sampling"] is True
    assert recorded["stage2_grad-checkpointing=false"]["grad_checkpointing"] is False  # removed from argv
    assert recorded["stage2_grad-checkpointing=true"]["grad_checkpointing"] is True
    best = json.loads((save_dir / "ssa" / "best_args.json").read_text())
    assert best["best_values"]["batch-size"] == "8"
    assert train_options.parse_args(best["argv"] + ["--save-dir", str(tmp_path / "again")]).batch_size == 8


@pytest.mark.slow
def test_ssa_refused_trial_keeps_what_the_user_had(splits, tmp_path, capsys):
    from conftest import tree_state
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    (save_dir / "ssa").mkdir(parents=True)
    (save_dir / "ssa" / "my_notes.txt").write_text("keep me")
    (save_dir / "results.csv").write_text("mine")
    before = tree_state(save_dir)
    # The second value passes argparse but the trial refuses it (exit 2): another architecture.
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--overwrite",
                      "--ssa", "model-name=tiny_clip,RN50")
    assert train_cli.main(argv) == 2
    assert "refused its arguments" in capsys.readouterr().err
    assert tree_state(save_dir).keys() == before.keys()
    assert (save_dir / "ssa" / "my_notes.txt").read_text() == "keep me"


def test_on_off_ssa_factor_rejects_other_words(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    with pytest.raises(SystemExit) as exc:
        train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "r", "--ssa", "balanced-sampling=maybe"))
    assert exc.value.code == 2 and "balanced-sampling=true,false" in capsys.readouterr().err


# -- all pairs of the training options ----------------------------------------------------------------

def covering_array():
    """Every pair of option values in some row (allpairspy), not the full product (~20 rows)."""
    from allpairspy import AllPairs
    factors = {
        "loss": ["clip", "label-aware"], "balanced": [True, False], "accum": [1, 2],
        "lock": [None, "image", "text"], "checkpointing": [True, False],
        "metric": list(train_options.SELECT_METRICS), "wise_ft": [None, "0,0.5,1"], "patience": [0, 1],
        "recipe": ["paper", "recommended"], "fold": [None, 0], "resume": [False, True],
    }
    return [dict(zip(factors, row)) for row in AllPairs(list(factors.values()))]


def option_argv(row):
    argv = ["--loss", row["loss"], "--balanced-sampling" if row["balanced"] else "--no-balanced-sampling",
            "--accum-steps", str(row["accum"]), "--select-metric", row["metric"],
            "--patience", str(row["patience"]), "--recipe", row["recipe"], "--lr", "1e-3"]
    argv += {None: [], "image": ["--lock-image"], "text": ["--lock-text"]}[row["lock"]]
    argv += ["--grad-checkpointing"] if row["checkpointing"] else []
    argv += ["--wise-ft-alphas", row["wise_ft"]] if row["wise_ft"] else []
    return argv


@pytest.fixture
def fold_cohort(make_cohort, tmp_path):
    """(train folder, val folder, manifest.csv whose fold 0 is the val folder, fold 1 the train one)."""
    train_dir, val_dir = make_cohort("train", (3, 4, 4), seed=0), make_cohort("val", (2, 2, 2), seed=1)
    rows = [{"path": str(p.relative_to(tmp_path)), "label": p.parent.name, "split": "train", "fold": fold}
            for fold, root in ((1, train_dir), (0, val_dir)) for p in sorted(root.rglob("*.jpg"))]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return train_dir, val_dir, tmp_path / "manifest.csv"


@pytest.mark.parametrize("row", covering_array(), ids=lambda row: "-".join(
    f"{k}={v}" for k, v in row.items() if v not in (None, False, 0, 1, "paper", "clip")))
@pytest.mark.slow
def test_training_options_in_pairs(fold_cohort, tmp_path, row):
    train_dir, val_dir, manifest = fold_cohort
    if row["fold"] is not None:
        train_dir = val_dir = manifest
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--batch-size", "8", *option_argv(row))
    argv += ["--fold", str(row["fold"])] if row["fold"] is not None else []
    if row["resume"]:
        assert train_cli.main(argv + ["--epochs", "1"]) == 0
        argv += ["--resume", "auto"]
    assert train_cli.main(argv) == 0
    history = pd.read_csv(save_dir / "metrics.csv")
    assert list(history["epoch"]) == [1, 2] and (history["val_images"] == 6).all()
    best = torch.load(save_dir / train_checkpoints.BEST_NAME, weights_only=True)
    last = torch.load(save_dir / train_checkpoints.LAST_NAME, weights_only=True)
    assert best["select_metric"] == row["metric"] and last["finished"] is True
    values = history[row["metric"]]
    assert best["epoch"] == history.loc[(values.idxmin() if row["metric"] == "val_loss" else values.idxmax()), "epoch"] \
        or values.isna().all()
    for name in (train_checkpoints.BEST_NAME, train_checkpoints.FINAL_NAME):  # stock open_clip loads both
        stored = torch.load(save_dir / name, weights_only=True)["state_dict"]
        model = open_clip.create_model("tiny_clip", pretrained=str(save_dir / name))
        assert torch.equal(model.state_dict()["text_projection"], stored["text_projection"])
    torch.manual_seed(2024)  # the weights the run started from
    initial = models.create_model("tiny_clip", None)[0].state_dict()
    final = torch.load(save_dir / train_checkpoints.FINAL_NAME, weights_only=True)["state_dict"]
    frozen = {"image": "visual.conv1.weight", "text": "token_embedding.weight"}.get(row["lock"])
    if frozen:
        assert torch.equal(initial[frozen], final[frozen])
    assert not torch.equal(initial["logit_scale"], final["logit_scale"])  # trained in every row
    if row["wise_ft"]:
        table = pd.read_csv(save_dir / "wise_ft_validation.csv")
        chosen = table.set_index("alpha").loc[best["wise_ft"]["chosen_alpha"], row["metric"]]
        extreme = table[row["metric"]].min() if row["metric"] == "val_loss" else table[row["metric"]].max()
        assert chosen == pytest.approx(extreme) or table[row["metric"]].isna().all()


# -- resume x each changeable flag, set to its old value: bit-identical weights ---------------------

# Each flag a resume may carry, at the value train_argv's run records (often spelled otherwise:
# 0.001 for 1e-3), and flags a resume may change freely (--workers, --precision, --device).
RESUME_FLAGS_AT_OLD_VALUES = [
    ("--lr", "0.001"), ("--weight-decay", "1e-8"), ("--batch-size", "16"), ("--warmup", "0"),
    ("--schedule", "const"), ("--loss", "clip"), ("--no-balanced-sampling",), ("--patience", "0"),
    ("--seed", "2024"), ("--select-metric", "accuracy"), ("--logit-scale-mode", "exp"),
    ("--target-sensitivity", "0.9"), ("--recipe", "paper"), ("--precision", "fp32"), ("--device", "cpu"),
]


def resume_covering_array():
    """Every pair of (flag at its old value, --workers, --resume-with-changes) in some row."""
    from allpairspy import AllPairs
    factors = {"flag": RESUME_FLAGS_AT_OLD_VALUES, "workers": ["0", "2"], "with_changes": [False, True]}
    return [dict(zip(factors, row)) for row in AllPairs(list(factors.values()))]


@pytest.fixture(scope="module")
def first_epochs(tmp_path_factory):
    """{workers: (train, val, 2 epochs straight, 1 epoch to resume)} on LARGE_PX images, each
    trained once for the module (the rows differ only in the resume)."""
    from conftest import write_large_splits
    train_dir, val_dir = write_large_splits(tmp_path_factory.mktemp("large"))
    runs = {}
    for workers in ("0", "2"):
        root = tmp_path_factory.mktemp(f"workers{workers}")
        assert train_cli.main(train_argv(train_dir, val_dir, root / "straight", "--workers", workers)) == 0
        assert train_cli.main(train_argv(train_dir, val_dir, root / "one", "--workers", workers,
                                         "--epochs", "1")) == 0
        runs[workers] = (train_dir, val_dir, root / "straight", root / "one")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("row", resume_covering_array(), ids=lambda row: "-".join(
    [*row["flag"], f"w{row['workers']}", *(["changes"] if row["with_changes"] else [])]))
def test_resume_with_each_changeable_flag_at_its_old_value_is_bit_identical(first_epochs, tmp_path, row):
    train_dir, val_dir, straight, one = first_epochs[row["workers"]]
    shutil.copytree(one, tmp_path / "split")
    argv = train_argv(train_dir, val_dir, tmp_path / "split", "--workers", row["workers"], *row["flag"],
                      "--resume", "auto", *(["--resume-with-changes"] if row["with_changes"] else []))
    assert train_cli.main(argv) == 0
    a, b = final_weights(straight), final_weights(tmp_path / "split")
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) == 0.0
    assert list(pd.read_csv(tmp_path / "split" / "metrics.csv")["epoch"]) == [1, 2]


# -- the loss: fp32 outside autocast, failed rows masked; refused configurations --------------------

@pytest.mark.slow
def test_loss_runs_in_fp32_outside_autocast_and_masks_failed_rows(monkeypatch):
    from types import SimpleNamespace
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model("tiny_clip", None)
    images = torch.randn(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(), prompts.new_rng(0))
    # bf16 autocast on the CPU, whatever common's precision policy for the CPU is.
    monkeypatch.setattr(models, "autocast_context", lambda device, precision: torch.autocast("cpu", torch.bfloat16))
    seen = []
    real_loss = train_losses.make_loss("clip")

    def spy(image, text, scale, labels, valid=None):
        seen.append((torch.is_autocast_enabled("cpu"), image.dtype, text.dtype))
        return real_loss(image, text, scale, labels, valid)

    args = SimpleNamespace(device=torch.device("cpu"), precision="bf16", accum_steps=2,
                           logit_scale_mode="exp")
    ctx = {"args": args, "scaler": torch.amp.GradScaler("cpu", enabled=False), "tokenizer": tokenizer,
           "loss_fn": spy}
    valid = torch.tensor([True, True, False, True, True, True])
    train_loop.accumulate_gradients(model, images, labels, captions, ctx, valid=valid)
    assert seen and all(entry == (False, torch.float32, torch.float32) for entry in seen)
    # A masked row is out of the loss: the same as the batch without it.
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    for kind in ("clip", "label-aware"):
        masked = train_losses.make_loss(kind)(image, text, scale, labels, valid)
        dropped = train_losses.make_loss(kind)(image[valid], text[valid], scale, labels[valid])
        assert masked.item() == pytest.approx(dropped.item(), rel=1e-6)


@pytest.mark.parametrize("n_train, batch, world, accum, flag", [
    (1, 8, 1, 1, "--train-dir"), (20, 4, 2, 4, "--batch-size 4"), (20, 8, 4, 4, "--batch-size 8")])
def test_configurations_in_which_no_step_can_run_are_refused(n_train, batch, world, accum, flag):
    from types import SimpleNamespace
    args = SimpleNamespace(batch_size=batch, world_size=world, accum_steps=accum, train_dir="cohort")
    with pytest.raises(ValueError) as err:
        train_runner.check_steps_can_run(n_train, args)
    assert str(err.value).startswith(flag)
    train_runner.check_steps_can_run(20, SimpleNamespace(batch_size=4, world_size=2, accum_steps=2,
                                                       train_dir="cohort"))  # 2 per process: fine


def test_refused_configuration_writes_nothing(make_cohort, tmp_path, capsys):
    from conftest import tree_state
    train_dir = make_cohort("train", (1, 0, 0), seed=0)
    save_dir = tmp_path / "run"
    before = tree_state(tmp_path)
    assert train_cli.main(train_argv(train_dir, train_dir, save_dir)) == 2
    assert tree_state(tmp_path) == before
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --train-dir")


def test_default_workers_under_torchrun_divide_the_nodes_cores(splits, tmp_path, monkeypatch):
    train_dir, val_dir = splits
    monkeypatch.setattr(outputs.os, "cpu_count", lambda: 16)
    argv = train_argv(train_dir, val_dir, tmp_path / "run", "--device", "cuda")
    argv.remove("--workers")
    argv.remove("0")
    assert train_options.parse_args(argv).workers == 8  # one process: cores - 1, at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train_options.parse_args(argv).workers == 3  # 16 cores / 4 processes - 1


def test_inference_wise_ft_applies_the_threshold_and_temperature_validated_at_that_alpha():
    from orbital_clip import scoring as inference
    from types import SimpleNamespace
    model, *_ = models.create_model("tiny_clip", None)
    fitted = {"threshold": 0.31, "val_sensitivity": 0.9, "val_specificity": 0.8, "temperature": 1.7}
    checkpoint = model_loading.Checkpoint("ours", "best.pt", {"state_dict": {}, "wise_ft": {
        "base": "pretrained", "calibration": {"0.5": fitted}}}, "sha")
    bundle = inference.ModelBundle(
        checkpoint=checkpoint, model_name="tiny_clip", model=model, preprocess=None, tokenizer=None,
        classes=[], folders=[], prompt_source="checkpoint", logit_scale_mode="exp",
        operating={"class": "orbital disease", "rare_index": 0, "threshold": 0.6, "source": "validation"},
        temperature=1.2, temperature_source="validation (clip_train.py)", weights_id="w", cache_key="k")
    state = ckpt.clean_state_dict(model.state_dict())
    wise = inference.WiseFT(base=state, tuned=state, label="pretrained tag x", identity="tag:x")
    args = SimpleNamespace(precision="fp32", threshold=None, wise_ft_base=None)
    at_half = inference.wise_ft_bundle(bundle, wise, 0.5, args)
    assert at_half.temperature == 1.7 and at_half.operating["threshold"] == 0.31
    assert "alpha 0.5" in at_half.temperature_source
    at_quarter = inference.wise_ft_bundle(bundle, wise, 0.25, args)  # not validated: none applied
    assert at_quarter.temperature is None and at_quarter.operating["threshold"] is None
    other_base = inference.wise_ft_bundle(bundle, wise, 0.5, SimpleNamespace(
        precision="fp32", threshold=None, wise_ft_base="other.pt"))  # another base: none applied
    assert other_base.temperature is None
    assert inference.wise_ft_bundle(bundle, wise, 1.0, args).temperature == 1.2  # the stored weights'

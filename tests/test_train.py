"""clip_train.py: known-answer tests of its pure parts, argument checks, and short real runs."""

import json
import math
import subprocess
import sys

import numpy as np
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
from orbital_clip.train import sampling as train_sampling
from orbital_clip.train import schedule as train_schedule
from orbital_clip.train import ssa as train_ssa
from orbital_clip import checkpoint
from orbital_clip import cohort
from orbital_clip import images as image_io
from orbital_clip import models
from orbital_clip import metrics
from orbital_clip import prompts
from conftest import REPO_ROOT, train_argv


# -- pure functions ------------------------------------------------------------------------------

def test_lr_schedule_known_values():
    assert train_schedule.lr_at_step(0, 1.0, 0, 10, "const") == 1.0
    assert train_schedule.lr_at_step(9, 1.0, 0, 10, "const") == 1.0
    assert train_schedule.lr_at_step(0, 1.0, 4, 14, "cosine") == pytest.approx(0.25)
    assert train_schedule.lr_at_step(3, 1.0, 4, 14, "cosine") == pytest.approx(1.0)
    assert train_schedule.lr_at_step(4, 1.0, 4, 14, "cosine") == pytest.approx(1.0)
    assert train_schedule.lr_at_step(9, 1.0, 4, 14, "cosine") == pytest.approx(0.5)
    assert train_schedule.lr_at_step(14, 1.0, 4, 14, "cosine") == pytest.approx(0.0)


def test_unsupported_formats_are_left_out_of_training_with_a_warning_and_count(splits, caplog):
    # The shared listing rule (image_io.is_candidate_image) lists a .jfif and a .heic; the .jfif
    # (a JPEG) is kept, the two .heic files are left out with one warning giving their count.
    train_dir, _val_dir = splits
    rare = train_dir / "orbital disease"
    (rare / "copy.jfif").write_bytes(sorted(rare.glob("*.jpg"))[0].read_bytes())
    for name in ("a.heic", "b.HEIC"):
        (rare / name).write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    items = cohort.load_labelled_items(train_dir, prompts.class_folders(prompts.load_prompt_set(None)),
                                       "train")
    assert len(items) == 27 + 3
    with caplog.at_level("WARNING", logger="clip_train"):
        kept = train_runner.drop_unsupported(items, "--train-dir", train_dir)
    assert len(kept) == 28 and (rare / "copy.jfif", 0) in kept
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "--train-dir" in warning and ": 2 file(s)" in warning and "unsupported format .heic" in warning
    assert train_runner.drop_unsupported(kept, "--train-dir", train_dir) == kept


def test_param_groups_exclude_biases_norms_and_logit_scale():
    model, *_ = models.create_model("tiny_clip", None)
    decay, no_decay = train_schedule.param_groups(model, 0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay_ids}
    assert "logit_scale" in names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(n.endswith("bias") for n in names) and any("ln" in n for n in names)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_clip_loss_on_3x3_case_by_hand():
    # Identity features: each image matches its own caption with cosine 1, the others 0.
    features = torch.eye(3)
    scale = torch.tensor(math.log(4.0))
    loss = open_clip.ClipLoss()(features, features, scale.exp())
    expected = -math.log(math.exp(4) / (math.exp(4) + 2))  # same for both directions
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The published code fed the log value (1.386) instead: a much softer, wrong loss.
    published = open_clip.ClipLoss()(features, features, scale)
    log4 = math.log(4.0)
    assert published.item() == pytest.approx(-math.log(math.exp(log4) / (math.exp(log4) + 2)), rel=1e-5)


def test_loss_scale_modes():
    model, *_ = models.create_model("tiny_clip", None)
    assert train_losses.loss_scale(model, "exp").item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert train_losses.loss_scale(model, "published-log").item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)


def test_is_improvement_is_strict():
    assert metrics.is_improvement(0.5, None)
    assert not metrics.is_improvement(0.5, 0.5)
    assert metrics.is_improvement(0.4, 0.5, lower_is_better=True)
    assert not metrics.is_improvement(0.6, 0.5, lower_is_better=True)
    assert not metrics.is_improvement(float("nan"), 0.1)


def test_unique_caption_encoding_is_exact():
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model("tiny_clip", None)
    captions = ["orbital eye disease", "no eye disease", "orbital eye disease", "no eye disease",
                "free from eye disease", "orbital eye disease"]
    images = torch.randn(len(captions), 3, 64, 64)
    results = []
    for dedup in (False, True):
        model.zero_grad()
        text = train_loop.encode_captions(model, tokenizer, captions, torch.device("cpu"), dedup=dedup)
        image = model.encode_image(images, normalize=True)
        loss = open_clip.ClipLoss()(image, text, model.logit_scale.exp())
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)


# -- arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "1"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-5"], "--lr"),
    (["--workers", "-1"], "--workers"),
    (["--resume", "missing.pt"], "--resume"),
])
def test_parse_args_rejects(splits, tmp_path, capsys, extra, message):
    train_dir, val_dir = splits
    with pytest.raises(SystemExit) as exc:
        train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "run", *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_parse_args_defaults_follow_published_protocol(splits, tmp_path):
    train_dir, val_dir = splits
    args = train_options.parse_args(["--train-dir", str(train_dir), "--val-dir", str(val_dir),
                                  "--save-dir", str(tmp_path / "run")])
    assert (args.model_name, args.pretrained) == ("ViT-B-32-256", "datacomp_s34b_b86k")
    assert (args.batch_size, args.epochs, args.lr, args.weight_decay) == (200, 100, 1e-8, 1e-8)
    assert (args.schedule, args.warmup, args.select_metric) == ("const", 0, "accuracy")
    custom = train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "run"))
    assert (custom.model_name, custom.pretrained) == ("tiny_clip", "none")


def test_non_empty_save_dir_is_refused(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        train_cli.main(train_argv(train_dir, val_dir, save_dir))
    assert "--out-dir" in capsys.readouterr().err
    assert sorted(p.name for p in save_dir.iterdir()) == ["notes.txt"]


def test_unknown_class_folder_is_a_clear_error(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    (train_dir / "cataract").mkdir()
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "run")) == 2
    assert "cataract" in capsys.readouterr().err


# -- real runs -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_run_writes_loadable_checkpoints_and_history(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "3")
    assert train_cli.main(argv) == 0
    for name in ("clip_model_epoch_best.pt", "clip_model_final.pt", "clip_model_last.pt",
                 "args.json", "metrics.csv", "training_curves.png", "train_log.jsonl"):
        assert (save_dir / name).is_file(), name
    history = pd.read_csv(save_dir / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    assert (history["val_images"] == 13).all()
    # Best = first epoch reaching the maximum accuracy (kept only when strictly better).
    best_epoch = int(history.loc[history["accuracy"].idxmax(), "epoch"])
    best = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)
    assert best["epoch"] == best_epoch
    assert best["metrics"]["accuracy"] == pytest.approx(history["accuracy"].max())
    assert best["class_folders"] == ["orbital disease", "healthy eyes", "non-orbital disease"]
    assert best["model_name"] == "tiny_clip" and best["model_config"]["embed_dim"] == 64
    assert prompts.parse_prompt_set(best["prompts"])[0].train == prompts.load_prompt_set()[0].train
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best["state_dict"])
    # Stock open_clip loads it as pretrained weights.
    model, _, _ = open_clip.create_model_and_transforms("tiny_clip", pretrained=str(save_dir / "clip_model_epoch_best.pt"))
    assert torch.equal(model.state_dict()["logit_scale"], best["state_dict"]["logit_scale"])
    saved_args = json.loads((save_dir / "args.json").read_text())
    assert saved_args["args"]["lr"] == 1e-3 and saved_args["environment"]["torch"] == torch.__version__
    assert saved_args["script"] == "clip_train.py" and saved_args["argv"] == argv
    assert saved_args["run"] == {"train_images": 27, "val_images": 13, "config": None}  # no --config
    reparsed = json.loads(json.dumps(vars(train_options.parse_args(saved_args["argv"] + ["--overwrite"])), default=str))
    changed = {k for k, v in reparsed.items() if saved_args["args"].get(k) != v}
    assert changed == {"overwrite", "device", "precision"}, changed  # the last two resolved at run time


@pytest.mark.slow
def test_training_moves_weights_and_seed_reproduces(splits, tmp_path):
    train_dir, val_dir = splits
    runs = []
    for name in ("a", "b"):  # with a worker process: seeded workers, same batches, same weights
        assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / name, "--epochs", "1",
                                          "--workers", "1")) == 0
        runs.append(torch.load(tmp_path / name / "clip_model_final.pt", weights_only=True)["state_dict"])
    torch.manual_seed(2024)
    initial, *_ = models.create_model("tiny_clip", None)
    assert not torch.equal(initial.state_dict()["text_projection"], runs[0]["text_projection"])
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(splits, tmp_path):
    train_dir, val_dir = splits
    wise = ("--wise-ft-alphas", "0,0.5,1")  # WiSE-FT's base must stay the initial weights after a resume
    # 1 epoch, then a resume that trains 2 more (several epochs after the restore): 6 epochs in all
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "straight", "--epochs", "3", *wise)) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "1")) == 0
    assert train_cli.main(train_argv(train_dir, val_dir, tmp_path / "split", "--epochs", "3",
                                      "--resume", "auto", *wise)) == 0
    tables = [pd.read_csv(tmp_path / run / "wise_ft_validation.csv") for run in ("straight", "split")]
    pd.testing.assert_frame_equal(*tables, atol=1e-6)
    straight = torch.load(tmp_path / "straight" / "clip_model_final.pt", weights_only=True)["state_dict"]
    resumed = torch.load(tmp_path / "split" / "clip_model_final.pt", weights_only=True)["state_dict"]
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], atol=1e-5), key
    history = pd.read_csv(tmp_path / "split" / "metrics.csv")
    assert list(history["epoch"]) == [1, 2, 3]


@pytest.mark.slow
def test_a_non_finite_loss_in_every_step_stops_and_keeps_checkpoints(splits, tmp_path, monkeypatch, capsys):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1")) == 0
    before = {n: (save_dir / n).read_bytes() for n in ("clip_model_epoch_best.pt", "clip_model_last.pt")}
    monkeypatch.setattr(train_loop, "loss_scale", lambda model, mode: torch.tensor(float("nan")))
    code = train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "3", "--resume", "auto"))
    assert code == 1
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "non-finite training loss or gradients in every step of epoch 2" in line
    assert str(save_dir) in line and "the run stopped" in line and "skipped" not in line
    assert "--precision fp32" not in line  # the run is already fp32 (the CPU default here)
    (command,) = [c.strip() for c in err.splitlines()[err.splitlines().index(line) + 1:] if "clip_train.py" in c]
    assert command.endswith("--resume-with-changes --lr 0.0001 --resume auto")
    for name, data in before.items():
        assert (save_dir / name).read_bytes() == data


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.slow
@pytest.mark.parametrize("poison", ["pixel", "gradient"])
def test_a_non_finite_step_in_epoch_2_is_skipped_and_reported(splits, tmp_path, monkeypatch, capsys, poison):
    # One uninterrupted run; the second step of epoch 2 (27 images, batch 16: two steps per epoch)
    # gets a NaN pixel (a NaN loss) or a NaN gradient behind a finite loss. The step is skipped, the
    # weights stay finite, and the log, metrics.csv, the last line and MODEL_CARD.md say so.
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    seen = []
    real_batch_features = train_loop.batch_features

    def poisoned_batch_features(model, images, captions, ctx):
        seen.append(len(images))
        if len(seen) == 4 and poison == "pixel":
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        image, text = real_batch_features(model, images, captions, ctx)
        return (NanGradient.apply(image), text) if len(seen) == 4 and poison == "gradient" else (image, text)

    monkeypatch.setattr(train_loop, "batch_features", poisoned_batch_features)
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "3")) == 0
    assert len(seen) == 6
    log = capsys.readouterr().err
    what = "loss" if poison == "pixel" else "gradients"
    assert f"epoch 2, step 3: non-finite training {what}; step skipped" in log
    history = pd.read_csv(save_dir / "metrics.csv", keep_default_na=False)
    assert list(history["nonfinite_steps"]) == [0, 1, 0]
    assert [("non_finite_steps" in c) for c in history["collapse"]] == [False, True, True]
    last = [line for line in log.splitlines() if " clip_train: == done" in line][-1]
    assert "non_finite_steps" in last and "--precision fp32" in last
    assert "non_finite_steps" in (save_dir / "MODEL_CARD.md").read_text()
    final = torch.load(save_dir / train_checkpoints.FINAL_NAME, weights_only=True)
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values())



def test_help_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:  # the process boundary: the run below
        train_cli.main(["--help"])
    assert exit_info.value.code == 0 and "--select-metric" in capsys.readouterr().out


@pytest.mark.slow
def test_manifest_input_and_subprocess_entry_point(splits, tmp_path):
    train_dir, val_dir = splits
    rows = [{"path": str(p.relative_to(tmp_path)), "label": p.parent.name, "split": split}
            for split, root in (("train", train_dir), ("val", val_dir)) for p in sorted(root.rglob("*.jpg"))]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    run = subprocess.run([sys.executable, str(REPO_ROOT / "clip_train.py"),
                          *train_argv(manifest, manifest, tmp_path / "run", "--epochs", "1")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert int(history["val_images"].iloc[0]) == 13


# -- label-aware loss, balanced sampling, recipes --------------------------------------------------

def test_label_aware_loss_on_3x3_case_by_hand():
    features = torch.eye(3)
    labels = torch.tensor([0, 0, 1])
    loss = train_losses.LabelAwareClipLoss()(features, features, torch.tensor(1.0), labels)
    # Rows 0 and 1 share a class: targets (1/2, 1/2, 0); row 2 is alone. L = log(e + 2).
    big_l = math.log(math.e + 2)
    expected = ((big_l - 0.5) * 2 + (big_l - 1)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_aware_loss_equals_clip_loss_with_distinct_labels():
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(14.0)
    aware = train_losses.make_loss("label-aware")(image, text, scale, torch.arange(5))
    plain_clip = train_losses.make_loss("clip")(image, text, scale, torch.arange(5))
    assert aware.item() == pytest.approx(plain_clip.item(), rel=1e-6)


def test_class_balanced_weights_draw_classes_equally():
    labels = [0] * 2 + [1] * 10 + [2] * 8
    weights = train_sampling.class_balanced_weights(labels, 3)
    per_class = [float(weights[np.array(labels) == k].sum()) for k in range(3)]
    assert per_class == pytest.approx([1.0, 1.0, 1.0])
    sampler = torch.utils.data.WeightedRandomSampler(weights, 3000, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount(np.array(labels)[list(sampler)], minlength=3) / 3000
    assert drawn == pytest.approx([1 / 3] * 3, abs=0.04)


def test_recipe_recommended_and_explicit_override(splits, tmp_path):
    train_dir, val_dir = splits
    base = ["--train-dir", str(train_dir), "--val-dir", str(val_dir), "--save-dir", str(tmp_path / "r")]
    args = train_options.parse_args(base + ["--recipe", "recommended"])
    assert (args.loss, args.balanced_sampling, args.schedule, args.select_metric) == (
        "label-aware", True, "cosine", "balanced_accuracy")
    assert (args.lr, args.patience, args.warmup) == (1e-5, 10, "5%")
    args = train_options.parse_args(base + ["--recipe", "recommended", "--lr", "3e-6", "--no-balanced-sampling",
                                         "--loss", "clip"])
    assert (args.lr, args.balanced_sampling, args.loss) == (3e-6, False, "clip")
    assert train_schedule.warmup_steps("5%", 200) == 10 and train_schedule.warmup_steps("7", 200) == 7


@pytest.mark.slow
def test_recommended_recipe_trains_with_early_stopping(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--recipe", "recommended", "--epochs", "30",
                      "--patience", "2", "--lr", "1e-3")
    assert train_cli.main(argv) == 0
    history = pd.read_csv(save_dir / "metrics.csv")
    best_epoch = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)["epoch"]
    assert len(history) < 30  # stopped early
    assert len(history) == best_epoch + 2


@pytest.mark.parametrize("loss_kind", ["clip", "label-aware"])
def test_accumulated_gradient_equals_full_batch_gradient(loss_kind):
    from types import SimpleNamespace
    torch.manual_seed(0)
    model, *_, tokenizer = models.create_model("tiny_clip", None)
    images = torch.randn(8, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 1])
    captions = prompts.sample_train_captions(labels.tolist(), prompts.load_prompt_set(), prompts.new_rng(0))
    grads, losses = [], []
    for accum_steps in (1, 4):
        args = SimpleNamespace(device=torch.device("cpu"), precision="fp32", accum_steps=accum_steps,
                               logit_scale_mode="exp")
        ctx = {"args": args, "scaler": torch.amp.GradScaler("cpu", enabled=False),
               "tokenizer": tokenizer, "loss_fn": train_losses.make_loss(loss_kind)}
        model.zero_grad()
        losses.append(train_loop.accumulate_gradients(model, images, labels, captions, ctx).item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "logit_scale" in grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name


@pytest.mark.slow
def test_locked_towers_do_not_move(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--lock-image",
                                      "--lock-text", "2", "--accum-steps", "2", "--grad-checkpointing")) == 0
    torch.manual_seed(2024)
    initial = models.create_model("tiny_clip", None)[0].state_dict()
    final = torch.load(save_dir / "clip_model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(initial[k], final[k]) for k in initial if k.startswith("visual."))
    assert torch.equal(initial["token_embedding.weight"], final["token_embedding.weight"])
    assert not torch.equal(initial["transformer.resblocks.1.mlp.c_fc.weight"],
                           final["transformer.resblocks.1.mlp.c_fc.weight"])  # last block trainable


# -- sequential sensitivity analysis ----------------------------------------------------------------

def test_ssa_factor_parsing(splits, tmp_path, capsys):
    train_dir, val_dir = splits
    base = train_argv(train_dir, val_dir, tmp_path / "run")
    args = train_options.parse_args(base + ["--ssa", "lr=1e-8,1e-6", "--ssa", "batch-size=4,8"])
    assert args.ssa == [train_options.SsaFactor("lr", ["1e-8", "1e-6"]),
                        train_options.SsaFactor("batch-size", ["4", "8"])]
    for bad in ("lr", "lr=", "colour=1,2", "lr=fast", "schedule=linear", "save-dir=a,b"):
        with pytest.raises(SystemExit):
            train_options.parse_args(base + ["--ssa", bad])
        assert "--ssa" in capsys.readouterr().err
    assert train_ssa.strip_ssa_flags(["--lr", "1", "--ssa", "lr=1,2", "--save-dir", "x", "--ssa=a=1",
                                       "--ssa-keep-all"]) == ["--lr", "1"]


@pytest.mark.slow
def test_ssa_runs_stages_and_keeps_the_winner(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "2",
                      "--ssa", "lr=1e-9,1e-3", "--ssa", "batch-size=8,16")
    assert train_cli.main(argv) == 0
    summary = pd.read_csv(save_dir / "ssa" / "summary.csv")
    assert list(summary["factor"]) == ["lr", "lr", "batch-size", "batch-size"]
    assert summary.groupby("stage")["best"].sum().tolist() == [1, 1]
    lr_rows = summary[summary["factor"] == "lr"]
    winner = lr_rows.loc[lr_rows["value_of_metric"].idxmax(), "value"]
    assert lr_rows[lr_rows["best"]]["value"].item() == winner
    # Stage 2 ran at the stage-1 winner.
    trial_args = json.loads(next((save_dir / "ssa" / "trials").glob("stage2_*")).joinpath("args.json").read_text())
    assert trial_args["args"]["lr"] == float(winner)
    best = json.loads((save_dir / "ssa" / "best_args.json").read_text())["best_values"]
    assert set(best) == {"lr", "batch-size"}
    assert (save_dir / "clip_model_epoch_best.pt").is_file() and (save_dir / "ssa" / "sensitivity.png").is_file()
    assert not list((save_dir / "ssa" / "trials").rglob("*.pt"))


@pytest.mark.slow
def test_checkpoint_stores_operating_point_and_temperature(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1",
                                      "--target-sensitivity", "0.5")) == 0
    best = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)
    point = best["operating_point"]
    assert point["class"] == "orbital disease" and point["target_sensitivity"] == 0.5
    assert 0 <= point["threshold"] <= 1 and point["val_sensitivity"] >= 0.5
    assert best["temperature"] > 0


@pytest.mark.slow
def test_best_weights_also_as_safetensors(splits, tmp_path):
    from safetensors.torch import load_file
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "1")) == 0
    best = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)["state_dict"]
    tensors = load_file(save_dir / "clip_model_epoch_best.safetensors")
    assert tensors.keys() == best.keys() and all(torch.equal(tensors[k], best[k]) for k in best)
    model, _, _ = open_clip.create_model_and_transforms(
        "tiny_clip", pretrained=str(save_dir / "clip_model_epoch_best.safetensors"))
    assert torch.equal(model.state_dict()["text_projection"], best["text_projection"])


@pytest.mark.slow
def test_compiled_model_saves_clean_keys():
    model, *_ = models.create_model("tiny_clip", None)
    model.visual = torch.compile(model.visual)
    keys = checkpoint.clean_state_dict(model.state_dict()).keys()
    assert "visual.conv1.weight" in keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.slow
def test_wise_ft_alpha_chosen_on_validation(splits, tmp_path):
    train_dir, val_dir = splits
    save_dir = tmp_path / "run"
    assert train_cli.main(train_argv(train_dir, val_dir, save_dir, "--epochs", "2",
                                      "--wise-ft-alphas", "0,0.5,1")) == 0
    best = torch.load(save_dir / "clip_model_epoch_best.pt", weights_only=True)
    table = pd.read_csv(save_dir / "wise_ft_validation.csv")
    assert list(table["alpha"]) == [0.0, 0.5, 1.0]
    chosen = best["wise_ft"]["chosen_alpha"]
    # The best accuracy (ties between alphas are possible on 13 validation images).
    assert table.loc[table["alpha"] == chosen, "accuracy"].item() == table["accuracy"].max()
    # alpha = 1 is the best checkpoint itself: its validation accuracy is the recorded one.
    assert table.loc[table["alpha"] == 1.0, "accuracy"].item() == pytest.approx(best["metrics"]["accuracy"])
    with pytest.raises(SystemExit):
        train_options.parse_args(train_argv(train_dir, val_dir, tmp_path / "x", "--wise-ft-alphas", "0,1.5"))


@pytest.mark.slow
def test_non_finite_steps_in_a_row_are_counted_across_the_epoch_boundary(splits, tmp_path, monkeypatch, capsys):
    # 27 images, batch 8: four steps per epoch. Steps 3-4 of epoch 1 and 1-3 of epoch 2 get a NaN
    # pixel: five in a row across the boundary stop the run, though no epoch is wholly non-finite.
    train_dir, val_dir = splits
    seen = []
    real_batch_features = train_loop.batch_features

    def poisoned_batch_features(model, images, captions, ctx):
        seen.append(len(images))
        if 3 <= len(seen) <= 7:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        return real_batch_features(model, images, captions, ctx)

    monkeypatch.setattr(train_loop, "batch_features", poisoned_batch_features)
    argv = train_argv(train_dir, val_dir, tmp_path / "run", "--epochs", "3", "--batch-size", "8")
    assert train_cli.main(argv) == 1
    assert len(seen) == 7
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "in 5 steps in a row at epoch 2" in line


@pytest.mark.parametrize("rank", [0, 1])
def test_under_torchrun_only_rank_0_logs_a_skipped_step_in_the_global_wording(rank, caplog, monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(train_loop.LOG, "propagate", True)
    ctx = {"args": SimpleNamespace(rank=rank, world_size=2),
           "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}
    counts = {"run": 1, "nonfinite": 0, "in_a_row": 0}
    with caplog.at_level("WARNING"):
        train_loop.skip_nonfinite_step(torch.tensor(1.0), {"epoch": 1, "step": 3}, counts, ctx)
    messages = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    expected = ["epoch 2, step 3: non-finite training loss or gradients on at least one process; "
                "step skipped (no update)"]
    assert messages == (expected if rank == 0 else [])
    assert counts == {"run": 1, "nonfinite": 1, "in_a_row": 1}


def test_the_logit_scale_column_is_the_scale_the_loss_used(splits, tmp_path):
    """metrics.csv's logit_scale follows models.logit_scale: under published-log the loss used the
    raw value (about 2.66), and the column said exp of it (about 14.3)."""
    train_dir, val_dir = splits
    save_dir = tmp_path / "published"
    argv = train_argv(train_dir, val_dir, save_dir, "--epochs", "1", "--logit-scale-mode", "published-log")
    assert train_cli.main(argv) == 0
    column = pd.read_csv(save_dir / "metrics.csv")["logit_scale"].iloc[0]
    raw = torch.load(save_dir / "clip_model_last.pt", weights_only=True)["state_dict"]["logit_scale"]
    assert column == pytest.approx(float(raw), rel=1e-6) and column < 5

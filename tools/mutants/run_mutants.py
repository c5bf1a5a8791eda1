"""Plant each of the nine mutants that survived the 2026-12-03 audit (issue 27), one at a time,
in a scratch copy of the repository, and run the tests named for it: every one must fail.

    $ python tools/mutants/run_mutants.py              # all nine; exit 1 if any survives
    $ python tools/mutants/run_mutants.py --only cache-mtime baseline-order

The working tree is never changed: each mutant is planted in a copy under a temporary folder.
A snippet that is no longer found exactly once (the code moved or changed) is reported as
'stale', not as killed: update the table's file and snippet.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "demo_run")


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # found exactly once in `file`
    mutated: str
    tests: tuple  # pytest node ids that must fail with the mutant planted


MUTANTS = (
    Mutant("fold-sort-key", "orbital_clip/split/allocate.py",
           "key=lambda f: (of_class[f], total[f], f))",
           "key=lambda f: (total[f], of_class[f], f))",
           ("tests/test_mutants.py::test_assign_folds_balances_each_class_before_the_fold_totals",)),
    Mutant("regex-miss-one-key", "orbital_clip/evaluation.py",
           'return [group if group is not None else f"image:{path}" for group, path in zip(found, paths)]',
           'return [group if group is not None else "image:" for group, path in zip(found, paths)]',
           ("tests/test_mutants.py::test_group_regex_misses_are_each_their_own_group_not_one_shared_patient",)),
    Mutant("comparison-ci-swapped", "orbital_clip/report.py",
           '(("value", "value_ci", "model_value"),\n'
           '                                  ("reference_value", "reference_ci", "ours_value"),',
           '(("value", "reference_ci", "model_value"),\n'
           '                                  ("reference_value", "value_ci", "ours_value"),',
           ("tests/test_mutants.py::test_comparison_frame_puts_each_models_ci_beside_its_own_value",)),
    Mutant("heterogeneity-p-swapped", "orbital_clip/report.py",
           'p_heterogeneity_accuracy=block["accuracy_test"]["p"],\n'
           '                        p_heterogeneity_rare_sensitivity=block["rare_sensitivity_test"]["p"])',
           'p_heterogeneity_accuracy=block["rare_sensitivity_test"]["p"],\n'
           '                        p_heterogeneity_rare_sensitivity=block["accuracy_test"]["p"])',
           ("tests/test_mutants.py::test_subgroups_frame_keeps_each_heterogeneity_p_under_its_own_test",)),
    Mutant("cache-key-without-mtime", "orbital_clip/scoring.py",
           'text = f"{path.resolve()}\\0{stat.st_size}\\0{stat.st_mtime_ns}"',
           'text = f"{path.resolve()}\\0{stat.st_size}"',
           ("tests/test_mutants.py::test_cache_sees_a_replaced_image_of_the_same_size",)),
    Mutant("cache-key-without-weights", "orbital_clip/scoring.py",
           'json.dumps({"version": CACHE_VERSION, "weights": weights_id, "model": model_name,',
           'json.dumps({"version": CACHE_VERSION, "model": model_name,',
           ("tests/test_mutants.py::test_cache_is_not_shared_between_two_checkpoints",)),
    Mutant("baseline-not-reordered", "orbital_clip/scoring.py",
           "cohort, folders, softmax(baseline_scores.logits)[:, order],",
           "cohort, folders, softmax(baseline_scores.logits),",
           ("tests/test_mutants.py::test_baseline_in_another_class_order_is_written_under_our_headers",)),
    Mutant("cnn-val-loss-unweighted", "orbital_clip/cnn.py",
           "F.nll_loss(log_p, torch.from_numpy(y_true), weight=weight)",
           "F.nll_loss(log_p, torch.from_numpy(y_true), weight=None)",
           ("tests/test_cnn_schedule.py::test_best_epoch_is_not_the_last_and_predictions_come_from_it",
            "tests/test_cnn_schedule.py::test_class_weights_are_balanced_and_val_loss_uses_them")),
    Mutant("cnn-cosine-tmax-epochs", "orbital_clip/cnn.py",
           "CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))",
           "CosineAnnealingLR(optimizer, T_max=args.epochs)",
           ("tests/test_cnn_schedule.py::test_lr_column_follows_a_cosine_over_all_steps",)),
)


def plant(copy_root, mutant):
    """Replace the snippet in the copy; False when it is not there exactly once (stale table)."""
    path = copy_root / mutant.file
    text = path.read_text(encoding="utf-8")
    if text.count(mutant.original) != 1:
        return False
    path.write_text(text.replace(mutant.original, mutant.mutated), encoding="utf-8")
    return True


def failing_tests(copy_root, tests, timeout_s):
    """The node ids among `tests` that fail (or error) in the copy, or None on a timeout."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        done = subprocess.run(command, cwd=copy_root, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None
    lines = done.stdout.splitlines()
    return [t for t in tests if any(line.startswith(("FAILED " + t, "ERROR " + t)) for line in lines)]


def run_one(mutant, timeout_s):
    """'killed' (every named test fails), 'survived', 'stale' or 'timeout', and the failing ids."""
    with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as scratch:
        copy_root = Path(scratch) / "repo"
        shutil.copytree(REPO_ROOT, copy_root, ignore=COPY_IGNORE, symlinks=True)
        if not plant(copy_root, mutant):
            return "stale", []
        failed = failing_tests(copy_root, list(mutant.tests), timeout_s)
    if failed is None:
        return "timeout", []
    return ("killed" if len(failed) == len(mutant.tests) else "survived"), failed


def check_unmutated(timeout_s):
    """The named tests must pass on the unmutated code, or a 'killed' would mean nothing."""
    tests = sorted({t for mutant in MUTANTS for t in mutant.tests})
    with tempfile.TemporaryDirectory(prefix="mutant_none_") as scratch:
        copy_root = Path(scratch) / "repo"
        shutil.copytree(REPO_ROOT, copy_root, ignore=COPY_IGNORE, symlinks=True)
        return failing_tests(copy_root, tests, timeout_s)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[m.name for m in MUTANTS],
                        help="plant only these mutants (default: all nine)")
    parser.add_argument("--timeout-s", type=int, default=600, help="per mutant (default 600 s)")
    args = parser.parse_args(argv)
    baseline = check_unmutated(args.timeout_s)
    if baseline:
        print(f"error: these tests fail without any mutant: {baseline}", file=sys.stderr)
        return 2
    results = []
    for mutant in [m for m in MUTANTS if not args.only or m.name in args.only]:
        outcome, failed = run_one(mutant, args.timeout_s)
        results.append(outcome)
        print(f"{outcome:9s} {mutant.name:28s} {mutant.file}  ({len(failed)}/{len(mutant.tests)} named tests failed)",
              flush=True)
    return 0 if all(outcome == "killed" for outcome in results) else 1


if __name__ == "__main__":
    sys.exit(main())

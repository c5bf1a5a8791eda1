"""Outputs: atomic writes (temp file + os.replace), run records (args.json) and plain data."""

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

class OutputWriteError(OSError):
    """An output that could not be written (read-only folder, full disk); names the path."""


def atomic_write(path, write_fn, mode="wb"):
    """Call write_fn(handle) on a temp file beside `path`, then os.replace it into place: a crash
    or a failed write leaves the previous file as it was. Raises OutputWriteError naming `path`."""
    path = Path(path)
    try:
        _atomic_write(path, write_fn, mode)
    except OutputWriteError:
        raise
    except OSError as err:
        raise OutputWriteError(f"cannot write {path}: {err.strerror or err}") from None


def _atomic_write(path, write_fn, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, mode) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path, frame):
    """A pandas DataFrame to CSV, atomically, without the index."""
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))


def atomic_save_figure(fig, path, **kwargs):
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), **kwargs)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


# ----------------------------------------------------------------------------------------------
# Run records: one args.json layout for the three scripts


def version_module(package):
    """`package`.version (torch.version, open_clip.version: __version__, and torch's cuda) without
    importing the package when nothing has yet: importing torch takes seconds, and score_answers.py
    records the versions without needing torch. The file is executed alone; it imports nothing of
    its package."""
    if package in sys.modules:
        return importlib.import_module(f"{package}.version")
    spec = importlib.util.find_spec(package)
    location = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        f"_orbital_clip_{package}_version", location))
    module.__spec__.loader.exec_module(module)
    return module


def environment_info():
    """Package versions, platform, GPU and git commit, recorded next to every run."""
    import platform
    import subprocess

    import scipy
    import sklearn
    torch, open_clip = (version_module(name) for name in ("torch", "open_clip"))
    loaded = sys.modules.get("torch")  # a run that never loaded torch (answer files) used no GPU
    gpu = loaded.cuda.get_device_name(0) if loaded is not None and loaded.cuda.is_available() else None
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "numpy": np.__version__, "scipy": scipy.__version__, "sklearn": sklearn.__version__,
            "torch": torch.__version__, "open_clip": open_clip.__version__, "cuda": torch.cuda,
            "gpu": gpu}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5)
        info["git_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def plain(value):
    """Records, args and metrics as JSON/weights_only-safe primitives (dataclasses and dicts as
    dicts, tuples as lists, paths and devices as text, numpy scalars as numbers)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    # torch only when something imported it: a torch.device can exist only then, and this module
    # stays importable (atomic writes, args.json) without loading torch.
    torch = sys.modules.get("torch")
    if isinstance(value, Path) or (torch is not None and isinstance(value, torch.device)):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def hide_flag_values(argv, name, replacement):
    """argv with the value of the flag of argument `name` (--name-with-dashes, an abbreviation of
    it, as '--flag VALUE' or '--flag=VALUE') replaced; found by position, so another flag that
    happens to have the same value keeps its own."""
    flag = "--" + name.replace("_", "-")
    out, hide_next = [], False
    for token in argv:
        if hide_next:
            out.append(replacement)
            hide_next = False
            continue
        option, eq, _value = token.partition("=")
        # argparse accepts any unambiguous prefix of a flag ('--anonymize-s' for --anonymize-salt)
        if option.startswith("--") and len(option) > 2 and flag.startswith(option):
            if eq:
                token = option + "=" + replacement
            else:
                hide_next = True
        out.append(token)
    return out


def run_record(script, argv, args, run=None, hidden=None):
    """The args.json of every script, from which the run can be repeated:
    {script, cwd (the folder it ran in: relative paths in argv are relative to it), argv (the
    command-line arguments exactly as given), command (a shell line that repeats the run from
    cwd), args (every parsed argument, defaults included), environment, run (what the script
    adds)}.

    `script` is the file run (`clip_train.py`), or a module run with `python -m` named without
    `.py` (`baselines.train_cnn`), so that `command` repeats the run as it was started.
    `hidden` maps an argument name to the text written instead of its value, in `args` and in
    `argv` (a secret salt, a path that must not be written); the name "cwd" hides the folder.
    """
    import shlex

    def primitive(value):  # numpy scalars as numbers; paths, torch.device and the rest as text
        return value.item() if isinstance(value, np.generic) else str(value)
    record_args = json.loads(json.dumps(vars(args), default=primitive))
    argv = [str(token) for token in argv]
    hidden = dict(hidden or {})
    cwd = hidden.pop("cwd", None) or os.getcwd()
    for name, replacement in hidden.items():
        if record_args.get(name) is None:
            continue
        record_args[name] = replacement
        argv = hide_flag_values(argv, name, replacement)
    return {"script": script, "cwd": cwd, "argv": argv,
            "command": shlex.join(["python", *([script] if script.endswith(".py") else ["-m", script]),
                                   *argv]),
            "args": record_args, "environment": environment_info(),
            "run": json.loads(json.dumps(run, default=primitive))}


# ----------------------------------------------------------------------------------------------
# Each script's declared outputs: the one list that --overwrite clears, SSA copies, and
# docs/outputs.md documents (tests/test_outputs_declared.py holds the three together).


@dataclasses.dataclass(frozen=True)
class OutputFile:
    """One output of a script. `name` is a file name, a folder (ending in "/"), or either with a
    <placeholder> for a family of them (`wise_ft_alpha_<alpha>/`), spelled as docs/outputs.md does."""
    name: str
    what: str  # the writer, or under which flag it appears
    cleared_by_overwrite: bool = True  # removed by --overwrite before the new run writes
    copied_by_ssa: bool = False  # clip_train.py --ssa: copied from the winning trial's folder

    @property
    def is_plain_file(self):
        """A single file (not a folder, not a family): the kind a clearing loop can unlink by name."""
        return not self.name.endswith("/") and "<" not in self.name

    def matches(self, relative_path):
        """Whether a written path (POSIX, relative to the output folder) is this output."""
        import fnmatch
        import re
        pattern = re.sub(r"<[^>]+>", "*", self.name)
        if pattern.endswith("/"):
            return fnmatch.fnmatchcase(relative_path, pattern + "*")
        return fnmatch.fnmatchcase(relative_path, pattern)


def cleared_files(declared):
    """The plain file names of `declared` that --overwrite removes."""
    return tuple(o.name for o in declared if o.cleared_by_overwrite and o.is_plain_file)


def ssa_copied_files(declared):
    """The plain file names of `declared` that SSA copies from the winning trial."""
    return tuple(o.name for o in declared if o.copied_by_ssa and o.is_plain_file)


def undeclared(folder, declared):
    """Files under `folder` (POSIX paths relative to it) that no declared output matches."""
    folder = Path(folder)
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return [path for path in written if not any(o.matches(path) for o in declared)]


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def print_interrupted(epochs, what=None, last_path=None, saved_epoch=None, command=None, note=""):
    """The Ctrl-C lines of a training script (clip_train.py, baselines.train_cnn), one wording:
    where the run stopped (`what`), the epoch its last checkpoint holds and the command that
    continues it; with no checkpoint yet (`saved_epoch` None), to start again. Returns 130."""
    if saved_epoch:
        print(f"\ninterrupted {what}; {last_path} holds epoch {saved_epoch}/{epochs}. "
              f"Continue with{note}:\n  {command}", file=sys.stderr)
    else:
        print(f"\ninterrupted during epoch 1/{epochs}, before any checkpoint was written; "
              "start again with --overwrite", file=sys.stderr)
    return EXIT_INTERRUPTED

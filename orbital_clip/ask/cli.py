"""ask_models.py: ask a multimodal chat model about every image at every step, then score.

    $ python ask_models.py --test-dir demo_run/subtypes --metadata meta.csv --out-dir runs/ask --dry-run
    $ python ask_models.py --test-dir demo_run/subtypes --metadata meta.csv --out-dir runs/ask \
          --base-url http://127.0.0.1:8000/v1 --model Qwen2-VL-7B-Instruct --group-regex '_(P\\d+)_'
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from orbital_clip import cli
from orbital_clip import images as image_io
from orbital_clip import outputs
from orbital_clip import patients
from orbital_clip.ask import client, runner, steps

LOG = logging.getLogger("ask_models")
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"  # a hosted endpoint's key, read only for non-local hosts
NO_MODEL = "no model (--dry-run without --model)"  # recorded instead of a made-up model name


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test-dir", required=True, help="cohort: one folder per class of the step file")
    parser.add_argument("--metadata", default=None, help="CSV with path (relative to --test-dir) and "
                        "the columns the step templates name (age, sex, race, symptoms, ...)")
    parser.add_argument("--steps", default=str(steps.PAPER_STEPS),
                        help="step definition JSON (default: the paper's three steps, shipped)")
    cli.add_out_dir(parser, dest="output_dir", old=("--output-dir",), required=True,
                    help="requests.jsonl, cache/, answers/, summary.json, report/; rerunning into the "
                         "same folder sends only what is missing")
    parser.add_argument("--dry-run", action="store_true", help="write requests.jsonl and stop (read and approve the prompts)")
    endpoint = parser.add_argument_group("endpoint (any OpenAI-compatible chat-completions server)")
    endpoint.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1 (vLLM), https://api.openai.com/v1")
    endpoint.add_argument("--model", default=None, help="model name the endpoint serves")
    endpoint.add_argument("--api-key-env", default=None, metavar="NAME",
                          help=f"environment variable holding the key (never a flag value or a "
                               f"file; default {DEFAULT_API_KEY_ENV}). A loopback --base-url gets "
                               "a key only when this flag is given: a hosted key in the "
                               "environment is never sent to a local server unasked")
    endpoint.add_argument("--yes", action="store_true", help="needed to send images to a non-local host")
    endpoint.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0)")
    endpoint.add_argument("--seed", type=int, default=2024, help="sampling seed where the endpoint takes one")
    endpoint.add_argument("--max-tokens", type=int, default=64, help="answer length cap in tokens (default 64)")
    endpoint.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (1-64, default 4)")
    endpoint.add_argument("--max-retries", type=int, default=5, help="retries on 429/5xx/timeouts (default 5)")
    endpoint.add_argument("--backoff-s", type=float, default=2.0, help="first retry wait in seconds, doubled each time")
    endpoint.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout in seconds")
    scoring = parser.add_argument_group("scoring (score_answers.py)")
    scoring.add_argument("--group-regex", default=None, metavar="RE", help="patients, as in inference.py")
    scoring.add_argument("--group-from-folder", action="store_true",
                         help="patients are the folders under the class folders, as in inference.py")
    scoring.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    scoring.add_argument("--no-score", action="store_true", help="collect the answers, do not score")
    args = parser.parse_args(argv)
    cli.refuse_conflicting_spellings(parser, argv if argv is not None else sys.argv[1:])
    if not args.dry_run and not (args.base_url and args.model):
        parser.error("give --base-url and --model (or --dry-run to only write the requests)")
    if args.group_regex is not None and args.group_from_folder:
        parser.error("--group-from-folder and --group-regex both name patients; give one of them")
    if args.group_regex is not None and patients.group_regex_problem(args.group_regex):
        parser.error(patients.group_regex_problem(args.group_regex))  # before any request is sent
    if not 1 <= args.concurrency <= 64:
        parser.error(f"--concurrency must be in 1..64, got {args.concurrency}")
    if args.max_retries < 0 or args.backoff_s < 0 or args.timeout_s <= 0:
        parser.error("--max-retries and --backoff-s must be >= 0, --timeout-s > 0")
    return args


def privacy_notice(args, planned):
    images = len({item.path for item in planned})
    return (f"will send {len(planned)} requests ({images} images re-encoded as PNG without EXIF or "
            f"file names, the rendered prompt texts, model {args.model!r}, temperature "
            f"{args.temperature}, seed {args.seed}) to {args.base_url}")


def api_key(args):
    """The key to send: a loopback server gets one only when --api-key-env names it (a hosted
    key such as OPENAI_API_KEY, set for other work, must not leave for a local process that may
    log it); a remote one the variable's value, required."""
    local = runner.is_local_host(args.base_url)
    if local and args.api_key_env is None:
        return "not-needed"  # local servers ignore it, the client insists on one
    name = args.api_key_env or DEFAULT_API_KEY_ENV
    key = os.environ.get(name)
    if key:
        return key
    raise ValueError(f"--api-key-env {name}: the environment variable is not set")


def score(args, step_set, files, output_dir):
    """score_answers.py on the answer files, steps in order (the sequential report)."""
    from orbital_clip import answers  # imported late: it loads torch
    label_map = output_dir / "label_map.json"
    outputs.atomic_write_json(label_map, step_set.label_map)
    argv = ["--test-dir", str(args.test_dir), "--predictions", f"{files[0][0]}={files[0][1]}",
            "--label-map", str(label_map), "--classes", *step_set.classes,
            "--out-dir", str(output_dir / "report"), "--overwrite", "--bootstrap", str(args.bootstrap)]
    if len(files) > 1:
        argv += ["--compare", *[f"{name}={path}" for name, path in files[1:]]]
    if args.group_regex:
        argv += ["--group-regex", args.group_regex]
    if args.group_from_folder:
        argv += ["--group-from-folder"]
    return answers.main(argv)


def run_record(argv, args, step_set):
    """args.json: the command line and every argument (outputs.run_record, as every script);
    the key's variable is named, its value never read here."""
    return outputs.run_record("ask_models.py", argv, args, run={
        "steps_file": step_set.source.removeprefix("--steps "), "model": args.model or NO_MODEL,
        "api_key_env": None if runner.is_local_host(args.base_url) and args.api_key_env is None
        else (args.api_key_env or DEFAULT_API_KEY_ENV)})


def main(argv=None) -> int:
    cli.configure_logging()
    LOG.setLevel(logging.INFO)  # configure_logging raises only the scorer's loggers to INFO
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        step_set = steps.load_steps(args.steps)
        metadata = steps.read_metadata(args.metadata) if args.metadata else {}
        images = runner.list_images(args.test_dir, step_set.classes)
        settings = {"model": args.model, "temperature": args.temperature, "seed": args.seed,
                    "max_tokens": args.max_tokens}
        planned = runner.plan_requests(step_set, images, metadata, settings)
    except (ValueError, OSError, image_io.ImageReadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_json(output_dir / "args.json", run_record(argv, args, step_set))
    runner.write_requests(output_dir / "requests.jsonl", planned)
    LOG.info("wrote %d requests (%d steps x %d images) to %s", len(planned), len(step_set.steps),
             len(images), output_dir / "requests.jsonl")
    if args.model is None:
        LOG.info("no --model: the requests carry no model and no request_sha256 (the cache key "
                 "includes the model); pass --model to see the keys a real run uses")
    if args.dry_run:
        return 0
    print(privacy_notice(args, planned), file=sys.stderr)
    if not runner.is_local_host(args.base_url) and not args.yes:
        print(f"error: --base-url {args.base_url} is not this machine; read requests.jsonl, check "
              "the approvals of docs/second-step-runner.md, then pass --yes", file=sys.stderr)
        return 2
    try:
        endpoint = client.make_client(args.base_url, api_key(args), args.timeout_s,
                                     local=runner.is_local_host(args.base_url))
    except (ValueError, client.MissingClientError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records, sent = runner.send_missing(planned, output_dir / "cache", endpoint, args.concurrency,
                                        args.max_retries, args.backoff_s)
    rows = runner.answer_rows(step_set, planned, records)
    files = runner.write_answer_files(output_dir / "answers", step_set, rows)
    summary = runner.summarise(step_set, rows, sent)
    outputs.atomic_write_json(output_dir / "summary.json", summary)
    cached = sum(1 for item in planned if records[item.key].get("from_cache"))
    LOG.info("sent %d, from the cache %d; %s", sent, cached, json.dumps(summary["steps"]))
    fatal = next((r["status"] for r in records.values() if r.get("fatal")), None)
    if fatal:
        print(f"error: {fatal.removeprefix('failed: ')} from {args.base_url}: the key (--api-key-env "
              f"{args.api_key_env or DEFAULT_API_KEY_ENV}), the access or --model {args.model!r} is wrong; stopped sending, "
              "nothing scored (rerun to send the rest)", file=sys.stderr)
        return 2
    failed = sum(step["failed"] for step in summary["steps"].values())
    if failed:
        print(f"warning: {failed} of {len(planned)} requests failed (status column of answers/, "
              "summary.json); rerun the same command to ask only them again. Until then the report "
              "counts them as failed rows (errors in intention-to-diagnose)", file=sys.stderr)
    if args.no_score:
        return 1 if failed else 0
    code = score(args, step_set, files, output_dir)
    return code or (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

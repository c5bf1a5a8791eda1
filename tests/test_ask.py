"""ask_models.py against a local OpenAI-compatible server started here on 127.0.0.1 (never any
other address): prompts, dry run, cache, resume after a kill, retries, refusals, privacy, scoring."""

import base64
import csv
import io
import json
import random
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from demo import make_demo_cohort
from orbital_clip.ask import cache, cli, client, runner, steps
from orbital_clip import scoring

pytest.importorskip("openai")

SUBTYPES = ("thyroid eye disease", "orbital inflammation", "orbital tumour")
REPO = Path(__file__).resolve().parents[1]


def write_cohort(root, patients_per_subtype=2):
    """A demo-like subtype cohort (two eyes per patient) and its metadata CSV; one image carries
    EXIF (a camera make and a GPS-like comment) that must never be sent."""
    rng, rows = random.Random(0), []
    for s, subtype in enumerate(SUBTYPES):
        for p in range(s * patients_per_subtype, (s + 1) * patients_per_subtype):
            for eye in ("left", "right"):
                rel = f"{subtype}/{subtype.replace(' ', '_')}_P{p:02d}_{eye}.jpg"
                (root / subtype).mkdir(parents=True, exist_ok=True)
                exif = Image.Exif()
                exif[0x010F] = "SecretCameraMaker"
                make_demo_cohort.draw_eye(0, rng).save(root / rel, quality=85, exif=exif.tobytes())
                rows.append({"path": rel, "age": 30 + p, "sex": "F" if p % 2 else "M",
                             "race": "" if p == 0 else "White", "symptoms": f"proptosis {eye}"})
    meta = root.parent / "meta.csv"
    with open(meta, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return meta, [r["path"] for r in rows]


class Server:
    """Deterministic answers (a hash of the request picks an option, a synonym or a refusal);
    `plan` maps the n-th received request (1-based) to 429, 500, 'stall', 'malformed' or 'block'."""

    def __init__(self, plan=None, delay_s=0.0):
        self.plan, self.delay_s, self.lock = plan or {}, delay_s, threading.Lock()
        self.received, self.answered, self.bodies, self.keys = 0, {}, [], []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with server.lock:
                    server.received += 1
                    n = server.received
                    server.bodies.append(raw)
                    server.keys.append(self.headers.get("Authorization"))
                action = server.plan.get(n)
                if action == "block":
                    server.release.wait(30)
                    return
                if action == "stall":
                    time.sleep(1.0)  # past the client's --timeout-s: the client has given up
                    return
                if action in (400, 401, 429, 500):
                    return self.reply(action, {"error": {"message": "try later"}})
                if isinstance(action, tuple):  # (status, headers)
                    return self.reply(action[0], {"error": {"message": "try later"}}, action[1])
                time.sleep(server.delay_s)
                key = cache.request_key(body)
                if action == "malformed":
                    return self.reply(200, {"choices": []})
                with server.lock:
                    server.answered[key] = server.answered.get(key, 0) + 1
                self.reply(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer_for(key)}}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}})

            def reply(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()


def answer_for(key):
    choices = [*SUBTYPES, "TED", "Orbital Mass.", "I cannot determine the diagnosis."]
    return choices[int(key[:8], 16) % len(choices)]


@pytest.fixture
def cohort(tmp_path):
    root = tmp_path / "cohort"
    meta, paths = write_cohort(root)
    return root, meta, paths


@pytest.fixture
def server():
    made = []
    def start(**kwargs):
        made.append(Server(**kwargs))
        return made[-1]
    yield start
    for s in made:
        s.close()


def run_args(root, meta, out, url, *extra):
    return ["--test-dir", str(root), "--metadata", str(meta), "--out-dir", str(out),
            "--base-url", url, "--model", "local-vlm", "--backoff-s", "0.01", "--timeout-s", "0.5",
            "--bootstrap", "50", "--group-regex", r"_(P\d+)_", *extra]


def test_render_prompt_fills_columns_and_names_missing_ones():
    step_set = steps.load_steps(steps.PAPER_STEPS)
    assert [s.name for s in step_set.steps] == ["image", "image+demographics", "image+demographics+symptoms"]
    text = steps.render_prompt(step_set, step_set.steps[1], "a.jpg", {"age": "41", "sex": "F", "race": ""})
    assert "41 years old, sex F, race not stated." in text
    assert "thyroid eye disease, orbital inflammation, orbital tumour" in text
    with pytest.raises(steps.StepFileError, match=r"image 'a.jpg'.*'symptoms'"):
        steps.render_prompt(step_set, step_set.steps[2], "a.jpg", {"age": "41", "sex": "F", "race": "x"})


def test_dry_run_writes_three_steps_for_every_image_and_sends_nothing(cohort, tmp_path, server):
    root, meta, paths = cohort
    s = server()
    out = tmp_path / "dry"
    assert cli.main(run_args(root, meta, out, s.url, "--dry-run")) == 0
    lines = [json.loads(l) for l in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * len(paths) and s.received == 0
    assert {(l["step"], l["path"]) for l in lines} == {(st, p) for st in
            ["image", "image+demographics", "image+demographics+symptoms"] for p in paths}
    assert not (out / "answers").exists()


def test_missing_metadata_is_an_error_naming_image_and_column(cohort, tmp_path, capsys):
    root, meta, paths = cohort
    text = meta.read_text().replace(",proptosis left\n", ",\n", 1)
    meta.write_text(text)
    assert cli.main(run_args(root, meta, tmp_path / "o", "http://127.0.0.1:9/v1", "--dry-run")) == 2
    assert "needs metadata column 'symptoms'" in capsys.readouterr().err


@pytest.mark.slow
def test_full_run_retries_privacy_and_report_matches_scoring_by_hand(cohort, tmp_path, server):
    root, meta, paths = cohort
    s = server(plan={1: 429, 2: 500, 3: "stall", 4: "malformed"})
    out = tmp_path / "run"
    assert cli.main(run_args(root, meta, out, s.url, "--concurrency", "1")) == 1  # a failed request
    summary = json.loads((out / "summary.json").read_text())
    failed = sum(st["failed"] for st in summary["steps"].values())
    assert failed == 1  # the malformed answer (not retried, not cached)
    assert sum(st["refusals"] for st in summary["steps"].values()) == 0
    assert sum(st["unmapped"] for st in summary["steps"].values()) >= 1  # "I cannot determine..."
    for raw in s.bodies:  # no path, file name or EXIF leaves the machine
        text = re.sub(rb"base64,[A-Za-z0-9+/=]+", b"", raw)  # base64 may spell anything by chance
        assert b"P00" not in text and b"jpg" not in text and b"cohort" not in text
        for part in json.loads(raw)["messages"][-1]["content"]:
            if part["type"] == "image_url":
                png = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                assert b"SecretCameraMaker" not in png and not Image.open(io.BytesIO(png)).getexif()
    body = json.loads(s.bodies[-1])
    assert body["temperature"] == 0.0 and body["seed"] == 2024
    # rerun: only the malformed one is asked again; then the report equals scoring by hand
    received = s.received
    assert cli.main(run_args(root, meta, out, s.url)) == 0
    assert s.received == received + 1 and all(v == 1 for v in s.answered.values())
    files = sorted((out / "answers").glob("*.csv"))
    by_hand = tmp_path / "by_hand"
    assert scoring.main(["--test-dir", str(root), "--predictions", f"image={files[0]}", "--compare",
                         f"image+demographics={files[1]}", f"image+demographics+symptoms={files[2]}",
                         "--label-map", str(out / "label_map.json"), "--classes", ",".join(SUBTYPES),
                         "--out-dir", str(by_hand), "--bootstrap", "50", "--group-regex", r"_(P\d+)_"]) == 0
    for name in ("sequential.csv", "sequential_changes.csv", "predictions.csv"):
        assert (out / "report" / name).read_bytes() == (by_hand / name).read_bytes()


@pytest.mark.slow
def test_changed_prompt_is_a_new_request_and_cache_is_reused(cohort, tmp_path, server):
    root, meta, paths = cohort
    s = server()
    out = tmp_path / "run"
    assert cli.main(run_args(root, meta, out, s.url, "--no-score")) == 0
    assert s.received == 3 * len(paths)
    assert cli.main(run_args(root, meta, out, s.url, "--no-score")) == 0
    assert s.received == 3 * len(paths)  # everything from the cache
    meta.write_text(meta.read_text().replace("proptosis", "diplopia"))
    assert cli.main(run_args(root, meta, out, s.url, "--no-score")) == 0
    assert s.received == 4 * len(paths)  # only the symptoms step changed


def test_non_local_host_needs_yes(cohort, tmp_path, capsys):
    root, meta, _paths = cohort
    assert cli.main(run_args(root, meta, tmp_path / "o", "https://api.example.com/v1")) == 2
    err = capsys.readouterr().err
    assert "to https://api.example.com/v1" in err and "--yes" in err
    assert runner.is_local_host("http://localhost:8000/v1") and not runner.is_local_host("http://10.0.0.1/v1")


@pytest.mark.slow
def test_resume_after_kill_sends_each_request_once(cohort, tmp_path, server):
    root, meta, paths = cohort
    total = 3 * len(paths)
    s = server(plan={total // 2: "block"})
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "ask_models.py", *run_args(root, meta, out, s.url, "--concurrency", "1",
                             "--timeout-s", "30", "--no-score")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while s.received < total // 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    assert sum(s.answered.values()) == total // 2 - 1
    assert cli.main(run_args(root, meta, out, s.url, "--no-score")) == 0
    assert len(s.answered) == total and all(v == 1 for v in s.answered.values())
    assert s.received == total + 1  # the one blocked when the run was killed, asked again


def test_retry_after_is_honoured(server):
    s = server(plan={1: (429, {"Retry-After": "3"}), 2: (503, {"retry-after-ms": "1500"})})
    endpoint = client.make_client(s.url, "not-needed", 5)
    waits = []
    request = client.build_request("m", "", "hi", "data:image/png;base64,AAAA", 0.0, 1, 8)
    record = client.send_with_retries(endpoint, request, 3, 0.01, sleep=waits.append)
    assert record["status"] == "ok" and record["attempts"] == 3
    assert waits == [3.0, 1.5]  # the server's wait, not the 0.01 s backoff


def test_wrong_key_stops_sending_and_scores_nothing(cohort, tmp_path, server, capsys):
    root, meta, paths = cohort
    s = server(plan={1: 401})
    out = tmp_path / "run"
    assert cli.main(run_args(root, meta, out, s.url, "--concurrency", "1")) == 2
    assert s.received == 1  # not every image of the cohort uploaded to a host that refused the key
    assert "HTTP 401" in capsys.readouterr().err and not (out / "report").exists()
    assert cli.main(run_args(root, meta, out, s.url, "--no-score")) == 0  # the rerun sends the rest
    assert s.received == 1 + 3 * len(paths)


def test_a_failed_request_is_reported_and_the_exit_code_says_so(cohort, tmp_path, server, capsys):
    root, meta, paths = cohort
    s = server(plan={1: 400})
    assert cli.main(run_args(root, meta, tmp_path / "run", s.url, "--no-score")) == 1
    n = 3 * len(paths)
    err = capsys.readouterr().err
    assert f"1 of {n} requests failed" in err
    assert f"sent {n}, from the cache 0" in err  # the runner's own log lines are shown  # the runner's own log lines are shown


def test_icc_profile_text_does_not_leave_the_machine(tmp_path):
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes() + b"MRN-12345 Jane Doe"
    Image.new("RGB", (32, 24), (120, 80, 60)).save(tmp_path / "a.jpg", icc_profile=icc)
    png = base64.b64decode(client.encode_image(tmp_path / "a.jpg").split(",", 1)[1])
    assert b"iCCP" not in png and not Image.open(io.BytesIO(png)).info.get("icc_profile")


def test_a_local_base_url_ignores_the_proxy_environment(cohort, tmp_path, server, monkeypatch):
    root, meta, paths = cohort
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a closed port: a proxied request fails
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    s = server()
    assert cli.main(run_args(root, meta, tmp_path / "run", s.url, "--no-score", "--max-retries", "0")) == 0
    assert s.received == 3 * len(paths)


def test_args_json_records_the_run_and_a_dry_run_without_model_hashes_no_placeholder(cohort, tmp_path):
    """issue 31 leftovers: ask_models.py writes args.json (outputs.run_record, as every script);
    --dry-run without --model records 'no model' and no request_sha256, never the hash of a
    made-up model name that no real run would send."""
    root, meta, _paths = cohort
    out = tmp_path / "dry"
    argv = ["--test-dir", str(root), "--metadata", str(meta), "--out-dir", str(out), "--dry-run"]
    assert cli.main(argv) == 0
    record = json.loads((out / "args.json").read_text())
    assert record["script"] == "ask_models.py" and record["argv"] == argv
    assert record["run"]["model"] == cli.NO_MODEL and record["args"]["model"] is None
    lines = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert lines and all(l["request_sha256"] is None and l["request"]["model"] is None for l in lines)
    with_model = tmp_path / "named"
    assert cli.main([*argv[:-3], "--out-dir", str(with_model), "--dry-run", "--model", "m"]) == 0
    keys = [json.loads(l)["request_sha256"] for l in (with_model / "requests.jsonl").read_text().splitlines()]
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)


def test_a_hosted_key_in_the_environment_is_not_sent_to_a_loopback_server_unless_asked(
        cohort, tmp_path, server, monkeypatch):
    root, meta, _paths = cohort
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hosted-secret")
    s = server()
    assert cli.main(run_args(root, meta, tmp_path / "a", s.url, "--no-score")) == 0
    assert s.keys and not any("sk-hosted-secret" in (k or "") for k in s.keys)
    t = server()
    assert cli.main(run_args(root, meta, tmp_path / "b", t.url, "--no-score",
                             "--api-key-env", "OPENAI_API_KEY")) == 0
    assert t.keys and all(k == "Bearer sk-hosted-secret" for k in t.keys)
    record = json.loads((tmp_path / "b" / "args.json").read_text())
    assert record["run"]["api_key_env"] == "OPENAI_API_KEY" and "sk-hosted" not in json.dumps(record)


def test_group_from_folder_reaches_the_scorer_and_is_refused_with_a_regex(tmp_path, monkeypatch, capsys):
    from orbital_clip import answers
    seen = []
    monkeypatch.setattr(answers, "main", lambda argv: seen.append(argv) or 0)
    args = cli.parse_args(["--test-dir", "t", "--out-dir", str(tmp_path), "--dry-run", "--group-from-folder"])
    step_set = steps.load_steps(steps.PAPER_STEPS)
    assert cli.score(args, step_set, [("image", tmp_path / "a.csv")], tmp_path) == 0
    assert seen[0][-1] == "--group-from-folder"
    with pytest.raises(SystemExit):
        cli.parse_args(["--test-dir", "t", "--out-dir", "o", "--dry-run", "--group-from-folder",
                        "--group-regex", "(P)"])
    assert "--group-from-folder and --group-regex" in capsys.readouterr().err


def test_an_invalid_group_regex_is_refused_before_any_request(capsys):
    """patients.group_regex_problem, the one rule: ask_models refused it only when scoring, after
    every request had been sent."""
    for regex, said in (("(", "not a valid regular expression"), ("P\\d+", "capture group")):
        with pytest.raises(SystemExit) as done:
            cli.parse_args(["--test-dir", "t", "--out-dir", "o", "--dry-run", "--group-regex", regex])
        assert done.value.code == 2 and said in capsys.readouterr().err

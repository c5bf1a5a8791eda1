"""The second step's runner on the synthetic subtype cohort (issue 31's 'must show'): --dry-run
writes the paper's three steps' prompts for every orbital image, each naming that patient's own
metadata, and sends nothing."""
import csv
import json
import subprocess
import sys

from conftest import REPO_ROOT

import ask_models


def test_dry_run_on_the_subtype_demo_writes_every_step_for_every_image(tmp_path):
    cohort, metadata = tmp_path / "subtypes", tmp_path / "metadata.csv"
    subprocess.run([sys.executable, str(REPO_ROOT / "demo" / "make_subtype_demo.py"), "--out", str(cohort),
                    "--metadata", str(metadata)], check=True, capture_output=True)
    assert ask_models.main(["--test-dir", str(cohort), "--metadata", str(metadata),
                            "--out-dir", str(tmp_path / "ask"), "--dry-run"]) == 0
    requests = [json.loads(line) for line in (tmp_path / "ask" / "requests.jsonl").read_text().splitlines()]
    images = sorted(p.relative_to(cohort).as_posix() for p in cohort.rglob("*.jpg"))
    assert len(images) == 36
    steps = ["image", "image+demographics", "image+demographics+symptoms"]
    assert sorted((r["step"], r["path"]) for r in requests) == sorted((s, i) for s in steps for i in images)
    with open(metadata, newline="", encoding="utf-8") as handle:
        rows = {row["path"]: row for row in csv.DictReader(handle)}
    for request in requests:
        text = request["request"]["messages"][-1]["content"][0]["text"]
        row = rows[request["path"]]
        shows_demographics = request["step"] != "image"
        assert (f"{row['age']} years old" in text) == shows_demographics
        assert (row["symptoms"] in text) == (request["step"] == "image+demographics+symptoms")
        if shows_demographics:  # a blank race is declared "not stated" by the step file
            assert f"race {row['race'] or 'not stated'}" in text
        assert request["path"] not in json.dumps(request["request"])  # no file name leaves the machine
    assert not (tmp_path / "ask" / "answers").exists()  # nothing was sent

"""Plan every request of every step, write them to requests.jsonl, send the ones the cache lacks
(bounded concurrency), and write the answers as the CSVs that answer-file scoring reads."""

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import ipaddress
import json
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

from orbital_clip import cohort
from orbital_clip import outputs
from orbital_clip import prompts as prompt_sets
from orbital_clip.ask import cache, client, steps

ANSWER_COLUMNS = ["path", "answer", "mapped_label", "status", "refusal", "prompt_tokens",
                  "completion_tokens", "latency_s", "request_sha256"]


@dataclasses.dataclass
class PlannedRequest:
    step: str
    path: str  # relative to the cohort root; stays on this machine (never in `request`)
    key: str | None  # sha256 of the canonical request JSON; None without a model (a dry run)
    request: dict


def list_images(test_dir, classes):
    """[(relative path, file)] of every image under test_dir/<class>/, classes in step-file order."""
    items, _unknown = cohort.list_class_folder_images(test_dir, classes)
    if not items:
        raise steps.StepFileError(f"--test-dir {test_dir}: no images under the step file's class "
                                  f"folders {classes}")
    return [(Path(path).relative_to(test_dir).as_posix(), Path(path)) for path, _label in items]


def plan_requests(step_set, images, metadata, settings):
    """Every (step, image) request in step order, then cohort order. Prompts are rendered for
    every image before any is encoded, so a missing metadata cell stops the run before work."""
    texts = [(step, rel, file, steps.render_prompt(step_set, step, rel, metadata.get(rel)))
             for step in step_set.steps for rel, file in images]
    urls, planned = {}, []
    for step, rel, file, text in texts:
        if rel not in urls:
            urls[rel] = client.encode_image(file)
        request = client.build_request(settings["model"], step_set.system, text, urls[rel],
                                       settings["temperature"], settings["seed"], settings["max_tokens"])
        # no model (a dry run): no key, rather than the hash of a request no run will send
        key = cache.request_key(request) if settings["model"] else None
        planned.append(PlannedRequest(step.name, rel, key, request))
    return planned


def readable_request(request):
    """The request with each image data URL shortened to its size and sha256 (for reading)."""
    text = cache.canonical_json(request)
    def shorten(match):
        data = match.group(0)
        return f"data:image/png;base64,<{len(data)} characters, sha256 {hashlib.sha256(data.encode()).hexdigest()[:16]}>"
    return json.loads(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", shorten, text))


def write_requests(path, planned):
    """requests.jsonl: one line per request (step, image path kept locally, key, the request)."""
    buffer = io.StringIO()
    for item in planned:
        buffer.write(json.dumps({"step": item.step, "path": item.path, "request_sha256": item.key,
                                 "request": readable_request(item.request)}, ensure_ascii=False) + "\n")
    outputs.atomic_write_text(path, buffer.getvalue())


def is_local_host(base_url):
    """True for localhost and loopback addresses (a local vLLM, Ollama, LM Studio, llama.cpp)."""
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def send_missing(planned, cache_dir, endpoint, concurrency, max_retries, backoff_s):
    """{key: record} for every request: from the cache, else sent (at most `concurrency` at
    once); each answer is cached as it arrives. A 401/403/404 (wrong key, access or model) stops
    the run: the requests not yet sent are failed rows 'not sent'. Returns (records, number sent)."""
    records, todo = {}, {}
    for item in planned:
        cached = cache.load_cached(cache_dir, item.key)
        if cached is not None:
            records[item.key] = {**cached, "from_cache": True}
        else:
            todo.setdefault(item.key, item)  # the same request twice is sent once
    stop = threading.Event()  # set by a 401/403/404: no further image leaves the machine
    def ask(item):
        if stop.is_set():
            return item.key, {"status": "failed: not sent (the run stopped on an earlier error)",
                              "attempts": 0, "latency_s": 0, "not_sent": True}
        record = client.send_with_retries(endpoint, item.request, max_retries, backoff_s)
        if record.get("fatal"):
            stop.set()
        if record["status"] == "ok":
            cache.store(cache_dir, item.key, record)
        return item.key, record
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for key, record in pool.map(ask, todo.values()):
            records[key] = {**record, "from_cache": False}
    return records, sum(1 for key in todo if not records[key].get("not_sent"))


def answer_rows(step_set, planned, records):
    """{step: [row]} of the answer CSVs: the raw answer beside the label or declared outcome it
    maps to (the scorer's rule, prompts.map_answer through the step file's parsed label map and
    outcomes), or '' when it maps to none."""
    rows = collections.defaultdict(list)
    for item in planned:
        record = records[item.key]
        answer = record.get("answer", "")
        rows[item.step].append({
            "path": item.path, "answer": answer,
            "mapped_label": (prompt_sets.map_answer(answer, step_set.lookup) or "") if record["status"] == "ok" else "",
            "status": record["status"], "refusal": int(bool(record.get("refusal"))),
            "prompt_tokens": record.get("prompt_tokens", 0),
            "completion_tokens": record.get("completion_tokens", 0),
            "latency_s": record.get("latency_s", 0), "request_sha256": item.key})
    return rows


def answer_file_name(index, name):
    return f"step{index + 1}_" + (re.sub(r"[^\w.+-]+", "_", name).strip("_") or "answers") + ".csv"


def write_answer_files(answers_dir, step_set, rows):
    """One CSV per step; returns [(step name, file)] in step order."""
    answers_dir = Path(answers_dir)
    answers_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for index, step in enumerate(step_set.steps):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ANSWER_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[step.name])
        path = answers_dir / answer_file_name(index, step.name)
        outputs.atomic_write_text(path, buffer.getvalue())
        files.append((step.name, path))
    return files


def summarise(step_set, rows, sent):
    """Counts per step: answered, failed, refusals, unmapped answers, tokens, latency."""
    summary = {"requests": sum(len(r) for r in rows.values()), "sent_this_run": sent, "steps": {}}
    for step in step_set.steps:
        step_rows = rows[step.name]
        ok = [r for r in step_rows if r["status"] == "ok"]
        latencies = [float(r["latency_s"]) for r in ok]
        summary["steps"][step.name] = {
            "images": len(step_rows), "answered": len(ok), "failed": len(step_rows) - len(ok),
            "refusals": sum(r["refusal"] for r in ok),
            "unmapped": sum(1 for r in ok if not r["mapped_label"]),
            "prompt_tokens": sum(int(r["prompt_tokens"]) for r in ok),
            "completion_tokens": sum(int(r["completion_tokens"]) for r in ok),
            "latency_s_mean": round(sum(latencies) / len(latencies), 3) if latencies else None,
            "latency_s_max": max(latencies) if latencies else None}
    return summary

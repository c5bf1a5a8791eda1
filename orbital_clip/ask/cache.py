"""The request cache: one JSON file per answered request, named by the sha256 of the request's
canonical JSON, so a repeated or interrupted run sends only what is missing and a changed prompt
(or image, model, temperature, seed) is a new request."""

import hashlib
import json
from pathlib import Path

from orbital_clip import outputs


def canonical_json(request):
    """The one serialisation a key is computed on (sorted keys, no spaces)."""
    return json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(request):
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


def cache_path(cache_dir, key):
    return Path(cache_dir) / key[:2] / f"{key}.json"


def load_cached(cache_dir, key):
    """The stored answer record of `key`, or None (a torn or unreadable file counts as missing)."""
    try:
        return json.loads(cache_path(cache_dir, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(cache_dir, key, record):
    """Written atomically as soon as an answer arrives: a kill loses at most the requests in flight."""
    path = cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.atomic_write_json(path, record)

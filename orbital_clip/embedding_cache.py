"""The image-embedding cache of inference.py --cache-dir: re-analysis (other prompts, thresholds,
bootstrap sizes) without re-encoding. Keys and files only; the model that fills it is scoring's.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from orbital_clip import outputs

LOG = logging.getLogger("inference")  # a part of the inference.py command, logged as such
CACHE_VERSION = 1  # bump when what a cached embedding means changes


def cache_model_key(weights_id, model_name, preprocess, precision, extra=None):
    """Hex key of what an image embedding depends on besides the image: the weights (checkpoint
    SHA-256, pretrained tag, WiSE-FT mix), architecture, preprocessing and precision."""
    description = json.dumps({"version": CACHE_VERSION, "weights": weights_id, "model": model_name,
                              "preprocess": repr(preprocess), "precision": precision,
                              "extra": extra}, sort_keys=True)
    return hashlib.sha256(description.encode("utf-8")).hexdigest()


def image_cache_key(path):
    """Hex key of one image file: its resolved path, size and modification time (a changed or
    replaced file gets a new key; no file name is stored in the cache)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    text = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_cache(path):
    """{image key: (embedding (D,) float32, reason or '')} from a cache file ({} if none)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, features, reasons = data["keys"], data["features"], data["reasons"]
    except (OSError, ValueError, KeyError) as err:
        LOG.warning("embedding cache %s unreadable (%s); re-encoding", path, err)
        return {}
    return {str(k): (features[i], str(reasons[i])) for i, k in enumerate(keys)}


def write_cache(path, entries):
    """Write {key: (embedding, reason)} atomically as .npz (no pickled objects)."""
    keys = sorted(entries)
    features = np.stack([entries[k][0] for k in keys]).astype(np.float32)
    reasons = np.array([entries[k][1] for k in keys], dtype=str)
    outputs.atomic_write(path, lambda handle: np.savez(handle, keys=np.array(keys, dtype=str),
                                                      features=features, reasons=reasons))

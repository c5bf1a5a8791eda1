"""The leakage audit: exact duplicates (SHA-256) and near-duplicates (64-bit perceptual hashes,
confirmed by 256-bit ones), the pairs found, their table and their warnings."""

import numpy as np
import pandas as pd

from orbital_clip.split.records import DUPLICATES_NAME, LOG

# Re-encoded or resized copies of a photograph differ by 0-2 bits of a 64-bit pHash, brightness
# and contrast edits by 2-4; unrelated standardised eye photographs can be as close as 0-4 bits,
# hence the confirmation by a 256-bit pHash within FINE_BITS_PER_BIT * N + FINE_EXTRA_BITS bits
# (measured on the synthetic demo cohort: edited copies <= 16, distinct photographs >= 30).
NEAR_DUP_DISTANCE = 4
FINE_BITS_PER_BIT, FINE_EXTRA_BITS = 4, 8
PHASH_SIDE_PX = 128  # box-reduce to about this side before hashing (pHash looks at 32-64 px)
HAMMING_BLOCK_ELEMENTS = 1 << 22  # pairs compared per vectorised block (bounds the memory used)
POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
DUPLICATE_COLUMNS = ["path", "duplicate_of", "kind", "distance", "same_label"]


def perceptual_hashes(image):
    """(64-bit, 256-bit) DCT perceptual hashes (imagehash.phash) of a PIL image, as bytes."""
    import imagehash
    grey = image.convert("L")
    factor = min(grey.size) // PHASH_SIDE_PX
    if factor >= 2:  # box-average first: the same hash up to rounding, far faster on photographs
        grey = grey.reduce(factor)
    coarse = imagehash.phash(grey, hash_size=8)
    fine = imagehash.phash(grey, hash_size=16)
    return np.packbits(coarse.hash.ravel()).tobytes(), np.packbits(fine.hash.ravel()).tobytes()


def hash_matrix(hashes):
    """(n, words) uint64 matrix of equal-length hash byte strings (8 bytes per word)."""
    if not hashes:
        return np.zeros((0, 1), dtype=np.uint64)
    data = np.frombuffer(b"".join(hashes), dtype=">u8").astype(np.uint64)
    return data.reshape(len(hashes), -1)


def popcount(words):
    """Set bits of each uint64 (same shape)."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words)
    as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*words.shape, 8)
    return POPCOUNT8[as_bytes].sum(axis=-1)


def hamming_distances(a, b):
    """(m, n) bit distances between the rows of (m, w) and (n, w) uint64 hash matrices."""
    return popcount(a[:, None, :] ^ b[None, :, :]).sum(axis=-1, dtype=np.int64)


def near_duplicate_pairs(coarse, fine, max_distance):
    """(i, j, distance) with i < j for images whose 64-bit pHashes (`coarse`, bytes) differ in
    at most max_distance bits and whose 256-bit pHashes (`fine`) in at most
    FINE_BITS_PER_BIT * max_distance + FINE_EXTRA_BITS; distance is the 64-bit one.

    All pairs are compared, vectorised in row blocks (~0.6 s for 10,000 images); [] when
    max_distance is 0.
    """
    n = len(coarse)
    if max_distance <= 0 or n < 2:
        return []
    fine_limit = FINE_BITS_PER_BIT * max_distance + FINE_EXTRA_BITS
    a, b = hash_matrix(coarse), hash_matrix(fine)
    rows_per_block = max(1, HAMMING_BLOCK_ELEMENTS // (n * a.shape[1]))
    pairs = []
    for start in range(0, n, rows_per_block):
        distance = hamming_distances(a[start:start + rows_per_block], a)  # (rows, n)
        rows, cols = np.nonzero(distance <= max_distance)
        upper = cols > rows + start
        rows, cols = rows[upper], cols[upper]
        confirmed = popcount(b[rows + start] ^ b[cols]).sum(axis=-1) <= fine_limit
        pairs += [(int(r) + start, int(c), int(distance[r, c]))
                  for r, c in zip(rows[confirmed], cols[confirmed])]
    return pairs


def find_duplicates(digests, coarse, fine, max_distance):
    """Duplicate pairs (index, index of the earlier image it duplicates, kind, distance).

    exact: same SHA-256; every later copy is paired with the first (distance 0).
    near: `near_duplicate_pairs` among the first copies of each distinct content.
    """
    first, pairs = {}, []
    for index, digest in enumerate(digests):
        if digest in first:
            pairs.append((index, first[digest], "exact", 0))
        else:
            first[digest] = index
    unique = sorted(first.values())
    for i, j, distance in near_duplicate_pairs([coarse[k] for k in unique],
                                               [fine[k] for k in unique], max_distance):
        pairs.append((unique[j], unique[i], "near", distance))
    return pairs


def duplicates_table(records, pairs):
    """duplicates.csv rows for `find_duplicates` pairs, sorted by kind, path, duplicate_of."""
    rows = [{"path": records[j].source, "duplicate_of": records[i].source, "kind": kind,
             "distance": distance, "same_label": records[i].label == records[j].label}
            for j, i, kind, distance in pairs]
    frame = pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)
    return frame.sort_values(["kind", "path", "duplicate_of"], kind="stable").reset_index(drop=True)


def report_duplicates(records, pairs, folders):
    """Log the leakage audit; every pair with conflicting labels gets its own WARNING line.
    Returns the number of conflicting pairs."""
    conflicts = 0
    for j, i, kind, distance in pairs:
        a, b = records[i], records[j]
        if a.label != b.label:
            conflicts += 1
            LOG.warning("CONFLICTING LABELS: %r (%s) and %r (%s) are %s duplicates (pHash "
                        "distance %d); kept in one split, but one of the labels is probably wrong",
                        a.source, folders[a.label], b.source, folders[b.label], kind, distance)
    n_exact = sum(kind == "exact" for _, _, kind, _ in pairs)
    if pairs:
        LOG.warning("leakage audit: %d exact duplicate(s) and %d near-duplicate pair(s), kept "
                    "together in one split (see %s)", n_exact, len(pairs) - n_exact,
                    DUPLICATES_NAME)
    return conflicts

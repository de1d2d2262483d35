"""Corpus-wide deduplication whose memory does not grow with the corpus text.

Exact dedup runs in two phases because documents are processed by many workers and Slurm
tasks ("units"): each unit writes the 16-byte hashes of its documents (`write_hashes`), then
one merge step (`find_exact_duplicates`) reads all hash files bucket by bucket and marks every
document whose hash already occurred earlier in canonical order (unit 0, 1, ...; then row).

Near dedup (optional) keeps MinHash signatures in an LSH index, whose memory grows with the
number of documents.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
from pathlib import Path

import numpy as np
import xxhash

# Big-endian halves: numeric order of (hi, lo) is the byte order of the digest, and the top
# bits of `hi` are its first bytes, so a bucket (a range of `hi`) is one contiguous slice.
HASH_DTYPE = np.dtype([("hi", ">u8"), ("lo", ">u8"), ("row", "<u4")])
DIGEST_DTYPE = np.dtype([("hi", ">u8"), ("lo", ">u8")])
HASH_BYTES = 16
HASH_NAME = "xxh3_128"  # in the units' plan: hash files of another hash are redone
# datasketch 2.0's bias-free affine scheme with 64-bit values (its default, affine32, stores uint32).
MINHASH_SCHEME = "affine64"


def text_hash(text: str) -> bytes:
    """16-byte XXH3-128 digest of the UTF-8 text: collisions are negligible (2^-64 at 2^32 documents).

    A non-cryptographic hash is enough against accidental collisions (datatrove's dedup uses
    xxhash too) and runs ~10x faster than blake2b: the docs workers hash every document."""
    return utf8_hash(text.encode("utf-8"))


def utf8_hash(utf8: bytes) -> bytes:
    """`text_hash` of a text already encoded (as the docs workers hold it, sliced from Arrow)."""
    return xxhash.xxh3_128_digest(utf8)


def write_hashes(path: Path, hashes: list[bytes]) -> None:
    """Save one unit's hashes (index = row in the unit's document order) sorted by hash, with their row."""
    if len(hashes) >= 2**32:
        raise ValueError(f"{len(hashes)} documents in one unit: rows are stored as uint32")
    halves = np.frombuffer(b"".join(hashes), dtype=DIGEST_DTYPE)
    table = np.empty(len(hashes), dtype=HASH_DTYPE)
    table["hi"], table["lo"] = halves["hi"], halves["lo"]
    table["row"] = np.arange(len(hashes), dtype=np.uint32)
    # lexsort is stable, so equal hashes keep their row order.
    table = table[np.lexsort((table["lo"], table["hi"]))]
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare path
        np.save(f, table)


def get_bucket_bounds(num_buckets: int) -> list[int]:
    """Start of each bucket in `hi` space (num_buckets + 1 values, the last one 2^64)."""
    return [(b << 64) // num_buckets for b in range(num_buckets + 1)]


def find_row_bounds(table: np.ndarray, hi_bounds: list[int]) -> list[int]:
    """Row where each `hi` bound starts in a hash-sorted table.

    A binary search reading ~log2(n) values of the memory-mapped file: np.searchsorted
    would first copy the whole strided `hi` column into memory.
    """
    column = table["hi"]
    inner = [bisect.bisect_left(column, np.uint64(bound)) for bound in hi_bounds[1:-1]]
    return [0, *inner, len(table)]


def mark_bucket(slices: list[np.ndarray], offsets: np.ndarray, drop: np.ndarray) -> None:
    """Set `drop[offset of unit + row]` for every hash in `slices` that repeats an earlier one."""
    hi = np.concatenate([s["hi"] for s in slices]).astype(np.uint64)
    lo = np.concatenate([s["lo"] for s in slices]).astype(np.uint64)
    flat_row = np.concatenate([s["row"].astype(np.int64) + offsets[unit] for unit, s in enumerate(slices)])
    # Canonical order = flat row order (units are laid out one after the other), so after
    # sorting by (hash, flat row) the first of each run of equal hashes is the one kept.
    order = np.lexsort((flat_row, lo, hi))
    hi, lo, flat_row = hi[order], lo[order], flat_row[order]
    repeats = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
    drop[flat_row[1:][repeats]] = True


# Hashes per bucket when the merge picks the number of buckets: ~60 MB of memory per bucket,
# and no more buckets than that needs (each costs a binary search and a slice per unit).
BUCKET_ROWS = 2**20


def get_num_buckets(total_rows: int) -> int:
    return max(1, -(-total_rows // BUCKET_ROWS))


def find_exact_duplicates(hash_files: list[Path], num_rows: list[int], num_buckets: int | None = None) -> list[np.ndarray]:
    """Per unit, a bool mask over its rows: True = drop, an exact duplicate of an earlier document.

    `hash_files` are in canonical order; the first occurrence (lowest unit, then lowest row)
    is kept. Peak memory is about 60 bytes x (total hashes / num_buckets) for one bucket, plus
    the masks (1 byte per document): the files are memory-mapped and read one bucket at a time.
    The result does not depend on `num_buckets` (default: `get_num_buckets`, ~1M hashes each).
    """
    if len(hash_files) != len(num_rows):
        raise ValueError(f"{len(hash_files)} hash files but {len(num_rows)} row counts")
    # Plain ndarray views of the maps: every index into a np.memmap costs ~10 us of subclass
    # hooks, and the binary searches make thousands.
    tables = [np.asarray(np.load(path, mmap_mode="r")) for path in hash_files]
    for path, table, rows in zip(hash_files, tables, num_rows):
        if len(table) > rows:
            raise ValueError(f"{path}: {len(table)} hashes for a unit of {rows} rows")
    offsets = np.concatenate([[0], np.cumsum(num_rows, dtype=np.int64)])
    drop = np.zeros(int(offsets[-1]), dtype=bool)
    num_buckets = num_buckets or get_num_buckets(int(offsets[-1]))
    hi_bounds = get_bucket_bounds(num_buckets)
    row_bounds = [find_row_bounds(table, hi_bounds) for table in tables]
    for b in range(num_buckets):
        slices = [table[bounds[b]:bounds[b + 1]] for table, bounds in zip(tables, row_bounds)]
        mark_bucket(slices, offsets, drop)
    return np.split(drop, offsets[1:-1])  # views into one array, not copies


# Odd 64-bit multiplier (2^64 / golden ratio) of the polynomial shingle hash.
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@functools.lru_cache(maxsize=8)
def get_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch draws its permutations per MinHash object; drawing them once saves that per document."""
    from datasketch import MinHash  # near dedup only: datasketch imports scipy.integrate (~1 s)

    return MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME).permutations


def get_shingle_hashes(text: str, shingle_chars: int) -> np.ndarray:
    """Distinct 64-bit hashes of the text's character n-grams (Japanese has no spaces to split words on).

    A polynomial hash of the code points mod 2^64, computed for all positions at once: one
    numpy pass per shingle character instead of a Python slice, encode and sha1 per position,
    which took half of a signature's time. It is not cryptographic, but distinct shingles of a
    document collide about as rarely as random 64-bit values. A text shorter than a shingle is
    one shingle.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = min(shingle_chars, len(codes))
    num_shingles = len(codes) - width + 1 if width else 0
    hashes = np.zeros(num_shingles, dtype=np.uint64)
    for offset in range(width):
        hashes = hashes * _SHINGLE_MULTIPLIER + codes[offset:offset + num_shingles]  # wraps mod 2^64
    return np.unique(hashes)


def minhash_signature(text: str, num_perm: int, shingle_chars: int, seed: int = 1) -> np.ndarray:
    """MinHash signature (uint64, `num_perm` values) of the text's character shingles; deterministic."""
    # The shingles are already 64-bit hashes, so datasketch's hash function is the identity
    # (`int`); its affine64 scheme pre-mixes them with the MurmurHash3 finalizer.
    from datasketch import MinHash

    minhash = MinHash(
        num_perm=num_perm, seed=seed, hashfunc=int, permutations=get_permutations(num_perm, seed), scheme=MINHASH_SCHEME
    )
    minhash.update_batch(get_shingle_hashes(text, shingle_chars).tolist())
    return minhash.hashvalues.astype(np.uint64, copy=False)


def get_jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal signature values: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.count_nonzero(a == b)) / len(a)


def compress_band(band: bytes) -> bytes:
    # LSH keys a band by its raw bytes (8 per value); 8 bytes of blake2b are as good a key.
    return hashlib.blake2b(band, digest_size=8).digest()


class NearDuplicateIndex:
    """MinHash LSH over the documents added so far (datasketch.MinHashLSH).

    Memory grows with the number of documents, not their length: every document adds one
    8-byte key per LSH band plus the Python set and dict entries holding it (measured ~2.8 KB
    per document at 128 permutations, 9 bands), and with `confirm` its signature (8 bytes per
    permutation): ~4 KB per document, 40 GB per 10M. That is why near dedup is optional.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int = 1, confirm: bool = True):
        self.threshold = threshold
        self.seed = seed
        self.confirm = confirm
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, hashfunc=compress_band)
        self.signatures: dict[str, np.ndarray] = {}

    def is_duplicate_or_add(self, key: str, signature: np.ndarray) -> bool:
        """True if an added document is a near duplicate of this one; otherwise add this one and return False.

        An LSH candidate is confirmed by its estimated Jaccard similarity (if `confirm`):
        banding also returns some pairs below the threshold.
        """
        from datasketch import LeanMinHash

        minhash = LeanMinHash(seed=self.seed, hashvalues=signature, scheme=MINHASH_SCHEME)
        candidates = self.lsh.query(minhash)
        if candidates and not self.confirm:
            return True
        if any(get_jaccard_estimate(signature, self.signatures[c]) >= self.threshold for c in candidates):
            return True
        self.lsh.insert(key, minhash)
        if self.confirm:
            self.signatures[key] = signature
        return False


def write_signatures(path: Path, signatures: list[np.ndarray]) -> None:
    """Save signatures as one uint64 array [num_docs, num_perm] (row = the unit's document order)."""
    table = np.stack(signatures).astype(np.uint64) if signatures else np.zeros((0, 0), dtype=np.uint64)
    with open(path, "wb") as f:
        np.save(f, table)


def load_signatures(path: Path) -> np.ndarray:
    """The [num_docs, num_perm] uint64 array written by `write_signatures`."""
    return np.load(path)

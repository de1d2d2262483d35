"""Exact (two-phase, bucketed) and near (MinHash LSH) dedup in data_prep/dedup.py: pure logic, fast."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xxhash

from data_prep.dedup import (
    HASH_DTYPE, NearDuplicateIndex, find_exact_duplicates, get_jaccard_estimate, load_signatures,
    minhash_signature, text_hash, write_hashes, write_signatures,
)

NEKO = Path(__file__).resolve().parents[1] / "data_prep" / "samples" / "neko.txt"


def write_units(tmp_path: Path, units: list[list[bytes]]) -> tuple[list[Path], list[int]]:
    paths = []
    for i, hashes in enumerate(units):
        paths.append(tmp_path / f"unit-{i}.hashes")
        write_hashes(paths[-1], hashes)
    return paths, [len(hashes) for hashes in units]


def reference_duplicates(units: list[list[bytes]]) -> list[list[bool]]:
    """The obvious set-based dedup in canonical order."""
    seen: set[bytes] = set()
    masks = []
    for hashes in units:
        masks.append([h in seen or seen.add(h) is not None for h in hashes])
    return masks


def find_texts(tmp_path: Path, units: list[list[str]], num_buckets: int) -> list[list[bool]]:
    paths, num_rows = write_units(tmp_path, [[text_hash(t) for t in texts] for texts in units])
    return [mask.tolist() for mask in find_exact_duplicates(paths, num_rows, num_buckets)]


# --- exact -----------------------------------------------------------------------------


def test_text_hash_is_stable_16_bytes():
    digest = text_hash("吾輩は猫である。")
    assert len(digest) == 16 and digest == text_hash("吾輩は猫である。")
    # Pinned to the spec (XXH3-128 of UTF-8, big-endian): hash files of different runs must stay comparable.
    assert digest == xxhash.xxh3_128("吾輩は猫である。".encode("utf-8")).digest()
    assert text_hash("吾輩は猫である") != digest


def test_write_hashes_sorts_by_hash_and_keeps_rows(tmp_path):
    hashes = [bytes([9] * 16), bytes([1] * 16), bytes([5] * 16), bytes([1] * 16)]
    write_hashes(tmp_path / "u.hashes", hashes)
    table = np.load(tmp_path / "u.hashes")
    assert table.dtype == HASH_DTYPE
    assert table["row"].tolist() == [1, 3, 2, 0]  # equal hashes keep their row order
    assert table["hi"][0] == int.from_bytes(bytes([1] * 8), "big")


@pytest.mark.parametrize("num_buckets", [1, 64])
def test_exact_duplicates_within_and_across_units(tmp_path, num_buckets):
    units = [["猫", "犬", "猫", "鳥"], ["犬", "魚", "魚", "猫"], [], ["鳥", "亀"]]
    assert find_texts(tmp_path, units, num_buckets) == [
        [False, False, True, False],
        [True, False, True, True],  # the earliest unit's copy is kept
        [],
        [True, False],
    ]


def test_exact_duplicates_multiple_copies_keep_only_the_first(tmp_path):
    units = [["x", "y"], ["x", "x", "x"], ["x"]]
    assert find_texts(tmp_path, units, 8) == [[False, False], [True, True, True], [True]]


def test_exact_duplicates_match_a_set_reference(tmp_path):
    rng = np.random.default_rng(0)
    pool = [bytes(h) for h in rng.integers(0, 256, (12_000, 16), dtype=np.uint8)]  # 20k draws: many repeats
    units = [[pool[i] for i in rng.integers(0, len(pool), size)] for size in (7000, 1, 5000, 0, 7999)]
    paths, num_rows = write_units(tmp_path, units)
    one = find_exact_duplicates(paths, num_rows, num_buckets=1)
    many = find_exact_duplicates(paths, num_rows, num_buckets=64)
    odd = find_exact_duplicates(paths, num_rows, num_buckets=7)  # buckets need not be a power of 2
    expected = reference_duplicates(units)
    assert [m.tolist() for m in one] == [m.tolist() for m in many] == [m.tolist() for m in odd] == expected
    assert 0 < sum(map(sum, expected)) < 20_000


def test_exact_duplicates_rejects_mismatched_row_counts(tmp_path):
    paths, _ = write_units(tmp_path, [[text_hash("a"), text_hash("b")]])
    with pytest.raises(ValueError, match="2 hashes for a unit of 1 rows"):
        find_exact_duplicates(paths, [1])
    with pytest.raises(ValueError, match="row counts"):
        find_exact_duplicates(paths, [2, 2])


def test_exact_duplicates_memory_is_one_bucket_not_all_hashes(tmp_path):
    num_units, num_per_unit = 4, 500_000
    rng = np.random.default_rng(1)
    paths = []
    for unit in range(num_units):
        blob = bytes(16 * 1000) + rng.bytes(16 * (num_per_unit - 1000))  # the same document 1000 times per unit
        paths.append(tmp_path / f"unit-{unit}.hashes")
        write_hashes(paths[-1], [blob[i:i + 16] for i in range(0, len(blob), 16)])
    total_hash_bytes = num_units * num_per_unit * HASH_DTYPE.itemsize  # 40 MB on disk
    tracemalloc.start()
    masks = find_exact_duplicates(paths, [num_per_unit] * num_units, num_buckets=64)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sum(int(m.sum()) for m in masks) == num_units * 1000 - 1
    assert peak < total_hash_bytes / 5, f"peak {peak / 1e6:.1f} MB for {total_hash_bytes / 1e6:.0f} MB of hashes"


# --- near ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neko_sentences() -> list[str]:
    text = NEKO.read_text(encoding="utf-8")
    return [s + "。" for s in text.replace("\n", "").split("。") if len(s) > 20]


def test_minhash_signature_is_deterministic_uint64(neko_sentences):
    text = "".join(neko_sentences[:30])
    sig = minhash_signature(text, num_perm=64, shingle_chars=5)
    assert sig.dtype == np.uint64 and sig.shape == (64,)
    assert np.array_equal(sig, minhash_signature(text, num_perm=64, shingle_chars=5))
    assert not np.array_equal(sig, minhash_signature(text, num_perm=64, shingle_chars=5, seed=2))
    assert get_jaccard_estimate(sig, sig) == 1.0


def test_minhash_short_and_empty_texts():
    short = minhash_signature("猫", num_perm=32, shingle_chars=5)
    assert np.array_equal(short, minhash_signature("猫", num_perm=32, shingle_chars=5))
    assert not np.array_equal(short, minhash_signature("犬", num_perm=32, shingle_chars=5))
    assert minhash_signature("", num_perm=32, shingle_chars=5).shape == (32,)


def test_near_duplicates_found_unrelated_kept(neko_sentences):
    doc = neko_sentences[:30]
    edited = doc[:12] + ["吾輩は犬である、名前はもうある。"] + doc[13:]  # one sentence of 30 changed
    unrelated = neko_sentences[100:130]
    signatures = [minhash_signature("".join(d), num_perm=128, shingle_chars=5) for d in (doc, edited, unrelated)]
    assert get_jaccard_estimate(signatures[0], signatures[1]) > 0.85
    index = NearDuplicateIndex(threshold=0.8, num_perm=128)
    assert [index.is_duplicate_or_add(key, sig) for key, sig in zip("abc", signatures)] == [False, True, False]
    assert index.is_duplicate_or_add("d", signatures[2])  # "c" was added


def test_signatures_round_trip(tmp_path):
    sigs = [minhash_signature(t, num_perm=16, shingle_chars=3) for t in ("吾輩は猫である", "名前はまだ無い")]
    write_signatures(tmp_path / "u.sigs", sigs)
    loaded = load_signatures(tmp_path / "u.sigs")
    assert loaded.dtype == np.uint64 and loaded.shape == (2, 16)
    assert np.array_equal(loaded, np.stack(sigs))

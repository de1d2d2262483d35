"""Data-prep throughput: the project's JSON lines → tokenized Arrow path against the Hugging
Face `datasets` baseline and the raw SentencePiece ceiling, on one corpus and the same cores.

    python bench/data_prep.py [--repeats 3] [--scale K] [--rss-check] [--work-dir runs/bench-prep]

Paths, each run in its own subprocess (peak RSS = the process tree's, sampled every 50 ms),
`--repeats` times, interleaved so that load from elsewhere hits every path alike:

  project           data_prep.pipeline.run_prep: docs stage + tokenizer stage (copies a
                    pre-trained tokenizer) + tokens stage, with `clean.normalize: none`
                    (whitespace clean-up only): the baseline's work, plus filters and dedup
  project-neologdn  the same with the default DataConfig (neologdn + NFKC normalisation)
  tokens            data_prep.pack.pack_tokens alone, on the docs the project path produced
  datasets          load_dataset("json") → .map(tokenize, batched=True, num_proc=N) → .save_to_disk
  datasets-neologdn the same, normalising each text with the project's neologdn normaliser
                    in the map before tokenizing: the baseline doing project-neologdn's work
  ceiling           SentencePieceProcessor.encode(batch, num_threads=N, return_type="numpy")
                    over texts already in memory (ceiling-lists: the same, returning lists)

MB/s are of input text bytes (the `text` fields, UTF-8). N = os.cpu_count(). Imports are
done before the clock starts in every path. CPU s: user + system seconds of the path's
process and its workers while timed, the steadier figure on a shared machine. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEBIAN_CORPUS = Path("/work/shared/data/debian-docs-ja/ja-debian-docs.jsonl.xz")
NEKO = ROOT / "data_prep" / "samples" / "neko.txt"
PACK_LENGTH = 568  # t5-base-ja: 512 input tokens after span corruption
VOCAB_SIZE = 8000
NUM_SENTINELS = 100
TOKENIZER_SAMPLE_LINES = 100_000
CEILING_BATCH_DOCS = 1000
RSS_POLL_S = 0.05
PATHS = ("project", "project-neologdn", "tokens", "datasets", "datasets-neologdn", "ceiling", "ceiling-lists")


# --- corpus and tokenizer, prepared once and cached in the work dir -------------------


def prepare_base_corpus(work_dir: Path) -> Path:
    """The Debian docs corpus decompressed (the benchmark measures tokenization, not xz), else neko.txt as JSON lines."""
    path = work_dir / "corpus-x1.jsonl"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    if DEBIAN_CORPUS.exists():
        with lzma.open(DEBIAN_CORPUS, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    else:
        write_neko_corpus(tmp, num_copies=20)
    tmp.rename(path)
    return path


def write_neko_corpus(path: Path, num_copies: int) -> None:
    """neko.txt paragraphs as {"text": ...} lines, `num_copies` marked copies (~1 MB each)."""
    paragraphs = [p for p in NEKO.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(num_copies):
            for text in paragraphs:
                f.write(json.dumps({"text": mark_copy(text, copy)}, ensure_ascii=False) + "\n")


def mark_copy(text: str, copy: int) -> str:
    """A per-copy marker so exact dedup keeps every copy (copy 0 is the original)."""
    return f"{text}\n[copy {copy}]" if copy else text


def prepare_corpus(work_dir: Path, scale: int) -> Path:
    base = prepare_base_corpus(work_dir)
    if scale == 1:
        return base
    path = work_dir / f"corpus-x{scale}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as dst:
            for copy in range(scale):
                with open(base, encoding="utf-8") as src:
                    for line in src:
                        record = json.loads(line)
                        record["text"] = mark_copy(record["text"], copy)
                        dst.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.rename(path)
    return path


def get_text_bytes(corpus: Path) -> int:
    """UTF-8 bytes of the corpus's `text` fields (cached next to it)."""
    cache = corpus.with_suffix(".text_bytes")
    if not cache.exists():
        with open(corpus, encoding="utf-8") as f:
            cache.write_text(str(sum(len(json.loads(line)["text"].encode("utf-8")) for line in f)))
    return int(cache.read_text())


def iter_corpus_texts(corpus: Path):
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def prepare_tokenizer(work_dir: Path, corpus: Path) -> Path:
    """An 8000-piece tokenizer in the project's layout, trained once on a line sample of the corpus."""
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import SPIECE_FILE, export_hf_tokenizer, sample_lines, train_sentencepiece
    from data_prep.tokenizer import write_tokenizer_manifest

    out = work_dir / f"tokenizer-{VOCAB_SIZE}"
    if (out / "manifest.json").exists():
        return out
    print(f"training a {VOCAB_SIZE}-piece tokenizer on {TOKENIZER_SAMPLE_LINES} lines of {corpus.name} (once)", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lines = (line for text in iter_corpus_texts(corpus) for line in text.split("\n") if line)
    cfg = TokenizerConfig(vocab_size=VOCAB_SIZE, num_sentinels=NUM_SENTINELS)
    train_sentencepiece(sample_lines(lines, TOKENIZER_SAMPLE_LINES, seed=0), cfg, out / SPIECE_FILE)
    export_hf_tokenizer(out / SPIECE_FILE, NUM_SENTINELS, out)
    write_tokenizer_manifest(out, NUM_SENTINELS)
    return out


# --- the paths, each run as `data_prep.py --child PATH` in its own process ------------


def get_cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited (a pool's
    workers are waited for before a path's clock stops)."""
    return sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for field in ("ru_utime", "ru_stime"))


class Clock:
    """Wall and CPU seconds of the timed part of a path (imports come before `Clock()`).

    On a shared machine CPU seconds are the steadier figure: other jobs stretch wall time
    but hardly the CPU time a path needs."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), get_cpu_seconds()

    def stop(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu_s": get_cpu_seconds() - self.cpu}


def build_data_config(corpus: Path, output_dir: Path, normalize: str | None):
    """The default DataConfig on the corpus, with another clean.normalize if given."""
    from data_prep.config import DataConfig

    clean = {"normalize": normalize} if normalize else {}
    return DataConfig(inputs=[{"path": str(corpus), "format": "jsonl"}], output_dir=str(output_dir), clean=clean)


def child_project(args, normalize: str | None) -> dict:
    from data_prep.config import TokenizerConfig
    from data_prep.pipeline import run_prep

    data = build_data_config(args.corpus, args.out, normalize)
    clock = Clock()
    summary = run_prep(data, TokenizerConfig(path=str(args.tokenizer)), pack_length=PACK_LENGTH, log=lambda *a: None)
    timing = clock.stop()
    totals = json.loads((args.out / "docs" / "manifest.json").read_text(encoding="utf-8"))["totals"]
    return {**timing, "num_tokens": summary["tokens"]["num_tokens"],
            "docs_units_s": totals.get("units_wall_s"), "docs_merge_s": totals.get("merge_wall_s")}


def child_tokens(args) -> dict:
    from data_prep.pack import pack_tokens
    from data_prep.tokenizer import SPIECE_FILE

    args.out.mkdir(parents=True)
    clock = Clock()
    manifest = pack_tokens(args.docs, args.tokenizer / SPIECE_FILE, PACK_LENGTH, args.out, 256 * 2**20,
                           VOCAB_SIZE + NUM_SENTINELS)
    return {**clock.stop(), "num_tokens": manifest["num_tokens"]}


_SP = None


def tokenize_batch(batch: dict, spiece_path: str, normalize: bool) -> dict:
    """The baseline's map function: one SentencePiece per worker process, one thread each;
    with `normalize`, the project's neologdn normaliser first."""
    global _SP
    if _SP is None:
        import sentencepiece as spm

        _SP = spm.SentencePieceProcessor(model_file=spiece_path)
    texts = batch["text"]
    if normalize:
        from data_prep.clean import normalize_neologdn

        texts = [normalize_neologdn(text) for text in texts]
    return {"input_ids": _SP.encode(texts, num_threads=1)}


def child_datasets(args, normalize: bool) -> dict:
    import datasets
    from data_prep.tokenizer import SPIECE_FILE

    datasets.disable_progress_bars()
    num_proc = os.cpu_count()
    clock = Clock()
    ds = datasets.load_dataset("json", data_files=str(args.corpus), split="train", cache_dir=str(args.out / "cache"))
    ds = ds.map(tokenize_batch, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                fn_kwargs={"spiece_path": str(args.tokenizer / SPIECE_FILE), "normalize": normalize})
    ds.save_to_disk(str(args.out / "saved"))
    return {**clock.stop(), "num_docs": len(ds)}


def child_ceiling(args, return_type) -> dict:
    import sentencepiece as spm
    from data_prep.tokenizer import SPIECE_FILE

    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer / SPIECE_FILE))
    texts = list(iter_corpus_texts(args.corpus))
    num_threads = os.cpu_count()
    num_tokens = 0
    clock = Clock()
    for i in range(0, len(texts), CEILING_BATCH_DOCS):
        encoded = sp.encode(texts[i : i + CEILING_BATCH_DOCS], num_threads=num_threads, return_type=return_type)
        num_tokens += sum(len(ids) for ids in encoded)
    return {**clock.stop(), "num_tokens": num_tokens}


def run_child(args) -> None:
    children = {
        "project": lambda a: child_project(a, "none"), "project-neologdn": lambda a: child_project(a, None),
        "tokens": child_tokens,
        "datasets": lambda a: child_datasets(a, False), "datasets-neologdn": lambda a: child_datasets(a, True),
        "ceiling": lambda a: child_ceiling(a, "numpy"), "ceiling-lists": lambda a: child_ceiling(a, int),
    }
    result = children[args.child](args)
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.result.write_text(json.dumps(result))


# --- the parent: run each path in a subprocess, sample the RSS of its process tree -----


def get_tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def run_path(path: str, corpus: Path, tokenizer: Path, out: Path, docs: Path | None, log_file: Path) -> dict:
    """One timed run of `path` in a fresh process: its result plus the peak RSS (MB) of its process tree."""
    import psutil

    result_file = out.with_suffix(".json")
    cmd = [sys.executable, __file__, "--child", path, "--corpus", str(corpus), "--tokenizer", str(tokenizer),
           "--out", str(out), "--result", str(result_file)]
    cmd += ["--docs", str(docs)] if docs else []
    env = {**os.environ, "HF_DATASETS_CACHE": str(out / "cache"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "a") as log:
        log.write(f"\n=== {' '.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = sample_peak_rss(psutil.Process(child.pid), child)
    if child.returncode != 0 or not result_file.exists():
        return {"error": f"exit code {child.returncode} (see {log_file})"}
    result = json.loads(result_file.read_text())
    result["peak_rss_mb"] = max(peak / 2**20, result["self_maxrss_mb"])
    return result


def sample_peak_rss(proc, child: subprocess.Popen) -> int:
    peak = 0
    while child.poll() is None:
        peak = max(peak, get_tree_rss(proc))
        time.sleep(RSS_POLL_S)
    return peak


class Bench:
    """Runs the paths interleaved, `repeats` times each, and keeps every result."""

    def __init__(self, corpus: Path, tokenizer: Path, work_dir: Path, repeats: int):
        self.corpus, self.tokenizer, self.repeats = corpus, tokenizer, repeats
        self.tmp = Path(tempfile.mkdtemp(prefix="runs-", dir=work_dir))
        self.log_file = work_dir / "bench.log"
        self.docs: Path | None = None  # the project path's docs, input of the tokens path
        self.results: dict[str, list[dict]] = {}

    def run(self, paths: list[str]) -> dict[str, list[dict]]:
        for repeat in range(self.repeats):
            for path in paths:
                self.results.setdefault(path, []).append(self.run_one(path, repeat))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.results

    def run_one(self, path: str, repeat: int) -> dict:
        if path == "tokens" and self.docs is None:
            self.docs = write_plain_docs(self.corpus, self.tmp / "plain-docs")
        out = self.tmp / f"{path}-{repeat}"
        result = run_path(path, self.corpus, self.tokenizer, out, self.docs, self.log_file)
        if path == "project" and "error" not in result and self.docs is None:
            self.docs = out / "docs"  # kept for the tokens path
        elif path != "tokens":
            shutil.rmtree(out, ignore_errors=True)
        status = result.get("error") or f"{result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB"
        print(f"  {path:14s} run {repeat + 1}/{self.repeats}: {status}", flush=True)
        return result


def write_plain_docs(corpus: Path, docs_dir: Path) -> Path:
    """Docs shards straight from the JSON lines (no cleaning), for when the project path failed."""
    import pyarrow as pa
    from data_prep.shards import ShardWriter

    print("  (project path failed: the tokens path reads uncleaned docs written by the bench)", flush=True)
    docs_dir.mkdir(parents=True)
    schema = pa.schema([(name, pa.string()) for name in ("id", "source", "title", "url", "text")])
    writer = ShardWriter(docs_dir, schema, 256 * 2**20)
    texts = list(iter_corpus_texts(corpus))
    for i in range(0, len(texts), 1000):
        batch = texts[i : i + 1000]
        ids = [f"bench:{i + j}" for j in range(len(batch))]
        empty = [""] * len(batch)
        writer.write(pa.RecordBatch.from_arrays([pa.array(ids), pa.array(["bench"] * len(batch)), pa.array(empty),
                                                 pa.array(empty), pa.array(batch)], schema=schema))
    writer.close()
    return docs_dir


# --- report -----------------------------------------------------------------------------


def summarize(results: dict[str, list[dict]], text_bytes: int) -> dict[str, dict]:
    summary = {}
    for path, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            summary[path] = {"error": runs[0]["error"]}
            continue
        seconds = statistics.median(r["seconds"] for r in ok)
        summary[path] = {"seconds": seconds, "mb_s": text_bytes / seconds / 1e6, "runs": [r["seconds"] for r in ok],
                         "cpu_s": statistics.median(r["cpu_s"] for r in ok),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
    return summary


def print_table(summary: dict[str, dict], text_bytes: int, scale: int) -> None:
    base, ceiling = summary.get("datasets", {}).get("mb_s"), summary.get("ceiling", {}).get("mb_s")
    print(f"\ncorpus: {text_bytes / 1e6:.1f} MB of text (x{scale}), N = {os.cpu_count()} cores, "
          f"load average now {os.getloadavg()[0]:.2f}")
    print(f"{'path':14s} {'median s':>9s} {'CPU s':>6s} {'MB/s':>7s} {'/datasets':>10s} {'/ceiling':>9s} "
          f"{'peak RSS MB':>12s}  runs (s)")
    for path, row in summary.items():
        if "error" in row:
            print(f"{path:14s} FAILED: {row['error']}")
            continue
        ratio_base = f"{row['mb_s'] / base:.2f}" if base else "-"
        ratio_ceiling = f"{row['mb_s'] / ceiling:.2f}" if ceiling else "-"
        runs = " ".join(f"{s:.2f}" for s in row["runs"])
        print(f"{path:14s} {row['seconds']:9.2f} {row['cpu_s']:6.2f} {row['mb_s']:7.1f} {ratio_base:>10s} {ratio_ceiling:>9s} "
              f"{row['peak_rss_mb']:12.0f}  {runs}")


def print_project_breakdown(results: dict[str, list[dict]]) -> None:
    """Where each project path's time goes, from the docs manifest's wall times (median of the runs)."""
    for path in ("project", "project-neologdn"):
        runs = [r for r in results.get(path, []) if r.get("docs_units_s") is not None]
        if not runs:
            continue
        units = statistics.median(r["docs_units_s"] for r in runs)
        merge = statistics.median(r["docs_merge_s"] for r in runs)
        rest = statistics.median(r["seconds"] - r["docs_units_s"] - r["docs_merge_s"] for r in runs)
        print(f"{path} breakdown: docs units {units:.2f} s (read, clean, filter, hash, encode), docs merge "
              f"{merge:.2f} s (the tokens are packed alongside), the rest (tokenizer copy, tokens stage) {rest:.2f} s")


def print_goals(summary: dict[str, dict], rss: dict[str, dict[int, float]] | None) -> None:
    """The data-prep issue's goals, each project path against the baseline doing the same work."""
    ceiling = summary.get("ceiling", {}).get("mb_s")
    print()
    for path, baseline, goal in (("project", "datasets", "goal ≥ 1.5"), ("project-neologdn", "datasets-neologdn", "")):
        mb_s, base = summary.get(path, {}).get("mb_s"), summary.get(baseline, {}).get("mb_s")
        if mb_s and base:
            print(f"{path}/{baseline} = {mb_s / base:.2f}" + (f" ({goal})" if goal else " (same work)"))
        if mb_s and ceiling:
            print(f"{path}/ceiling = {mb_s / ceiling:.2f}" + (" (goal ≥ 0.80)" if path == "project" else ""))
    tokens = summary.get("tokens", {}).get("mb_s")
    base = summary.get("datasets", {}).get("mb_s")
    if tokens and base and ceiling:
        print(f"(tokens stage alone: /datasets = {tokens / base:.2f}, /ceiling = {tokens / ceiling:.2f})")
    for path, peaks in (rss or {}).items():
        print(f"{path}: peak RSS 1x {peaks[1]:.0f} MB, 4x {peaks[4]:.0f} MB (goal < 1500 MB, flat)")
    if not rss and "peak_rss_mb" in summary.get("project", {}):
        print(f"project: peak RSS 1x {summary['project']['peak_rss_mb']:.0f} MB (--rss-check adds the 4x corpus)")


def run_rss_check(work_dir: Path, tokenizer: Path) -> dict[str, dict[int, float]]:
    """Peak RSS of both project paths on the corpus and on 4 copies of it, one run each."""
    print("\nRSS check: the project paths at 1x and 4x the corpus", flush=True)
    peaks: dict[str, dict[int, float]] = {}
    for scale in (1, 4):
        bench = Bench(prepare_corpus(work_dir, scale), tokenizer, work_dir, 1)
        for path, runs in bench.run(["project", "project-neologdn"]).items():
            peaks.setdefault(path, {})[scale] = runs[0].get("peak_rss_mb", float("nan"))
    return peaks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per path; the table shows the median")
    parser.add_argument("--scale", type=int, default=1, help="replicate the corpus K times (marked copies)")
    parser.add_argument("--rss-check", action="store_true", help="also run the project path at 1x and 4x the corpus")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-prep", help="cache and scratch directory")
    for internal in ("--child", "--corpus", "--tokenizer", "--out", "--result", "--docs"):
        parser.add_argument(internal, help=argparse.SUPPRESS, type=None if internal == "--child" else Path)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus(args.work_dir, args.scale)
    tokenizer = prepare_tokenizer(args.work_dir, prepare_base_corpus(args.work_dir))
    text_bytes = get_text_bytes(corpus)
    print(f"corpus {corpus} ({text_bytes / 1e6:.1f} MB of text), tokenizer {tokenizer}, {args.repeats} repeats", flush=True)
    results = Bench(corpus, tokenizer, args.work_dir, args.repeats).run(args.paths.split(","))
    summary = summarize(results, text_bytes)
    rss = run_rss_check(args.work_dir, tokenizer) if args.rss_check else None
    print_table(summary, text_bytes, args.scale)
    print_project_breakdown(results)
    print_goals(summary, rss)


if __name__ == "__main__":
    main()

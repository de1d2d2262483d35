"""SentencePiece training and export to a Hugging Face tokenizer in the T5 id layout.

Layout (as in the original T5 vocabulary): pad 0, eos 1 (`</s>`), unk 2, no bos, the
SentencePiece pieces, then `num_sentinels` sentinels with `<extra_id_0>` the highest id.
Unknown characters fall back to UTF-8 byte pieces, so nothing maps to unk.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import sentencepiece as spm

from data_prep.config import TokenizerConfig
from data_prep.shards import get_sha256, list_shards, write_json

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPIECE_FILE = "spiece.model"
# Input formats whose documents seed the tokenizer sample by default (clean, encyclopedic text).
WIKIPEDIA_FORMATS = {"wikipedia_xml", "wikiextractor"}


def iter_doc_batches(docs_dir: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`columns` of the docs shards, one record batch at a time, in shard order.

    Read, not memory-mapped: the mapped pages of a shard count toward RSS until the shard is
    closed, so the peak would grow with the shard (up to data.shard_bytes); read batches are
    freed as soon as they are consumed.
    """
    for shard in list_shards(docs_dir):
        with pa.OSFile(str(shard)) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.select(columns)


def iter_doc_lines(docs_dir: Path, sources: list[str] | None = None) -> Iterator[str]:
    """Non-empty lines of every document (of `sources` only, if given), in shard order."""
    wanted = None if sources is None else pa.array(sources, type=pa.string())
    for batch in iter_doc_batches(docs_dir, ["source", "text"]):
        texts = batch.column("text")
        if wanted is not None:
            texts = texts.filter(pc.is_in(batch.column("source"), value_set=wanted))
        for text in texts.to_pylist():
            yield from (line for line in text.split("\n") if line)


def get_sample_sources(docs_dir: Path, requested: list[str] | None) -> list[str] | None:
    """Sources the training sample is drawn from; None: all of them.

    `requested` (tokenizer.sample_sources) if given, else the sources of the Wikipedia inputs
    (the seed corpus), else all. Reads `inputs[].sources` and the detected `inputs[].format`
    of docs/manifest.json.
    """
    inputs = json.loads((docs_dir / "manifest.json").read_text(encoding="utf-8"))["inputs"]
    available = sorted({source for entry in inputs for source in entry["sources"]})
    if requested is not None:
        unknown = [source for source in requested if source not in available]
        if unknown or not requested:
            raise ValueError(
                f"tokenizer.sample_sources: unknown source(s) {unknown or requested}; the docs stage has {available}"
            )
        return sorted(set(requested))
    # "a,b": an input whose files were detected as several formats; Wikipedia only if all are.
    wikipedia = {
        source for entry in inputs
        if set(entry.get("format", "").split(",")) <= WIKIPEDIA_FORMATS
        for source in entry["sources"]
    }
    return sorted(wikipedia) or None


def sample_lines(lines: Iterable[str], max_lines: int, seed: int) -> list[str]:
    """Uniform sample of at most `max_lines` lines (reservoir sampling: one pass, bounded memory)."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    for i, line in enumerate(lines):
        if i < max_lines:
            reservoir.append(line)
        elif (j := rng.randrange(i + 1)) < max_lines:
            reservoir[j] = line
    return reservoir


def train_sentencepiece(lines: list[str], cfg: TokenizerConfig, out_path: Path) -> None:
    """Train on `lines` and write the model to `out_path` (lines over 4192 bytes are skipped by SentencePiece)."""
    try:
        with open(out_path, "wb") as model_writer:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model_writer,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                byte_fallback=True,
                minloglevel=2,
                num_threads=os.cpu_count(),
            )
    except RuntimeError as e:
        raise explain_training_error(e, cfg) from e


def explain_training_error(error: RuntimeError, cfg: TokenizerConfig) -> Exception:
    """Turn SentencePiece's vocabulary-size failures into a user-facing ValueError."""
    message = str(error)
    if "Vocabulary size is smaller than required_chars" in message:
        return ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small for the characters the corpus needs at "
            f"character_coverage={cfg.character_coverage} ({message.split('] ')[-1]}). "
            "Raise tokenizer.vocab_size or lower tokenizer.character_coverage."
        )
    if "Vocabulary size too high" in message:
        return ValueError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too large for this corpus ({message.split('] ')[-1]}). "
            "Lower tokenizer.vocab_size, add data, or raise tokenizer.sample_sentences."
        )
    return error


def build_hf_backend(spiece_path: Path, num_sentinels: int):
    """tokenizers.Tokenizer reproducing SentencePiece exactly, with sentinels and a trailing </s>."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(spiece_path.read_bytes())
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(num_sentinels - 1, -1, -1)]
    vocab = [(p.piece, p.score) for p in proto.pieces] + sentinels
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", EOS_ID)]
    )
    return backend


def export_hf_tokenizer(spiece_path: Path, num_sentinels: int, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special tokens) into `out_dir`."""
    from transformers import T5Tokenizer

    backend = build_hf_backend(spiece_path, num_sentinels)
    sentinels = [f"<extra_id_{i}>" for i in range(num_sentinels)]
    tok = T5Tokenizer(tokenizer_object=backend, extra_ids=num_sentinels, additional_special_tokens=sentinels)
    tok.save_pretrained(str(out_dir))
    # transformers 5's T5Tokenizer rebuilds its own pipeline from the vocab and drops byte
    # fallback; "TokenizersBackend" makes AutoTokenizer load tokenizer.json verbatim
    # (exact SentencePiece ids, byte fallback for 𠮷 or emoji).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "TokenizersBackend"
    write_json(config_path, config)


def load_tokenizer(tokenizer_dir: str | Path):
    """The Hugging Face tokenizer of a prepared tokenizer directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def get_hf_vocab_size(tokenizer_dir: Path) -> int:
    """Tokens of the directory's tokenizer.json, which AutoTokenizer loads verbatim (see
    export_hf_tokenizer). Read with `tokenizers` alone: importing transformers (and torch)
    would cost seconds, the whole tokenizer stage when it only copies `tokenizer.path`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def check_special_ids(spiece_path: Path) -> int:
    """Number of pieces; raises ValueError unless pad/eos/unk/bos follow the T5 layout."""
    sp = spm.SentencePieceProcessor(model_file=str(spiece_path))
    found = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
    if found != (PAD_ID, EOS_ID, UNK_ID, -1):
        raise ValueError(
            f"{spiece_path}: pad/eos/unk/bos ids are {found}, expected ({PAD_ID}, {EOS_ID}, {UNK_ID}, -1) (T5 layout)"
        )
    return sp.get_piece_size()


def hash_tokenizer_files(tokenizer_dir: Path) -> dict:
    return {name: get_sha256(tokenizer_dir / name) for name in (SPIECE_FILE, "tokenizer.json")}


def inspect_tokenizer(tokenizer_dir: Path) -> dict:
    """What the manifest needs of a tokenizer directory that costs time (both tokenizers are
    loaded), with the sha256 of the files it was read from."""
    return {"files": hash_tokenizer_files(tokenizer_dir), "num_pieces": check_special_ids(tokenizer_dir / SPIECE_FILE),
            "vocab_size": get_hf_vocab_size(tokenizer_dir)}


def read_manifest_check(tokenizer_dir: Path) -> dict | None:
    """The `inspect_tokenizer` result that the directory's manifest.json records, if it records
    one for the files there now (same sha256): a tokenizer stage wrote it after checking them.
    None otherwise (no manifest, one from before `files` was recorded, or changed files)."""
    try:
        manifest = json.loads((tokenizer_dir / "manifest.json").read_text(encoding="utf-8"))
        files, num_pieces, vocab_size = manifest["files"], manifest["num_pieces"], manifest["vocab_size"]
        if files != hash_tokenizer_files(tokenizer_dir):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"files": files, "num_pieces": num_pieces, "vocab_size": vocab_size}


class TokenizerCheck:
    """`inspect_tokenizer` of a given tokenizer.path, ready for the tokenizer stage.

    A directory that a tokenizer stage built carries the result in its manifest.json, with the
    sha256 of the files it was read from: while they match, that is the result, and nothing
    runs. Otherwise the check (~0.05-0.1 s of CPU: both tokenizers loaded) runs ahead of the
    tokenizer stage in a forked process at the lowest CPU priority (nice 19): the docs workers
    keep every core busy, so it runs mostly on the core-time they leave idle (at normal
    priority it took that CPU from them). The tokenizer stage reuses the result only if the
    files it copied have the same sha256; otherwise, or if the check failed, it checks again
    itself and reports any problem there, in its usual place."""

    def __init__(self, tokenizer_dir: Path):
        self.tokenizer_dir = tokenizer_dir
        self._process = self._results = None
        self._result: dict | None = None

    def start(self) -> "TokenizerCheck":
        """Read the manifest's result, else fork the check. Before the docs workers' pool: the
        parent has no other thread yet."""
        self._result = read_manifest_check(self.tokenizer_dir)
        if self._result is not None:
            return self
        context = multiprocessing.get_context("fork")
        self._results, send = context.Pipe(duplex=False)
        # daemon: killed at exit if the run fails before it reads the result
        self._process = context.Process(target=_run_check, args=(self.tokenizer_dir, send), daemon=True)
        self._process.start()
        send.close()
        return self

    @property
    def pid(self) -> int | None:
        """The check process's pid until it is reaped (result() or close()); None if none was
        needed (the manifest vouched)."""
        return self._process.pid if self._process is not None else None

    def result(self) -> dict | None:
        """The check's result (waiting for it if it is still running); None if it failed."""
        if self._process is not None:
            try:
                self._result = self._results.recv()
            except EOFError:  # the process died without a result
                self._result = None
            self.close()
        return self._result

    def close(self) -> None:
        """Stop the check if it still runs (its result unwanted: the tokenizer stage was done
        already, or the run failed) and reap its process."""
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join()
            self._results.close()
            self._process = None

    def __enter__(self) -> "TokenizerCheck":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _run_check(tokenizer_dir: Path, send) -> None:
    os.nice(19)
    try:
        result = inspect_tokenizer(tokenizer_dir)
    except Exception:  # noqa: BLE001 - repeated and raised by the tokenizer stage
        result = None
    send.send(result)
    send.close()


def write_tokenizer_manifest(out_dir: Path, num_sentinels: int, checked: dict | None = None) -> dict:
    """The manifest of `out_dir` (after checking the T5 layout and the Hugging Face vocabulary);
    `checked`: an `inspect_tokenizer` result to reuse if it was read from the same files."""
    files = hash_tokenizer_files(out_dir)
    if checked is None or checked["files"] != files:
        checked = inspect_tokenizer(out_dir)
    num_pieces, vocab_size = checked["num_pieces"], checked["vocab_size"]
    if vocab_size != num_pieces + num_sentinels:
        raise ValueError(
            f"{out_dir}: Hugging Face tokenizer has {vocab_size} tokens, expected {num_pieces} pieces "
            f"+ {num_sentinels} sentinels (tokenizer.num_sentinels)"
        )
    manifest = {
        "vocab_size": vocab_size, "num_pieces": num_pieces, "num_sentinels": num_sentinels,
        "pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID, "spiece_sha256": files[SPIECE_FILE],
        "files": files,  # the sha256 of what was checked: read_manifest_check
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def build_tokenizer(docs_dir: Path, cfg: TokenizerConfig, out_dir: Path, log=print, checked: dict | None = None) -> dict:
    """Train (or copy from `cfg.path`) a tokenizer into `out_dir`; returns its manifest.
    `checked`: a `TokenizerCheck` result of `cfg.path`, if one was run."""
    if cfg.path:
        copy_existing_tokenizer(Path(cfg.path), out_dir)
    else:
        sources = get_sample_sources(docs_dir, cfg.sample_sources)
        lines = sample_lines(iter_doc_lines(docs_dir, sources), cfg.sample_sentences, cfg.seed)
        if not lines:
            raise ValueError(
                f"no text to train the tokenizer on: {docs_dir} kept no documents of sources "
                f"{sources or 'any'} (see its manifest.json)"
            )
        log(f"tokenizer: training {cfg.model_type} vocab {cfg.vocab_size} on {len(lines)} lines "
            f"sampled from {'sources ' + ', '.join(sources) if sources else 'all sources'}")
        train_sentencepiece(lines, cfg, out_dir / SPIECE_FILE)
    if not (out_dir / "tokenizer.json").exists():
        export_hf_tokenizer(out_dir / SPIECE_FILE, cfg.num_sentinels, out_dir)
    return write_tokenizer_manifest(out_dir, cfg.num_sentinels, checked)


def copy_existing_tokenizer(src: Path, out_dir: Path) -> None:
    if not (src / SPIECE_FILE).is_file():
        raise ValueError(f"tokenizer.path={str(src)!r} has no {SPIECE_FILE}")
    shutil.copytree(src, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json", "_SUCCESS"))

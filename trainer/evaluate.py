"""`t5ja eval JOB.yaml`: a trained model scored on its task's split, outside training, with the
seed's evaluation metrics: the task's own figures (precision, recall and F1 for classification,
EM/F1 for JSQuAD, ...), pass@1, throughput, latency, error rate, memory, and optionally the mean
of human ratings. Written under RUN_DIR/eval/ and logged to MLflow (docs/finetune.md).

One process on one device (CUDA if there is one, else the CPU), the model in fp32 as the export
holds it: the training-time evaluation scores the same weights the same way. Each objective is a
row of EVALUATORS, which says how its requests are built, answered and scored:

- seq2seq: batched greedy generation on the split, scored by the task's evaluator (the training-
  time evaluation's report files, under other names); pass@1 by the task's own predicate.
- causal_lm: the split's mean token loss (and perplexity), then the greedy answer to each
  conversation's last model turn; pass@1 by normalised exact match with that turn.

Files, SPLIT being the evaluated split (the training-time evaluation's files keep their names):
  RUN_DIR/eval/SPLIT_eval.json               every metric, and what was evaluated how ("settings")
  RUN_DIR/eval/SPLIT_eval_predictions.jsonl  one record per request, with "correct" (pass@1)
  RUN_DIR/eval/SPLIT_eval_report.txt         the task's report (seq2seq; livedoor: scikit-learn's)
  RUN_DIR/eval/SPLIT_eval_confusion_matrix.png   livedoor
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune import Example
from finetune.chat import build_chat_prompt, generate_answers, is_answer_correct
from finetune.seq2seq import generate_predictions, write_predictions
from finetune.serving import is_failed, pass_at_1, read_ratings_csv, summarize_ratings, summarize_requests
from finetune.tasks import CorrectPredicate, load_chat_task, load_task
from trainer import heap
from trainer.causal_lm import CausalLMConfig, get_loss_metrics, get_loss_sum, tokenize_windows
from trainer.metrics import MLflowConfig, get_experiment_id, is_transient, limit_http_retries
from trainer.model import ModelConfig, get_model_class
from trainer.seq2seq import Seq2SeqConfig

log = logging.getLogger("trainer.evaluate")

# Tokens of a chat answer at most, unless eval.max_new_tokens or --max-new-tokens says otherwise:
# room for a title or a few sentences (a livedoor_sft answer is a title or a genre name).
CHAT_MAX_NEW_TOKENS = 128
MLFLOW_PREFIX = "eval/"  # the training-time evaluation's prefix: one namespace for a run's eval figures
TAG_PREFIX = "t5ja_eval."  # tags saying what `t5ja eval` scored, and how
ARTIFACT_DIR = "eval"  # the files' folder in the MLflow run, as in the run directory


class EvalDataError(ValueError):
    """An input of the evaluation cannot be used (ratings CSV, task split); the message says why."""


class EvalOptions(BaseModel):
    """What one `t5ja eval` scores and how: its command-line options, defaulted from the job."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the Hugging Face model directory to score (default RUN_DIR/export)")
    split: Literal["test", "validation"] = Field(description="the task split to score (default eval.split)")
    batch_size: int = Field(gt=0, description="requests per generate() call (default eval.batch_size)")
    max_new_tokens: int = Field(gt=0, description="tokens generated per request at most (default "
                                                  "eval.max_new_tokens, else the objective's)")
    limit: int | None = Field(None, gt=0, description="score only the split's first N examples")
    ratings: str | None = Field(None, description="CSV of human ratings, header request_id,rating (1-5)")


def build_eval_options(objective, eval_cfg, run_dir: Path, given: dict) -> tuple[EvalOptions | None, list[tuple[str, str]]]:
    """The options of an evaluation of a job: `given`'s (the command line's: model, split,
    batch_size, max_new_tokens, limit, ratings; None where not given), else the job's `eval`
    section and objective. Returns (options, every problem as (option, message)); the options
    are None when the values do not validate."""
    from pydantic import ValidationError

    from trainer.config import describe_pydantic_error
    from trainer.model import get_init_from_problems

    if objective.name not in EVALUATORS:
        return None, [("objective.name", f"{objective.name} has no task to be scored on: `t5ja eval` scores "
                                         f"jobs of objective {' or '.join(EVALUATORS)}")]
    values = {"model": str(Path(given["model"]).resolve()) if given["model"] else str(run_dir / "export"),
              "split": given["split"] or eval_cfg.split,
              "batch_size": _first_set(given["batch_size"], eval_cfg.batch_size),
              "max_new_tokens": _first_set(given["max_new_tokens"], eval_cfg.max_new_tokens,
                                           EVALUATORS[objective.name].default_max_new_tokens(objective)),
              "limit": given["limit"], "ratings": str(Path(given["ratings"]).resolve()) if given["ratings"] else None}
    try:
        opts = EvalOptions(**values)
    except ValidationError as err:  # named by their command-line option
        return None, [(f"--{str(e['loc'][0]).replace('_', '-')}", describe_pydantic_error(e)) for e in err.errors()]
    problems = get_init_from_problems(opts.model, "--model")
    if problems and not given["model"]:
        problems = [(key, f"{msg}: `t5ja train` writes RUN_DIR/export at the end of training (`t5ja export "
                          "RUN_DIR` from a checkpoint); train the job first, or pass --model PATH")
                    for key, msg in problems]
    if opts.ratings and not Path(opts.ratings).is_file():
        problems.append(("--ratings", f"{opts.ratings}: no such file"))
    return opts, problems


def _first_set(*values):
    return next(value for value in values if value is not None)


def get_final_step(steps: int | None, run_dir: Path) -> int:
    """The step the training-time evaluation logged at: `steps` (train.steps), or, for a run of
    train.epochs, the count it resolved them to (its newest checkpoint's; 0 while it has none)."""
    from trainer.checkpoint import read_latest_train_state

    if steps is not None:
        return steps
    state = read_latest_train_state(run_dir)
    return 0 if state is None else state.num_steps


@dataclass
class Evaluation:
    """What an objective's evaluator produced: its metrics, one record per request, its files."""

    metrics: dict[str, float]
    records: list[dict]
    generate_s: float  # wall time of the generation alone: the throughput's denominator
    files: list[Path] = field(default_factory=list)


@dataclass
class EvalReport:
    """Everything `t5ja eval` reports: metrics (in table order), settings, the files written."""

    metrics: dict[str, float]
    settings: dict[str, object]
    files: list[Path]

    def table(self) -> dict[str, object]:
        """The printed table's rows: the metrics, then what they were measured at."""
        return {**self.metrics, "batch_size": self.settings["batch_size"],
                "memory_measure": self.settings["memory_measure"]}


def mark_correct(records: list[dict], examples: list[Example], is_correct: CorrectPredicate) -> None:
    """Each record gets "correct": a failed request is wrong (finetune.serving.is_failed)."""
    for record, example in zip(records, examples, strict=True):
        record["correct"] = not is_failed(record) and bool(is_correct(example, record["prediction"]))


def get_pass_at_1(records: list[dict]) -> float:
    return pass_at_1(records, lambda record: record["correct"])


# ---- the objectives --------------------------------------------------------------------------

class Seq2SeqEval:
    """objective seq2seq: greedy generation on the split, scored by the task's evaluator."""

    def __init__(self, objective: Seq2SeqConfig, task_cfg, opts: EvalOptions, tokenizer):
        self.objective, self.opts, self.tokenizer = objective, opts, tokenizer
        self.task = load_task(task_cfg)
        self.examples = self.task.splits[opts.split][:opts.limit]
        self.request_ids = [e.id for e in self.examples]

    @staticmethod
    def default_max_new_tokens(objective: Seq2SeqConfig) -> int:
        return objective.target_length

    def run(self, model, out_dir: Path, prefix: str) -> Evaluation:
        start = time.perf_counter()
        records = generate_predictions(model, self.tokenizer, self.examples, self.opts.batch_size,
                                       self.opts.max_new_tokens, self.objective.input_length)
        generate_s = time.perf_counter() - start
        result = self.task.evaluate(self.examples, [r["prediction"] for r in records], out_dir, prefix)
        metrics = dict(result.metrics)
        if self.task.is_correct is not None:  # JSTS has no right answer (finetune/jglue.py says why)
            mark_correct(records, self.examples, self.task.is_correct)
            metrics["pass_at_1"] = get_pass_at_1(records)
        return Evaluation(metrics, records, generate_s, result.files)


class CausalLMEval:
    """objective causal_lm: the split's mean token loss, then the greedy answer to each
    conversation's last model turn (request id `conversation-<index in the split>`)."""

    def __init__(self, objective: CausalLMConfig, task_cfg, opts: EvalOptions, tokenizer):
        self.objective, self.opts, self.tokenizer = objective, opts, tokenizer
        splits = load_chat_task(task_cfg).splits
        if opts.split not in splits:
            raise EvalDataError(f"task {task_cfg.name} has no {opts.split} split (a chat task has the evaluation "
                                "splits when it sets task.eval_file)")
        conversations = splits[opts.split][:opts.limit]
        self.windows = tokenize_windows(conversations, tokenizer, objective)

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        prompts = [build_chat_prompt(c, encode, tokenizer.bos_token_id, objective.max_length) for c in conversations]
        self.examples = [Example(f"conversation-{i}", p.text, p.reference) for i, p in enumerate(prompts)]
        self.prompt_ids = {e.id: p.input_ids for e, p in zip(self.examples, prompts)}
        self.num_cut_prompts = sum(p.num_cut_tokens > 0 for p in prompts)
        self.request_ids = [e.id for e in self.examples]

    @staticmethod
    def default_max_new_tokens(objective: CausalLMConfig) -> int:
        return CHAT_MAX_NEW_TOKENS

    def run(self, model, out_dir: Path, prefix: str) -> Evaluation:
        metrics = self.get_loss_metrics(model)
        start = time.perf_counter()
        records = generate_answers(model, self.tokenizer, self.examples, self.prompt_ids, self.opts.batch_size,
                                   self.opts.max_new_tokens)
        generate_s = time.perf_counter() - start
        mark_correct(records, self.examples, is_answer_correct)
        metrics.update(pass_at_1=get_pass_at_1(records), num_cut_prompts=self.num_cut_prompts)
        return Evaluation(metrics, records, generate_s)

    def get_loss_metrics(self, model) -> dict[str, float]:
        """The training-time eval/loss (mean over the model turns' tokens) and its perplexity."""
        num_windows = len(self.windows.input_ids)
        if not num_windows:  # every conversation overlong under objective.overlong=drop
            log.warning("no evaluation window (conversations dropped as overlong): no loss")
            return {"num_windows": 0}
        return get_loss_metrics(*get_loss_sum(model, self.windows, self.opts.batch_size), num_windows)


EVALUATORS: dict[str, type[Seq2SeqEval] | type[CausalLMEval]] = {"seq2seq": Seq2SeqEval, "causal_lm": CausalLMEval}


# ---- the run -------------------------------------------------------------------------------

def read_ratings(path: str) -> dict[str, int]:
    """The ratings of a CSV with no bad row; EvalDataError listing every bad one otherwise (a
    skipped row would bias the mean without anyone noticing)."""
    try:
        ratings, report = read_ratings_csv(path)
    except ValueError as err:
        raise EvalDataError(str(err)) from None
    if report.num_skipped:
        raise EvalDataError(f"ratings: fix every bad row (or remove it):\n{report.summary(report.num_skipped)}")
    return ratings


def get_rating_metrics(ratings: dict[str, int], request_ids: list[str]) -> dict[str, float]:
    """Mean and count of the ratings of this evaluation's requests; the other ids are named."""
    unknown = sorted(set(ratings) - set(request_ids))
    if unknown:
        listed = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        log.warning("ratings: %d request id(s) are not requests of this evaluation, left out of the mean: %s",
                    len(unknown), listed)
    try:
        return summarize_ratings(ratings, request_ids)
    except ValueError as err:
        raise EvalDataError(f"ratings: {err}; the request ids are those of the predictions file "
                            f"(e.g. {request_ids[0]!r})") from None


def get_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_peak_memory(device) -> tuple[int, str]:
    """Peak memory in bytes, and what was measured: on CUDA the device's peak allocation
    (torch.cuda.max_memory_allocated: tensors, not the caching allocator's reserve); on the CPU
    the process's peak resident set (getrusage ru_maxrss: Python and its libraries included)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss"  # KiB on Linux


def load_model(cfg: ModelConfig, model_dir: str, device):
    """The preset's transformers class from `model_dir`, in fp32 (as exported), on `device`, in eval mode."""
    import torch

    model = get_model_class(cfg).from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device).eval()


def build_evaluator(opts: EvalOptions, objective, task_cfg, tokenizer) -> Seq2SeqEval | CausalLMEval:
    """The objective's evaluator with its requests; EvalDataError if the task gives none."""
    try:
        evaluator = EVALUATORS[objective.name](objective, task_cfg, opts, tokenizer)
    except (ValueError, FileNotFoundError) as err:  # the task's files: unreadable, or nothing usable
        raise EvalDataError(str(err)) from None
    if not evaluator.examples:
        raise EvalDataError(f"the {opts.split} split has no example to score")
    return evaluator


def run_eval(opts: EvalOptions, model_cfg: ModelConfig, objective, task_cfg, run_dir: Path) -> EvalReport:
    """Score `opts.model` on the split and write RUN_DIR/eval/<split>_eval*. Every input is read
    and checked before the model is loaded: EvalDataError for one that cannot be used."""
    from data_prep.tokenizer import load_tokenizer

    ratings = read_ratings(opts.ratings) if opts.ratings else None
    with heap.collection_paused():  # transformers, the tokenizer, the model: all loading (trainer/heap.py)
        tokenizer = load_tokenizer(opts.model)
        evaluator = build_evaluator(opts, objective, task_cfg, tokenizer)
        rating_metrics = get_rating_metrics(ratings, evaluator.request_ids) if ratings is not None else {}
        device = get_device()
        log.info("loading %s on %s", opts.model, device)
        model = load_model(model_cfg, opts.model, device)
    log.info("scoring %d %s request(s) in batches of %d", len(evaluator.examples), opts.split, opts.batch_size)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{opts.split}_eval"
    evaluation = evaluator.run(model, out_dir, prefix)
    memory_bytes, memory_measure = get_peak_memory(device)
    metrics = {**evaluation.metrics, **summarize_requests(evaluation.records, evaluation.generate_s, memory_bytes),
               **rating_metrics}
    settings = {**opts.model_dump(), "device": str(device), "memory_measure": memory_measure}
    files = write_outputs(out_dir, prefix, evaluation.records, metrics, settings)
    return EvalReport(metrics, settings, [*files, *evaluation.files])


def write_outputs(out_dir: Path, prefix: str, records: list[dict], metrics: dict, settings: dict) -> list[Path]:
    predictions = write_predictions(records, out_dir / f"{prefix}_predictions.jsonl")
    summary = out_dir / f"{prefix}.json"
    summary.write_text(json.dumps({"metrics": metrics, "settings": settings}, indent=2, ensure_ascii=False) + "\n",
                       encoding="utf-8")
    return [summary, predictions]


# ---- MLflow --------------------------------------------------------------------------------

class TrackingError(Exception):
    """The evaluation did not (entirely) reach MLflow: unreachable, or refused."""


def log_to_mlflow(cfg: MLflowConfig, tracking_uri: str, run_dir: Path, run_name: str, step: int,
                  report: EvalReport) -> str:
    """The metrics as eval/<name> at `step`, the settings as t5ja_eval.* tags and the files as
    artifacts under eval/: into the training run (RUN_DIR/mlflow_run_id) if the store knows it,
    else into a new run named after the job. Returns the run id; TrackingError if the store
    cannot be reached or refuses something (the files are written already)."""
    from mlflow.tracking import MlflowClient

    limit_http_retries(cfg)  # no minutes of retries against a server that is down
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        run_id, is_new = _get_run(client, cfg, tracking_uri, run_dir, run_name)
        _log_report(client, run_id, step, report)
        if is_new:
            client.set_terminated(run_id, "FINISHED")
    except Exception as err:  # noqa: BLE001 - the evaluation is done and written: any tracking failure is reported
        raise TrackingError(f"{tracking_uri}: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    return run_id


def _get_run(client, cfg: MLflowConfig, tracking_uri: str, run_dir: Path, run_name: str) -> tuple[str, bool]:
    """(run id, created here): the training run if the store has it, else a new run. The new run's
    id is not written to RUN_DIR/mlflow_run_id: a later `t5ja train` of the job must not continue it."""
    from mlflow.exceptions import MlflowException

    id_file = run_dir / "mlflow_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            return client.get_run(run_id).info.run_id, False
        except MlflowException as err:
            if is_transient(err):
                raise
            log.warning("MLflow run %s of %s is not in this tracking store (%s): logging to a new run", run_id,
                        id_file, err.error_code)
    experiment_id = get_experiment_id(client, cfg.experiment, tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={f"{TAG_PREFIX}run_dir": str(run_dir)})
    return run.info.run_id, True


def _log_report(client, run_id: str, step: int, report: EvalReport) -> None:
    from mlflow.entities import Metric, RunTag

    timestamp_ms = int(time.time() * 1000)
    metrics = [Metric(MLFLOW_PREFIX + name, float(value), timestamp_ms, step) for name, value in report.metrics.items()]
    tags = [RunTag(TAG_PREFIX + name, str(value)) for name, value in report.settings.items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per log_batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    client.log_batch(run_id, tags=tags)
    for path in report.files:
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)

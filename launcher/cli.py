"""`t5ja`: the command line. Exit codes: 0 done, 1 unreadable input data (or a checkpoint that
cannot be converted), 2 bad job file or arguments, 3 training stopped at a non-finite loss
(train.nonfinite_loss=stop), 75 training stopped for preemption
(checkpoint written: run the same command again), 4 sbatch missing or refused the job
(launcher.backend=slurm), 5 `t5ja eval` evaluated and wrote its files but could not log to
MLflow, otherwise the failing stage's own code (torchrun's for training)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from launcher.job import ConfigError, check_launchable, check_preppable, load_job
from trainer.preemption import EXIT_PREEMPTED

EXIT_CONFIG = 2
EXIT_DATA = 1  # an input could not be read, or too many of its records were rejected
EXIT_SUBMIT = 4  # sbatch is missing or refused the script (launcher.backend=slurm)
EXIT_NOT_LOGGED = 5  # `t5ja eval`: files written and table printed, but MLflow unreachable or refusing

OVERRIDES_HELP = "dotted overrides applied after the YAML, e.g. train.lr=1e-4 launcher.nproc_per_node=2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t5ja",
        description="Config-driven DeepSpeed training of Japanese T5 models: prep data, train, browse in MLflow.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prep = sub.add_parser("prep", help="run data prep: corpora -> Arrow shards -> tokenizer -> packed token shards",
                          description="Run the data-prep stages of JOB (finished stages are skipped).")
    prep.add_argument("job", help="job YAML file")
    prep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    prep.add_argument("--task-index", type=int, default=None,
                      help="run only this share of the docs units (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN)")
    prep.add_argument("--num-tasks", type=int, default=None,
                      help="number of shares (default: $SLURM_ARRAY_TASK_COUNT); a later plain `t5ja prep` merges")
    prep.add_argument("--workers", type=int, default=None, help="worker processes (overrides data.num_workers)")
    prep.add_argument("--dry-run", action="store_true",
                      help="launcher.backend=slurm: print the rendered sbatch script, submit nothing")

    train = sub.add_parser("train", help="write the run directory and launch training under torchrun",
                           description="Validate JOB, write RUN_DIR (config.json, ds_config.json, command.sh) and "
                                       "run `torchrun ... -m trainer RUN_DIR/config.json`. An existing run "
                                       "directory with checkpoints is resumed.")
    train.add_argument("job", help="job YAML file")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, the filled ds_config and the command (with "
                            "launcher.backend=slurm: the rendered sbatch script); run nothing")

    finish = sub.add_parser("finish", help="(used by the Slurm job script) clear or read a run's stop markers",
                            description="What `t5ja train` does around torchrun, for the Slurm job script: "
                                        "--clear removes stale stop markers; --torchrun-code N exits with the "
                                        "run's exit code (75 preempted, 3 non-finite loss, else N) and records "
                                        "and explains a failure.")
    finish.add_argument("run_dir", help="the run directory")
    finish.add_argument("--clear", action="store_true", help="remove stop markers left by an earlier attempt")
    finish.add_argument("--torchrun-code", type=int, default=None, help="torchrun's exit code on this node")

    quick = sub.add_parser("quickstart", help="the whole pipeline on the bundled sample text (CPU, ~5 min)",
                           description="Prep the bundled Aozora Bunko sample, train a tokenizer, pretrain t5-tiny "
                                       "with ZeRO-2 on 2 processes, export it, log everything to MLflow.")
    quick.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    quick.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    export = sub.add_parser("export", help="write a Hugging Face model directory from a run's checkpoint",
                            description="Gather a ZeRO-1/2/3 checkpoint of RUN_DIR into a save_pretrained "
                                        "directory (safetensors) with the tokenizer.")
    export.add_argument("run_dir", help="the run directory (holds config.json and checkpoints/)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest usable one)")
    export.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export)")

    checkpoint = sub.add_parser("checkpoint", help="operate on a run's checkpoints (convert)",
                                description="Operate on the checkpoints of a run directory.")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    convert = checkpoint_sub.add_parser(
        "convert", help="write the universal form of a checkpoint, to resume on another number of ranks",
        description="Convert a checkpoint of RUN_DIR into DeepSpeed's universal form (STEP_DIR/universal), "
                    "which `t5ja train` loads when the run resumes on another data-parallel size. Training "
                    "does this itself on rank 0; converting ahead of time keeps the other ranks from "
                    "waiting. Exit codes: 0 done, 1 the checkpoint cannot be converted, 2 no such run "
                    "directory or checkpoint.")
    convert.add_argument("run_dir", help="the run directory (holds config.json and checkpoints/)")
    convert.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest usable one)")
    convert.add_argument("--workers", type=int, default=1, help="processes extracting and merging the shards")

    estimate = sub.add_parser("estimate", help="memory of the model states per GPU for each ZeRO stage",
                              description="DeepSpeed's estimate of the model-state memory (parameters, gradients, "
                                          "Adam states) per GPU and CPU per node for ZeRO-1/2/3 with and without "
                                          "CPU offload, for JOB's model preset and cluster shape (launcher.nnodes x "
                                          "launcher.nproc_per_node). Needs no data and no GPU.")
    estimate.add_argument("job", help="job YAML file")
    estimate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    estimate.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU in GiB (default: 80)")

    add_eval_parser(sub)

    validate = sub.add_parser("validate", help="check job files and print every problem",
                              description="Validate each JOB file (with overrides) and report every problem.")
    validate.add_argument("jobs", nargs="+", help="job YAML files, then optional overrides")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_eval_parser(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="score a trained model on its task: task metrics, pass@1, speed, latency, errors, memory",
        description="Score the model of JOB (default RUN_DIR/export) on a split of the job's task, on one device "
                    "(CUDA if available, else CPU): the task's metrics (precision/recall/F1, EM/F1, ...; "
                    "objective causal_lm: loss and perplexity), pass@1, requests/s, latency mean/p50/p95, error "
                    "rate, peak memory, and the mean of human ratings with --ratings. Writes "
                    "RUN_DIR/eval/<split>_eval.json, <split>_eval_predictions.jsonl and the task's report, logs "
                    "eval/* metrics and the files to the job's MLflow run, prints a table. Exit codes: 0 done, "
                    "1 unusable input (ratings CSV, task data), 2 bad job file or arguments (no model "
                    "directory), 5 evaluated and written but not logged to MLflow (tracking server unreachable "
                    "or refusing).")
    evaluate.add_argument("job", help="job YAML file (objective seq2seq or causal_lm)")
    evaluate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    evaluate.add_argument("--model", default=None, metavar="PATH",
                          help="Hugging Face model directory to score (default: RUN_DIR/export)")
    evaluate.add_argument("--split", choices=("test", "validation"), default=None,
                          help="the task split (default: the job's eval.split)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                          help="requests per generate() call: the batch the speed is measured at (default: "
                               "eval.batch_size)")
    evaluate.add_argument("--max-new-tokens", type=_positive_int, default=None, metavar="N",
                          help="tokens generated per request at most (default: eval.max_new_tokens, else seq2seq "
                               "objective.target_length, causal_lm 128)")
    evaluate.add_argument("--ratings", default=None, metavar="CSV",
                          help="CSV of human ratings, header request_id,rating (integers 1-5): their mean and count "
                               "(request ids: the `id` of the predictions file)")
    evaluate.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                          help="score only the split's first N examples")


def cmd_prep(args) -> int:
    from data_prep.pipeline import run_prep

    overrides = list(args.overrides) + ([f"data.num_workers={args.workers}"] if args.workers is not None else [])
    job = load_job(args.job, overrides)
    check_preppable(job, args.job)
    if job.launcher.backend == "slurm":
        return submit_prep_job(job, args.dry_run)
    run_prep(job.data, job.tokenizer, pack_length=job.pack_length, task_index=args.task_index,
             num_tasks=args.num_tasks)
    return 0


def cmd_train(args) -> int:
    from launcher.run import launch_local, plan_run, write_run

    job = load_job(args.job, args.overrides)
    check_launchable(job, args.job)
    plan = plan_run(job)
    if job.launcher.backend == "slurm":
        return submit_train_job(job, plan, args.dry_run)
    if args.dry_run:
        print("# resolved config (RUN_DIR/config.json)")
        print(json.dumps(plan.config, indent=2, ensure_ascii=False))
        print("# filled DeepSpeed config (RUN_DIR/ds_config.json)")
        print(json.dumps(plan.ds_config, indent=2))
        print("# command")
        print(" ".join(f"{k}={v}" for k, v in plan.env.items()), shlex.join(plan.command))
        print(f"# training length: {job.train.describe_length()}")
        return 0
    write_run(plan)
    print(f"run directory: {plan.run_dir}", flush=True)
    code = launch_local(plan)
    if code == EXIT_PREEMPTED:
        print(f"preempted: checkpoint written; run the same command to resume ({plan.run_dir})", file=sys.stderr)
    return code


def submit_train_job(job, plan, dry_run: bool) -> int:
    from launcher import slurm
    from launcher.run import write_run

    if dry_run:
        print(slurm.render_train_script(job, plan), end="")
        return 0
    write_run(plan)
    try:
        submission = slurm.submit_train(job, plan)
    except slurm.SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SUBMIT
    job_id = submission.job_ids[0]
    log = plan.run_dir.resolve() / "logs" / f"{job.name}-{job_id}.out"
    print(f"submitted Slurm job {job_id}: {submission.script}\n"
          f"  follow:   squeue -j {job_id}; tail -f {log}\n"
          f"  cancel:   scancel {job_id} (scancel --signal=USR1 {job_id}: checkpoint, then requeue)\n"
          f"  continue: sbatch {submission.script}")
    return 0


def submit_prep_job(job, dry_run: bool) -> int:
    from launcher import slurm

    if dry_run:
        print(slurm.render_prep_script(job), end="")
        return 0
    try:
        submission = slurm.submit_prep(job)
    except slurm.SubmitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_SUBMIT
    array_id, merge_id = submission.job_ids
    print(f"submitted Slurm array job {array_id} ({slurm.get_num_prep_tasks(job)} tasks) and merge job "
          f"{merge_id} (after it succeeds): {submission.script}\n"
          f"  follow:   squeue -j {array_id},{merge_id}; logs in {submission.script.parent}")
    return 0


def cmd_finish(args) -> int:
    from launcher.run import clear_markers, finish_run

    run_dir = Path(args.run_dir)
    if args.clear:
        clear_markers(run_dir)
    if args.torchrun_code is None:
        return 0
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return finish_run(run_dir, config, args.torchrun_code)


def cmd_validate(args) -> int:
    files = [a for a in args.jobs if "=" not in a]
    overrides = [a for a in args.jobs if "=" in a]
    status = 0
    for path in files:
        try:
            check_launchable(load_job(path, overrides), path)
            print(f"{path}: ok")
        except ConfigError as err:
            print(err, file=sys.stderr)
            status = EXIT_CONFIG
    return status


def cmd_export(args) -> int:
    from trainer.export import export_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir}: not a run directory (no config.json)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        out = export_run(run_dir, args.step, Path(args.out) if args.out else None)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"exported to {out}")
    return 0


def get_eval_options(job, args):
    """The evaluation's options (trainer.evaluate.build_eval_options); ConfigError naming every
    problem (an objective with no task, no model directory, ...)."""
    from trainer.evaluate import build_eval_options

    given = {name: getattr(args, name) for name in ("model", "split", "batch_size", "max_new_tokens", "limit", "ratings")}
    opts, problems = build_eval_options(job.objective, job.eval, job.run_dir, given)
    if problems:
        raise ConfigError(args.job, problems)
    return opts


def cmd_eval(args) -> int:
    import logging

    from finetune.serving import format_eval_table
    from trainer.evaluate import EvalDataError, run_eval

    job = load_job(args.job, args.overrides)
    opts = get_eval_options(job, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("trainer").setLevel(logging.INFO)
    try:
        report = run_eval(opts, job.model, job.objective, job.task, job.run_dir)
    except EvalDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DATA
    print("wrote " + ", ".join(str(path) for path in report.files))
    code = log_eval(job, report)
    print(format_eval_table(report.table()))
    return code


def log_eval(job, report) -> int:
    """The evaluation into the job's MLflow run (trainer.evaluate.log_to_mlflow): 0, or
    EXIT_NOT_LOGGED with a warning when the store cannot be reached or refuses."""
    from trainer.evaluate import TrackingError, get_final_step, log_to_mlflow

    if not job.mlflow.enabled:
        print("MLflow: not logged (mlflow.enabled is false)")
        return 0
    try:
        final_step = get_final_step(job.train.steps, job.run_dir)  # steps is None for a run of epochs
        run_id = log_to_mlflow(job.mlflow, job.tracking_uri, job.run_dir, job.name, final_step, report)
    except TrackingError as err:
        print(f"warning: MLflow: NOT logged ({err}); the files above hold every figure (exit code "
              f"{EXIT_NOT_LOGGED})", file=sys.stderr)
        return EXIT_NOT_LOGGED
    print(f"MLflow: logged to run {run_id} (experiment {job.mlflow.experiment!r}, {job.tracking_uri})")
    return 0


def cmd_checkpoint(args) -> int:
    from trainer import checkpoint as ckpt
    from trainer.config import load_worker_config
    from trainer.export import choose_tag

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        print(f"error: {run_dir}: not a run directory (no config.json)", file=sys.stderr)
        return EXIT_CONFIG
    verify = load_worker_config(run_dir / "config.json").checkpoint.verify
    try:
        path = ckpt.checkpoints_dir(run_dir) / choose_tag(run_dir, args.step, verify)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        out = ckpt.ensure_universal(path, verify, num_workers=args.workers)
    except Exception as err:  # noqa: BLE001 - DeepSpeed's converter raises anything, asserts included
        print(f"error: {path}: cannot convert it to a universal checkpoint: {type(err).__name__}: {err}",
              file=sys.stderr)
        return EXIT_DATA
    topology = ckpt.get_saved_topology(path)
    print(f"universal checkpoint: {out} (saved with data-parallel size {topology['dp_world_size']}; loads with "
          "any)")
    return 0


def cmd_estimate(args) -> int:
    from pydantic import ValidationError

    from launcher.estimate import EstimateConfig, estimate_job, format_table, load_estimate_inputs
    from launcher.job import pydantic_problems

    try:
        cfg = EstimateConfig(gpu_memory_gib=args.gpu_memory_gib)
    except ValidationError as err:
        raise ConfigError("--gpu-memory-gib", pydantic_problems(err)) from None
    print(format_table(estimate_job(load_estimate_inputs(args.job, args.overrides), cfg)))
    return 0


def cmd_quickstart(args) -> int:
    from launcher.quickstart import run_quickstart

    return run_quickstart(Path(args.out), args.overrides)


COMMANDS = {"prep": cmd_prep, "train": cmd_train, "quickstart": cmd_quickstart, "validate": cmd_validate,
            "export": cmd_export, "checkpoint": cmd_checkpoint, "finish": cmd_finish,
            "estimate": cmd_estimate, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    from data_prep.errors import PrepError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except PrepError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_DATA


def entry() -> None:
    """The `t5ja` command: main(), then out without the interpreter's teardown of torch,
    DeepSpeed and transformers (1-2 s of nothing at the end of every command)."""
    from trainer.fast_exit import exit_without_teardown

    exit_without_teardown(main())


if __name__ == "__main__":
    entry()

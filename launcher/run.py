"""Turn a validated job into a run: the run directory's files and the torchrun command.

`plan_run` is pure (what --dry-run prints); `write_run` puts the plan on disk;
`launch_local` starts torchrun and returns its exit code.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_prep import layout
from launcher.config import JobConfig
from launcher.ds_config import BatchSizes, fill_ds_config, read_ds_config
from trainer import nonfinite
from trainer.config import RunInfo
from trainer.preemption import EXIT_PREEMPTED, clear_marker, read_marker
from trainer.run_health import TORCHELASTIC_DIR, record_failed_submission

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# SIGUSR1 is what Slurm sends ahead of preemption: without it in torchrun's list torchrun dies of it.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass
class RunPlan:
    run_dir: Path
    config: dict  # the resolved job plus its `run` section: RUN_DIR/config.json
    ds_config: dict  # the filled DeepSpeed config: RUN_DIR/ds_config.json
    command: list[str]
    env: dict[str, str]  # variables set on top of the caller's environment


def get_tokenizer_dir(job: JobConfig) -> str:
    """model.init_from's tokenizer (it matches those weights), else the one data prep uses."""
    if job.model.init_from:
        return job.model.init_from
    if job.tokenizer.path:
        return job.tokenizer.path
    if job.data is None:
        raise ValueError("no tokenizer: set model.init_from, tokenizer.path or data.output_dir")
    return str(layout.tokenizer_dir(job.data.output_dir))


def _run_info(job: JobConfig, batch: BatchSizes) -> RunInfo:
    run_dir = job.run_dir
    # Only span corruption reads data prep's token shards; seq2seq and causal_lm read their task's files.
    uses_tokens = job.data is not None and job.objective.name == "span_corruption"
    return RunInfo(
        run_dir=str(run_dir),
        ds_config=str(run_dir / "ds_config.json"),
        tokens_dir=str(layout.tokens_dir(job.data.output_dir)) if uses_tokens else None,
        tokenizer_dir=get_tokenizer_dir(job),
        world_size=batch.world_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps,
        tracking_uri=job.tracking_uri,
        job_name=job.name,
    )


def torchrun_command(job: JobConfig, config_path: Path) -> list[str]:
    launcher = job.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(launcher.nnodes),
           "--nproc-per-node", str(launcher.nproc_per_node), "--max-restarts", str(launcher.max_restarts),
           "--signals-to-handle", TORCHRUN_SIGNALS,
           "--shutdown-timeout", str(launcher.shutdown_timeout_s),
           # Keeps the workers' error files (root-cause tracebacks) with the run: trainer/run_health.py.
           "--log-dir", str(job.run_dir / TORCHELASTIC_DIR)]
    if launcher.master_port is None:
        cmd.append("--standalone")
    else:
        # c10d, not the static rendezvous of --master-port: static keeps one store for every
        # restart round whatever the environment says (see worker_env).
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{launcher.master_port}"]
    return cmd + ["-m", "trainer", str(config_path)]


def worker_env(job: JobConfig) -> dict[str, str]:
    # torch >= 2.5 shares the rendezvous TCPStore with the workers and keeps it across
    # --max-restarts rounds: a restarted round then finds the dead round's gloo/NCCL
    # addresses under the same keys and fails with "Connection refused" (pytorch#135712).
    # Without sharing, each round's rank 0 hosts a fresh store on a fresh port.
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if "DS_ACCELERATOR" not in os.environ and shutil.which("nvidia-smi") is None:
        # DeepSpeed would otherwise probe for CUDA and fail. nvidia-smi, not torch.cuda: the
        # same test as the Makefile's torch install and slurm/train.sbatch, without the 2+ s
        # of importing torch here.
        env["DS_ACCELERATOR"] = "cpu"
    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun defaults to 1 thread per worker; share the cores among the workers instead.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // job.launcher.nproc_per_node))
    return env


def plan_run(job: JobConfig) -> RunPlan:
    batch = BatchSizes(job.train.global_batch_size, job.train.micro_batch_size, job.world_size)
    ds, _ = read_ds_config(Path(job.deepspeed.config))  # load_job already reported any problem
    run = _run_info(job, batch)
    config = {**job.model_dump(), "run": run.model_dump()}
    command = torchrun_command(job, job.run_dir / "config.json")
    return RunPlan(job.run_dir, config, fill_ds_config(ds, job.train, batch), command, worker_env(job))


def write_run(plan: RunPlan) -> None:
    (plan.run_dir / "logs").mkdir(parents=True, exist_ok=True)
    _write_json(plan.run_dir / "config.json", plan.config)
    _write_json(plan.run_dir / "ds_config.json", plan.ds_config)
    if plan.config["launcher"]["backend"] != "local":
        return  # the Slurm backend writes submit.sbatch instead
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
    (plan.run_dir / "command.sh").write_text(f"#!/bin/sh\n{env} {shlex.join(plan.command)}\n", encoding="utf-8")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def launch_local(plan: RunPlan) -> int:
    """Run torchrun; SIGTERM/SIGUSR1/SIGINT sent to us are passed on to it (and by it to the
    workers, which checkpoint). Returns EXIT_PREEMPTED when the workers stopped for preemption,
    EXIT_NONFINITE_LOSS when they stopped for a NaN/inf loss, else torchrun's code."""
    clear_markers(plan.run_dir)
    child = subprocess.Popen(plan.command, env={**os.environ, **plan.env})

    def forward(signum, frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return finish_run(plan.run_dir, plan.config, code)


def clear_markers(run_dir: Path) -> None:
    """Stop markers of an earlier attempt would be read as this attempt's reason to stop."""
    clear_marker(run_dir)
    nonfinite.clear_marker(run_dir)


def finish_run(run_dir: Path, config: dict, torchrun_code: int) -> int:
    """After torchrun (here or in a Slurm job): the job's exit code, with failures recorded
    for the crash count and explained on stderr."""
    code = get_exit_code(run_dir, torchrun_code)
    if code not in (0, EXIT_PREEMPTED):
        if code != nonfinite.EXIT_NONFINITE_LOSS:  # a policy stop, not a crash
            record_failed_submission(run_dir, code)
        print(f"error: {describe_failure(run_dir, config, code)}", file=sys.stderr)
    return code


def get_exit_code(run_dir: Path, torchrun_code: int) -> int:
    """torchrun exits 1 whatever its workers' codes were; the workers' marker says why."""
    if read_marker(run_dir) is not None:
        return EXIT_PREEMPTED
    if nonfinite.read_marker(run_dir) is not None:
        return nonfinite.EXIT_NONFINITE_LOSS
    return torchrun_code


def describe_failure(run_dir: Path, config: dict, code: int) -> str:
    from trainer.checkpoint import get_latest_tag

    stopped = nonfinite.read_marker(run_dir)
    if stopped is not None:
        return stopped["message"]
    latest = get_latest_tag(run_dir)
    resumes = latest and config["checkpoint"]["resume"]
    again = (f"`sbatch {run_dir / 'submit.sbatch'}`" if "SLURM_JOB_ID" in os.environ  # the job script's call
             else "Running the same command again")
    resume = f" {again} resumes from {latest}." if resumes else ""
    return (f"training failed (torchrun exit code {code}) with launcher.max_restarts="
            f"{config['launcher']['max_restarts']}; the ranks' logs are in {run_dir / 'logs'}.{resume}")

"""The Slurm backend: render slurm/*.sbatch from the job file and submit them with sbatch.

`render_train_script` / `render_prep_script` are pure (what --dry-run prints); the `submit_*`
functions write the scripts where the state lives (the run directory, the data directory)
and run `sbatch --parsable`. Every value taken from the job file is shell-quoted when
rendered: a job name such as `x; rm -rf ~` ends up a harmless literal.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from launcher.config import JobConfig
    from launcher.run import RunPlan

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "slurm"
SUBMIT_SCRIPT = "submit.sbatch"
JOBS_FILE = "slurm_jobs.jsonl"  # one line per submission: the job ids of this run directory
PREP_DIR = "slurm"  # under data.output_dir: prep.sbatch, job.json
_SLURM_TIME = r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(UNLIMITED|INFINITE)$"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class SlurmConfig(BaseModel):
    """Slurm settings of a job (launcher.backend=slurm): the #SBATCH header and the
    requeue policy. Rendered into RUN_DIR/submit.sbatch from slurm/train.sbatch."""

    model_config = ConfigDict(extra="forbid")

    job_name: str | None = Field(None, description="#SBATCH --job-name (what squeue shows); None: the job's name")
    partition: str | None = Field(None, description="#SBATCH --partition; None: the cluster's default")
    account: str | None = Field(None, description="#SBATCH --account")
    qos: str | None = Field(None, description="#SBATCH --qos")
    time: str = Field("24:00:00", pattern=_SLURM_TIME,
                      description="#SBATCH --time, Slurm's formats: MM, HH:MM:SS, D-HH[:MM[:SS]]")
    gpus_per_node: int = Field(0, ge=0, description="#SBATCH --gpus-per-node; 0: request none (CPU jobs)")
    cpus_per_task: int | None = Field(None, ge=1, description="#SBATCH --cpus-per-task (the one task per node runs torchrun)")
    mem: str | None = Field(None, pattern=r"^\d+[KMGT]?$", description="#SBATCH --mem per node, e.g. 200G; 0: all of it")
    signal_lead_s: int = Field(
        120, ge=1, le=65535,
        description="#SBATCH --signal=USR1@N: seconds before the time limit that Slurm sends SIGUSR1 to the "
                    "training processes, which then checkpoint and requeue (Slurm may signal up to 60 s early)")
    max_requeues: int = Field(
        3, ge=0, description="times the job requeues itself after a preemption checkpoint (SLURM_RESTART_COUNT "
                             "counts them); then it ends and `sbatch RUN_DIR/submit.sbatch` continues")
    rendezvous: Literal["c10d", "static"] = Field(
        "c10d", description="c10d: torchrun's elastic rendezvous at the head node (needed for launcher.max_restarts); "
                            "static: --master-addr/--node-rank from SLURM_NODEID, for nodes that share a hostname")
    port: int = Field(29500, ge=1, le=65535, description="rendezvous port on the head node")
    socket_ifname: str | None = Field(
        None, description="network interface of the interconnect: exported as NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables exported in the job script")
    sbatch_args: list[str] = Field(
        default_factory=list, description="more #SBATCH options, each as one '--key=value' string (e.g. --exclusive)")
    prep_array_tasks: int | None = Field(
        None, ge=1, description="array tasks of `t5ja prep` on Slurm, each one share of the docs units; None: launcher.nnodes")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            raise ValueError(f"not environment variable names: {bad}")
        return env


@dataclass
class Submission:
    script: Path
    job_ids: list[str]


class SubmitError(Exception):
    """sbatch is missing or refused the script."""


# ---- rendering ----------------------------------------------------------------------------

def render(template: str, values: dict[str, str]) -> str:
    """Fill `{{name}}` placeholders; the values are already shell-safe text."""
    missing = sorted({m for m in _PLACEHOLDER.findall(template) if m not in values})
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def read_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


def sbatch_header(job: JobConfig, job_name: str, output: Path, extra: list[str]) -> str:
    slurm = job.launcher.slurm
    options = [f"--job-name={slurm.job_name or job_name}", f"--output={output}", f"--time={slurm.time}"]
    optional = {"partition": slurm.partition, "account": slurm.account, "qos": slurm.qos,
                "cpus-per-task": slurm.cpus_per_task, "mem": slurm.mem,
                "gpus-per-node": slurm.gpus_per_node or None}
    options += [f"--{key}={value}" for key, value in optional.items() if value is not None]
    options += extra + list(slurm.sbatch_args)
    # sbatch reads #SBATCH lines without a shell, word by word: quoting keeps a value one word
    # and a shell reading the file sees only comments.
    return "\n".join(f"#SBATCH {shlex.quote(option)}" for option in options)


def exports(job: JobConfig, fixed: dict[str, str]) -> str:
    slurm = job.launcher.slurm
    env = dict(fixed)
    if slurm.socket_ifname:
        env.update(NCCL_SOCKET_IFNAME=slurm.socket_ifname, GLOO_SOCKET_IFNAME=slurm.socket_ifname)
    env.update(slurm.env)
    # Names were checked by SlurmConfig; values are quoted.
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())


def torchrun_args(job: JobConfig, plan: RunPlan) -> list[str]:
    """torchrun's arguments for one node, one option per item; `$SLURM_NNODES`/`$head_addr`
    are expanded by the job shell at run time, everything else is a quoted constant."""
    from launcher.run import TORCHELASTIC_DIR, TORCHRUN_SIGNALS

    launcher, slurm = job.launcher, job.launcher.slurm
    run_dir = plan.run_dir.resolve()
    args = ['"$PYTHON" -m torch.distributed.run', '--nnodes "$SLURM_NNODES"',
            f"--nproc-per-node {launcher.nproc_per_node}", f"--max-restarts {launcher.max_restarts}",
            f"--signals-to-handle {TORCHRUN_SIGNALS}", f"--shutdown-timeout {launcher.shutdown_timeout_s}",
            f"--log-dir {shlex.quote(str(run_dir / TORCHELASTIC_DIR))}"]
    if slurm.rendezvous == "c10d":
        args += ["--rdzv-backend c10d", '--rdzv-id "$SLURM_JOB_ID"', f'--rdzv-endpoint "$head_addr:{slurm.port}"']
    else:
        args += ['--master-addr "$head_addr"', f"--master-port {slurm.port}"]
    return args + [f"-m trainer {shlex.quote(str(run_dir / 'config.json'))}"]


def render_train_script(job: JobConfig, plan: RunPlan) -> str:
    from trainer.preemption import EXIT_PREEMPTED

    slurm = job.launcher.slurm
    run_dir = plan.run_dir.resolve()
    extra = [f"--nodes={job.launcher.nnodes}", "--ntasks-per-node=1", "--requeue", "--open-mode=append",
             f"--signal=USR1@{slurm.signal_lead_s}", f"--chdir={Path.cwd()}"]
    # The validated run name, not %x: a free-text Slurm job name may hold a "/".
    header = sbatch_header(job, job.name, run_dir / "logs" / f"{job.name}-%j.out", extra)
    fixed_env = {k: v for k, v in plan.env.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    values = {
        "sbatch_header": header, "run_dir": shlex.quote(str(run_dir)), "python": shlex.quote(sys.executable),
        "max_requeues": str(slurm.max_requeues), "exit_preempted": str(EXIT_PREEMPTED),
        "nproc_per_node": str(job.launcher.nproc_per_node), "workdir": shlex.quote(str(Path.cwd())),
        "exports": exports(job, fixed_env), "torchrun": " \\\n    ".join(torchrun_args(job, plan)),
    }
    return render(read_template("train.sbatch"), values)


def get_num_prep_tasks(job: JobConfig) -> int:
    return job.launcher.slurm.prep_array_tasks or job.launcher.nnodes


def prep_dir(job: JobConfig) -> Path:
    return Path(job.data.output_dir).resolve() / PREP_DIR


def render_prep_script(job: JobConfig) -> str:
    out_dir = prep_dir(job)
    num_tasks = get_num_prep_tasks(job)
    extra = ["--nodes=1", "--ntasks=1", f"--chdir={Path.cwd()}"]
    header = sbatch_header(job, f"{job.name}-prep", out_dir / f"{job.name}-prep-%A_%a.out", extra)
    values = {
        "sbatch_header": header, "python": shlex.quote(sys.executable),
        "job_file": shlex.quote(str(out_dir / "job.json")), "num_tasks": str(num_tasks),
        "last_task": str(num_tasks - 1), "workdir": shlex.quote(str(Path.cwd())), "exports": exports(job, {}),
    }
    return render(read_template("prep_array.sbatch"), values)


# ---- submitting ---------------------------------------------------------------------------

def sbatch(script: Path, *options: str) -> str:
    """Submit; returns the job id. SubmitError says what sbatch said."""
    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch not found: run on a Slurm login node (or set launcher.backend=local)")
    result = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmitError(f"sbatch {' '.join(options)} {script} failed (exit {result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]  # "id" or "id;cluster"


def submit_train(job: JobConfig, plan: RunPlan) -> Submission:
    """RUN_DIR/submit.sbatch, submitted; the run directory must already be written."""
    script = plan.run_dir / SUBMIT_SCRIPT
    _write_script(script, render_train_script(job, plan))
    job_id = sbatch(script)
    _record_jobs(plan.run_dir, "train", [job_id])
    return Submission(script, [job_id])


def submit_prep(job: JobConfig) -> Submission:
    """The array job of `t5ja prep --task-index`, then the merge job after it succeeds."""
    out_dir = prep_dir(job)
    out_dir.mkdir(parents=True, exist_ok=True)
    frozen = job.model_dump(mode="json")
    frozen["launcher"]["backend"] = "local"  # what each task runs; the template says so too
    (out_dir / "job.json").write_text(json.dumps(frozen, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    script = out_dir / "prep.sbatch"
    _write_script(script, render_prep_script(job))
    array_id = sbatch(script, f"--array=0-{get_num_prep_tasks(job) - 1}")
    merge_id = sbatch(script, f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes")
    _record_jobs(out_dir, "prep", [array_id, merge_id])
    return Submission(script, [array_id, merge_id])


def _write_script(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o755)
    tmp.replace(path)


def _record_jobs(directory: Path, kind: str, job_ids: list[str]) -> None:
    with open(directory / JOBS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), "kind": kind, "job_ids": job_ids}) + "\n")

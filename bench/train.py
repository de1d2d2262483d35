"""Trainer throughput against a bare DeepSpeed loop, and checkpoint save rate against the disk.

    python bench/train.py [--presets t5-tiny,t5-small-ja] [--stages zero2,zero3] [--repeats 2]
                          [--steps 30] [--from-step 10] [--work-dir runs/bench-train]

For every (preset, ZeRO stage), `--repeats` times, interleaved:

  project  `t5ja train` exactly as a user runs it (2 CPU ranks under torchrun, span-corruption
           batches from packed token shards, metrics every `train.log_every` steps to
           metrics.jsonl and MLflow, the final checkpoint and export). Throughput is taken
           from metrics.jsonl's wall-clock times of the log lines at --from-step and --steps,
           so it includes data loading, logging and every per-step cost of the loop.
  bare     bench/train_bare.py under torchrun on the same run directory: the same model,
           optimizer and filled ds_config, one synthetic batch of the same shapes, timed over
           the same steps between two barriers.

Tokens are packed-window tokens (input_length 128 -> 141 per sample, as the trainer counts
them). Then, per project run: the final checkpoint's bytes and `checkpoint/save_s` (all of
it: DeepSpeed's files, RNG states, the manifest's sha256, fsyncs, the atomic rename) against
the disk's sequential write rate measured right after it in the same run (a file of the
checkpoint's size, at least 256 MiB, written in 16 MiB blocks and fsynced).
Goals of the training-resilience issue: project ≥ 97% of bare; save ≥ 50% of the disk rate.

    python bench/train.py --telemetry-overhead [--presets t5-tiny] [--stages zero2] [--repeats 5]

compares, interleaved, `t5ja train` with the per-node system monitor sampling every second
(ten times the default rate) against `telemetry.enabled=false`, and times one monitor sample
in this process (the cost per sample, whatever the interval). Goal of the telemetry issue:
monitors and logging < 1% of step time.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.metrics import read_records  # noqa: E402  (needs the path above)

INPUT_LENGTH = 128
GLOBAL_BATCH = 16
MICRO_BATCH = 4
NPROC = 2
DISK_BLOCK = 16 * 2**20
DISK_MIN_BYTES = 256 * 2**20


def prepare_data(work_dir: Path) -> Path:
    """neko.txt -> a 4000-piece tokenizer -> 141-token windows, once (cached in the work dir)."""
    from data_prep.config import DataConfig, TokenizerConfig
    from data_prep.pipeline import run_prep
    from trainer.span_corruption import SpanCorruptionConfig

    out = work_dir / "data"
    pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
    run_prep(DataConfig(inputs=[{"path": str(ROOT / "data_prep/samples/neko.txt")}], output_dir=str(out)),
             TokenizerConfig(vocab_size=4000, sample_sentences=100_000), pack_length=pack_length, log=lambda *a: None)
    return out


def job_overrides(out: Path, data: Path, preset: str, stage: str, steps: int, log_every: int) -> list[str]:
    return ["name=bench", f"output_dir={out}", f"data.output_dir={data}", f"model.preset={preset}",
            f"deepspeed.config={stage}", f"train.steps={steps}", f"train.log_every={log_every}",
            f"train.global_batch_size={GLOBAL_BATCH}", f"train.micro_batch_size={MICRO_BATCH}",
            "train.precision=fp32", f"objective.input_length={INPUT_LENGTH}", "checkpoint.every_steps=0",
            f"launcher.nproc_per_node={NPROC}", "mlflow.log_model=false"]


def run_project(out: Path, data: Path, preset: str, stage: str, args, log, extra: tuple[str, ...] = ()) -> dict:
    overrides = job_overrides(out, data, preset, stage, args.steps, args.from_step) + list(extra)
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(ROOT / "configs/quickstart.yaml"), *overrides]
    if subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        return {"error": f"t5ja train failed (see {log.name})"}
    run_dir = out / "bench"
    rows = read_records(run_dir / "metrics.jsonl")
    times = {row["step"]: row["time"] for row in rows if "train/loss" in row}
    saves = [row["checkpoint/save_s"] for row in rows if "checkpoint/save_s" in row]
    checkpoint = max((run_dir / "checkpoints").glob("step_*"))
    return {"seconds": times[args.steps] - times[args.from_step], "save_s": saves[-1],
            "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
            "run_dir": run_dir}


def launcher_env(run_dir: Path) -> dict[str, str]:
    """The variables the launcher set for the workers (DS_ACCELERATOR, OMP_NUM_THREADS), from
    the run's command.sh: the bare loop runs under the same ones."""
    line = (run_dir / "command.sh").read_text().splitlines()[1]
    env = {}
    for word in shlex.split(line):
        if "=" not in word or word.startswith("-"):
            break
        key, _, value = word.partition("=")
        env[key] = value
    return env


def run_bare(run_dir: Path, args, log) -> dict:
    result = run_dir / "bare.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(NPROC),
           str(ROOT / "bench/train_bare.py"), str(run_dir), "--steps", str(args.steps),
           "--from-step", str(args.from_step), "--result", str(result)]
    env = {**os.environ, **launcher_env(run_dir)}
    if subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        return {"error": f"bare loop failed (see {log.name})"}
    return json.loads(result.read_text())


def disk_write_rate(directory: Path, num_bytes: int) -> float:
    """Sequential write rate (bytes/s) of a fresh file in `directory`, fsynced, then deleted."""
    path = directory / "disk-rate.tmp"
    block = os.urandom(DISK_BLOCK)
    num_blocks = max(1, -(-max(num_bytes, DISK_MIN_BYTES) // DISK_BLOCK))
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(num_blocks):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return num_blocks * DISK_BLOCK / seconds


def measure(preset: str, stage: str, repeat: int, data: Path, args, log) -> dict:
    out = args.work_dir / "runs" / f"{preset}-{stage}-{repeat}"
    shutil.rmtree(out, ignore_errors=True)
    project = run_project(out, data, preset, stage, args, log)
    if "error" in project:
        return project
    bare = run_bare(project["run_dir"], args, log)
    disk = disk_write_rate(out, project["checkpoint_bytes"])
    shutil.rmtree(out, ignore_errors=True)
    if "error" in bare:
        return bare
    return {"project_s": project["seconds"], "bare_s": bare["seconds"], "save_s": project["save_s"],
            "checkpoint_bytes": project["checkpoint_bytes"], "disk_bytes_s": disk}


def tokens_per_s(seconds: float, args) -> float:
    from trainer.span_corruption import SpanCorruptionConfig

    pack_length = SpanCorruptionConfig(input_length=INPUT_LENGTH).expanded_length
    return (args.steps - args.from_step) * GLOBAL_BATCH * pack_length / seconds


def print_table(results: dict[tuple[str, str], list[dict]], args) -> None:
    print(f"\nN = {NPROC} CPU ranks, global batch {GLOBAL_BATCH} x {INPUT_LENGTH} input tokens, steps "
          f"{args.from_step + 1}..{args.steps}, median of {args.repeats}; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'preset':12s} {'ZeRO':6s} {'project tok/s':>14s} {'bare tok/s':>11s} {'ratio':>6s}   "
          f"{'ckpt MB':>8s} {'save s':>7s} {'save MB/s':>10s} {'disk MB/s':>10s} {'ratio':>6s}  runs (project/bare s)")
    for (preset, stage), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"{preset:12s} {stage:6s} FAILED: {runs[0]['error']}")
            continue
        project = statistics.median(tokens_per_s(r["project_s"], args) for r in ok)
        bare = statistics.median(tokens_per_s(r["bare_s"], args) for r in ok)
        ckpt_mb = statistics.median(r["checkpoint_bytes"] for r in ok) / 1e6
        save_s = statistics.median(r["save_s"] for r in ok)
        disk = statistics.median(r["disk_bytes_s"] for r in ok) / 1e6
        runs_text = " ".join(f"{r['project_s']:.1f}/{r['bare_s']:.1f}" for r in ok)
        print(f"{preset:12s} {stage:6s} {project:14.0f} {bare:11.0f} {project / bare:6.3f}   "
              f"{ckpt_mb:8.1f} {save_s:7.2f} {ckpt_mb / save_s:10.1f} {disk:10.1f} {ckpt_mb / save_s / disk:6.2f}  "
              f"{runs_text}")
    print("\ngoals: project/bare ≥ 0.97; checkpoint save rate / disk sequential write rate ≥ 0.50")


# ---- --telemetry-overhead ------------------------------------------------------------------

TELEMETRY_ON = ("telemetry.enabled=true", "telemetry.interval_s=1")
TELEMETRY_OFF = ("telemetry.enabled=false",)


def measure_telemetry(preset: str, stage: str, repeat: int, data: Path, args, log) -> dict:
    """Step time with and without the monitors (order alternating between repeats)."""
    result = {}
    variants = [("on", TELEMETRY_ON), ("off", TELEMETRY_OFF)]
    for name, extra in variants if repeat % 2 == 0 else variants[::-1]:
        out = args.work_dir / "runs" / f"{preset}-{stage}-telemetry-{name}-{repeat}"
        shutil.rmtree(out, ignore_errors=True)
        project = run_project(out, data, preset, stage, args, log, extra)
        shutil.rmtree(out, ignore_errors=True)
        if "error" in project:
            return project
        result[name] = project["seconds"]
    return result


def time_one_sample(num_samples: int = 200) -> float:
    """Seconds of one NodeMonitor sample (/proc/net/dev, /proc/diskstats, CPU and memory
    through MLflow's psutil monitors), median over `num_samples`, with a sink that keeps nothing."""
    from trainer.telemetry import NodeMonitor, TelemetryConfig

    monitor = NodeMonitor(TelemetryConfig(), sink=lambda metrics, timestamp_ms: None, node="bench")
    monitor._setup()  # what the thread does once; sample() is what it does every interval
    times = []
    for _ in range(num_samples):
        start = time.perf_counter()
        monitor._deliver(monitor.sample(), 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_telemetry_table(results: dict[tuple[str, str], list[dict]], args) -> None:
    sample_s = time_one_sample()
    print(f"\ntelemetry overhead: N = {NPROC} CPU ranks, steps {args.from_step + 1}..{args.steps}, median of "
          f"{args.repeats}, monitor every {TELEMETRY_ON[1].split('=')[1]} s; load average now {os.getloadavg()[0]:.2f}")
    print(f"{'preset':12s} {'ZeRO':6s} {'on s':>7s} {'off s':>7s} {'on/off':>7s}  runs (on/off s)")
    for (preset, stage), runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"{preset:12s} {stage:6s} FAILED: {runs[0]['error']}")
            continue
        on, off = statistics.median(r["on"] for r in ok), statistics.median(r["off"] for r in ok)
        ratios = statistics.median(r["on"] / r["off"] for r in ok)
        runs_text = " ".join(f"{r['on']:.2f}/{r['off']:.2f}" for r in ok)
        print(f"{preset:12s} {stage:6s} {on:7.2f} {off:7.2f} {ratios:7.3f}  {runs_text}")
    print(f"one monitor sample: {sample_s * 1e3:.2f} ms of one core = {sample_s / 10 * 100:.3f}% of a core at the "
          f"default 10 s interval, {sample_s * 100:.3f}% at 1 s")
    print("goal: monitors and logging < 1% of step time (on/off median < 1.01)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="t5-tiny,t5-small-ja")
    parser.add_argument("--stages", default="zero2,zero3")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--from-step", type=int, default=10, help="steps before this one are warm-up, not timed")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-train")
    parser.add_argument("--telemetry-overhead", action="store_true",
                        help="instead: step time with the system monitors on (every 1 s) vs off")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not 0 < args.from_step < args.steps or args.steps % args.from_step:
        raise SystemExit("--from-step must be in (0, --steps) and divide --steps (it is the log interval)")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.work_dir)
    results: dict[tuple[str, str], list[dict]] = {}
    with open(args.work_dir / "bench.log", "a") as log:
        for repeat in range(args.repeats):
            for preset in args.presets.split(","):
                for stage in args.stages.split(","):
                    if args.telemetry_overhead:
                        result = measure_telemetry(preset, stage, repeat, data, args, log)
                        status = result.get("error") or f"on {result['on']:.2f} s, off {result['off']:.2f} s"
                    else:
                        result = measure(preset, stage, repeat, data, args, log)
                        status = result.get("error") or (f"project {result['project_s']:.1f} s, bare "
                                                          f"{result['bare_s']:.1f} s, save {result['save_s']:.2f} s")
                    results.setdefault((preset, stage), []).append(result)
                    print(f"  {preset} {stage} run {repeat + 1}/{args.repeats}: {status}", flush=True)
    if args.telemetry_overhead:
        print_telemetry_table(results, args)
    else:
        print_table(results, args)


if __name__ == "__main__":
    main()

"""`t5ja quickstart`: configs/quickstart.yaml end to end on the bundled sample text."""

from __future__ import annotations

import time
from pathlib import Path

from launcher.config import PROJECT_ROOT
from launcher.job import load_job

QUICKSTART_JOB = PROJECT_ROOT / "configs" / "quickstart.yaml"


def read_losses(metrics_path: Path) -> list[tuple[int, float]]:
    from trainer.metrics import read_records

    rows = read_records(metrics_path)
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def run_quickstart(out: Path, overrides: list[str]) -> int:
    from data_prep.pipeline import run_prep
    from launcher.run import launch_local, plan_run, write_run

    out = out.resolve()
    start = time.time()
    # The job file's relative inputs (the bundled sample) are relative to the project root.
    job = load_job(QUICKSTART_JOB, [f"output_dir={out}", f"data.output_dir={out / 'data'}", *overrides],
                   base_dir=PROJECT_ROOT)
    print(f"[1/3] data prep -> {job.data.output_dir}", flush=True)
    run_prep(job.data, job.tokenizer, pack_length=job.pack_length)
    plan = plan_run(job)
    write_run(plan)
    print(f"[2/3] training {job.model.preset} on {job.world_size} processes -> {plan.run_dir}", flush=True)
    code = launch_local(plan)
    if code != 0:
        print(f"training failed with exit code {code}; see {plan.run_dir / 'logs'}")
        return code
    losses = read_losses(plan.run_dir / "metrics.jsonl")
    print(f"[3/3] done in {time.time() - start:.0f} s")
    print(f"  loss: step {losses[0][0]} {losses[0][1]:.3f} -> step {losses[-1][0]} {losses[-1][1]:.3f}")
    print(f"  model: {plan.run_dir / 'export'}  (T5ForConditionalGeneration / AutoTokenizer.from_pretrained)")
    print(f"  browse: mlflow ui --backend-store-uri {job.tracking_uri}")
    return 0

"""The training loop: one DeepSpeed engine, the objective's batches (span corruption, seq2seq or
causal_lm), named steps.

    maybe_resume -> log_run_start (restarts, crashes, bus bandwidth)
    while step < num_steps (train.steps, or train.epochs resolved over the data; kept in TrainState):
        train_step -> maybe_log -> maybe_checkpoint -> maybe_stop_for_preemption
    then: final checkpoint -> Hugging Face export (checked against the engine) -> maybe_evaluate
    (seq2seq: generation on the task's eval split, report; causal_lm: the eval split's loss;
    eval/* metrics) -> close
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from finetune.tasks import load_chat_task, load_task
from trainer import checkpoint as ckpt
from trainer import heap, nonfinite, run_health
from trainer.causal_lm import CausalLMData
from trainer.config import TrainConfig, WorkerConfig, get_epoch_steps
from trainer.data import BatchPlan, SpanCorruptionData
from trainer.distributed import get_restart_count, ranks_flagging
from trainer.evaluate import get_peak_memory, load_model
from trainer.faults import Faults
from trainer.metrics import MetricLogger, build_metric_logger, flatten
from trainer.model import build_model
from trainer.optim import build_optimizer, build_scheduler, lr_factor
from trainer.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch, clear_marker, write_marker
from trainer.seq2seq import Seq2SeqData
from trainer.telemetry import start_node_telemetry

log = logging.getLogger("trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_offload_optimizer(ds_config: dict) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def build_train_data(cfg: WorkerConfig, tokenizer):
    """The objective's data object (trainer/data.py says what it exposes)."""
    objective = cfg.objective
    if objective.name == "seq2seq":
        return Seq2SeqData(load_task(cfg.task), tokenizer, objective, cfg.train.seed)
    if objective.name == "causal_lm":
        return CausalLMData(load_chat_task(cfg.task), tokenizer, objective, cfg.train.seed)
    return SpanCorruptionData(cfg.run.tokens_dir, objective, tokenizer, cfg.train.seed)


class StartupClock:
    """Seconds of each phase from the worker process's start to the first step: every restart
    and every test pays them, so the log says where they go."""

    def __init__(self):
        self.phases: dict[str, float] = {"python+imports+process group": time.time() - get_process_start_time()}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self._last
        self._last = now

    def summary(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.phases.items())
        return f"first step after {sum(self.phases.values()):.1f} s from process start ({parts})"


def get_process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


class Trainer:
    def __init__(self, cfg: WorkerConfig):
        self.startup = StartupClock()
        self.cfg = cfg
        self.run_dir = Path(cfg.run.run_dir)
        self.rank = dist.get_rank()
        self.state = ckpt.TrainState()
        self._build_data()
        self.startup.lap("data")
        self._build_engine()
        self.startup.lap("model+engine")
        self.logger: MetricLogger | None = self._build_logger() if self.rank == 0 else None
        self.startup.lap("logger")
        # Each node's local rank 0 samples its node; rank 0's logger receives every node's samples.
        self.telemetry = start_node_telemetry(cfg.telemetry, self.logger.log_system if self.logger else None)
        self.preemption = PreemptionWatch()
        self.faults = Faults.from_env(self.rank, dist.get_world_size())
        self._window = _LogWindow()
        if self.rank == 0:
            # A torchrun restart round starts here too: the last round's verdict is stale.
            clear_marker(self.run_dir)
            nonfinite.clear_marker(self.run_dir)

    # ---- construction -------------------------------------------------------------
    def _build_data(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.run.tokenizer_dir)
        self.data = build_train_data(cfg, self.tokenizer)
        if self.rank == 0:
            log.info("training data (objective %s):\n%s", cfg.objective.name, self.data.summary())
        self.plan = BatchPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.run.world_size)
        # Every rank builds the same data, so every rank resolves the same count: no collective.
        self.state.num_steps = get_num_steps(cfg.train, self.data.num_samples)
        self.state.epochs = cfg.train.epochs
        if self.rank == 0 and cfg.train.epochs is not None:
            log.info("train.epochs %g = %s steps of %s samples over %s samples", cfg.train.epochs,
                     f"{self.state.num_steps:,}", f"{cfg.train.global_batch_size:,}", f"{self.data.num_samples:,}")

    def _build_engine(self) -> None:
        import deepspeed

        cfg = self.cfg
        seed_everything(cfg.train.seed)
        ds_config = json.loads(Path(cfg.run.ds_config).read_text())
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        model = self._build_model(ds_config)
        # ds_numel: a parameter partitioned at load time holds only its shard (numel 0).
        self.num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.flops_per_sample = self.data.flops_per_sample(model.config)
        optimizer = build_optimizer(model, cfg.train, is_offload_optimizer(ds_config))
        scheduler = build_scheduler(optimizer, cfg.train, lambda: self.state.num_steps)
        heap.settle()  # ZeRO init's own gc.collect then walks only what is new
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )

    def _build_model(self, ds_config: dict) -> torch.nn.Module:
        """The model to train. Under ZeRO-3 a `model.init_from` checkpoint is loaded partitioned:
        transformers' HfDeepSpeedConfig makes from_pretrained run under deepspeed.zero.Init, so
        each rank reads only its shard, where a plain load holds the whole model on every rank
        at once (gemma-7b: 28 GB of fp32 per rank, eight ranks to a node). Only for this load:
        the object's lifetime is what transformers checks, and later from_pretrained calls on
        one rank alone (the evaluation's) must not become collectives."""
        if self.zero_stage != 3 or not self.cfg.model.init_from:
            return build_model(self.cfg.model, len(self.tokenizer))
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (alive while from_pretrained runs)
        try:
            model = build_model(self.cfg.model, len(self.tokenizer))
        finally:
            del hf_ds_config
        if self.rank == 0:
            # ds_id: set on every parameter zero.Init partitioned; the count says the load was partitioned.
            partitioned = sum(hasattr(p, "ds_id") for p in model.parameters())
            log.info("loaded model.init_from %s partitioned across the ranks (ZeRO-3, deepspeed.zero.Init): %d of "
                     "%d parameter tensors partitioned", self.cfg.model.init_from, partitioned,
                     len(list(model.parameters())))
        return model

    def _build_logger(self) -> MetricLogger:
        run = self.cfg.run
        logger = build_metric_logger(self.cfg.mlflow, run.tracking_uri, self.run_dir, run.job_name, self._description())
        if logger.mlflow is not None:
            # train.steps is logged by log_run_start: resolved (train.epochs) and resumed by then.
            logger.mlflow.log_params({k: v for k, v in flatten(self.cfg.raw).items() if k != "train.steps"})
            logger.mlflow.log_dict(self.cfg.raw, "config.json")  # redacted, as the params
            logger.mlflow.log_artifact(self.run_dir / "ds_config.json")
        return logger

    def _description(self) -> str:
        launcher = self.cfg.raw.get("launcher", {})
        return (
            f"{self.cfg.run.job_name}: {self.cfg.model.preset} ({self.num_params / 1e6:.1f}M params), "
            f"{self.cfg.objective.name}, DeepSpeed ZeRO-{self.zero_stage}, {self.cfg.train.precision}, "
            f"{launcher.get('nnodes', 1)} node(s) x {launcher.get('nproc_per_node', 1)} process(es)"
        )

    # ---- the loop -----------------------------------------------------------------
    def train(self) -> None:
        self.startup.lap("telemetry")
        self.maybe_resume()
        self.startup.lap("resume")
        self.log_run_start()
        self.startup.lap("busbw probe")
        heap.settle(resume_collection=True)  # collection back on for the loop, over the new objects only
        self.startup.lap("gc")
        log.info("%s", self.startup.summary())
        while self.state.step < self.state.num_steps:
            self.maybe_log(self.train_step())
            self.maybe_checkpoint()
            self.maybe_stop_for_preemption()
        self.finish()

    def maybe_stop_for_preemption(self) -> None:
        if not self.preemption.agreed():
            return
        tag = ckpt.get_latest_tag(self.run_dir)
        if tag != ckpt.tag_for(self.state.step):
            tag = self.save()
        if self.rank == 0:
            write_marker(self.run_dir, self.state.step, tag, self.preemption.signal)
        log.warning("preempted at step %d: checkpoint %s written; exiting with %d", self.state.step, tag,
                    EXIT_PREEMPTED)
        raise Preempted(tag)

    def maybe_resume(self) -> None:
        if get_restart_count():
            log.warning("torchrun restart %d of at most %s: the workers start again from the latest checkpoint",
                        get_restart_count(), os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?"))
        if not self.cfg.checkpoint.resume:
            return
        tag = ckpt.resume_tag_all_ranks(self.run_dir, self.cfg.checkpoint.verify)
        if tag is not None:
            state = ckpt.load_checkpoint(self.engine, self.run_dir, tag, self.cfg.checkpoint.verify)
            check_data_position(state, self.plan.global_batch_size, tag)
            self.resume_length(state, tag)
            self.state = state
            self.state.restarts.append(self.state.step)
            log.info("resumed from %s (step %d)", tag, self.state.step)

    def resume_length(self, saved: ckpt.TrainState, tag: str) -> None:
        """Sets the resumed state's length to this run's (get_num_steps), saying why when it is
        not the one checkpoint `tag` was training to, or not the current data's."""
        cfg = self.cfg.train
        num_steps = get_num_steps(cfg, self.data.num_samples, saved)
        setting = f"train.steps {cfg.steps}" if cfg.epochs is None else f"train.epochs {cfg.epochs:g}"
        if self.rank == 0 and saved.num_steps and num_steps != saved.num_steps:
            log.info("the run now ends at step %d (%s; checkpoint %s was training to step %d)", num_steps, setting,
                     tag, saved.num_steps)
        elif self.rank == 0 and num_steps != self.state.num_steps:  # _build_data's count, from the data now
            log.warning("the run keeps ending at step %d, as checkpoint %s resolved %s; over the %d training "
                        "samples the data hold now, it would be step %d", num_steps, tag, setting,
                        self.data.num_samples, self.state.num_steps)
        saved.num_steps, saved.epochs = num_steps, cfg.epochs

    def log_run_start(self) -> None:
        """Collective (the bus-bandwidth probe). Rank 0 logs restarts, crashes, the last worker
        error and the all-reduce bus bandwidth at the step the run (re)starts from."""
        busbw = run_health.probe_allreduce_busbw(self.cfg.telemetry.busbw_probe_mb * 2**20)
        if self.logger is None:
            return
        metrics, tags = run_health.get_start_report(self.run_dir)
        if busbw is not None:
            metrics["system/allreduce_busbw_gbps"] = busbw
        self.logger.log(metrics, self.state.step)
        if self.logger.mlflow is not None:
            self.logger.mlflow.set_tags(tags)
            self.logger.mlflow.log_params({"train.steps": str(self.state.num_steps)})
        if "last_error" in tags:
            log.warning("the previous round failed (%s); its last error:\n%s", tags["last_error_file"],
                        tags["last_error"][-2000:])

    def train_step(self) -> StepResult:
        """One optimizer step: forward/backward over every micro batch of this rank."""
        start = time.perf_counter()
        step = self.state.step + 1  # the step being computed, numbered as it will be logged
        self.faults.maybe_crash(step)
        data_s, skip = 0.0, False
        loss_sum = torch.zeros(())
        for micro_step in range(self.plan.accumulation_steps):
            t0 = time.perf_counter()
            batch = self.load_batch(self.state.step, micro_step, self.rank)
            data_s += time.perf_counter() - t0
            loss = self.faults.maybe_nonfinite(self.engine(**batch).loss, step, micro_step)
            loss_sum += loss.detach().float()
            if micro_step == self.plan.accumulation_steps - 1:
                # Before the boundary's backward: the last point where the update can be dropped.
                skip = self.check_nonfinite(loss_sum, step)
                loss = nonfinite.poison(loss) if skip else loss
            self.engine.backward(loss)
            self.engine.step()
        if skip:
            self.after_skipped_update(step)
        self.state.step += 1
        self.state.consumed_samples += self.plan.global_batch_size
        self.state.consumed_tokens += self.plan.global_batch_size * self.data.tokens_per_sample
        return StepResult(loss_sum / self.plan.accumulation_steps, data_s, time.perf_counter() - start, skip)

    def check_nonfinite(self, loss_sum: torch.Tensor, step: int) -> bool:
        """Collective: True when every rank must skip this step's update. Raises NonFiniteLoss
        (on every rank, after rank 0 wrote the marker) when the policy says stop."""
        ranks = ranks_flagging(not bool(torch.isfinite(loss_sum)))
        if not ranks:
            return False
        cfg = self.cfg.train
        reason = nonfinite.get_stop_reason(cfg.nonfinite_loss, self.state.nonfinite_skips, cfg.max_nonfinite_skips)
        if reason is None:
            log.warning("step %d: non-finite loss on rank(s) %s: update skipped on every rank "
                        "(train.nonfinite_loss=skip; %d skipped before, at most %d)", step,
                        ", ".join(map(str, ranks)), self.state.nonfinite_skips, cfg.max_nonfinite_skips)
            return True
        err = nonfinite.NonFiniteLoss(step, ranks, reason, ckpt.get_latest_tag(self.run_dir))
        if self.rank == 0:
            nonfinite.write_marker(self.run_dir, err)
        raise err

    def after_skipped_update(self, step: int) -> None:
        if self.engine.was_step_applied():  # a DeepSpeed without the overflow check: weights are NaN now
            raise RuntimeError(f"step {step}: DeepSpeed applied an update with NaN gradients, so "
                               "train.nonfinite_loss=skip cannot work with this DeepSpeed config "
                               "(is its overflow check off?); use train.nonfinite_loss=stop")
        self.engine.lr_scheduler.step()  # DeepSpeed does not on an overflow: keep lr a function of the step
        self.state.nonfinite_skips += 1

    def load_batch(self, step: int, micro_step: int, rank: int) -> dict[str, torch.Tensor]:
        return self.data.get_batch(self.plan.micro_batch_indices(step, micro_step, rank))

    def maybe_log(self, result: StepResult) -> None:
        self._window.add(result)
        step = self.state.step
        if step % self.cfg.train.log_every and step != self.state.num_steps:
            return
        mean_loss = self._window.mean_loss_all_ranks()
        metrics = self._window.rates(self.plan.global_batch_size, self.data.tokens_per_sample)
        metrics.update({
            "train/loss": mean_loss,
            # of the last update
            "train/lr": self.cfg.train.lr * lr_factor(step - 1, self.cfg.train, self.state.num_steps),
            "train/grad_norm": _as_float(self.engine.get_global_grad_norm()),
            "train/epoch": self.state.consumed_samples / self.data.num_samples,
            "train/nonfinite_skips": self.state.nonfinite_skips,
            "train/error_rate": self.state.nonfinite_skips / step,  # failed steps / steps
            "train/epoch_time_s": self.data.num_samples / metrics["train/samples_per_s"],  # at the current rate
            "train/peak_memory_gib": get_peak_memory(self.engine.device)[0] / 2**30,
        })
        peak_flops = self.cfg.telemetry.peak_flops_per_device
        if peak_flops:
            flops_s = self.flops_per_sample * metrics["train/samples_per_s"]
            metrics["train/mfu"] = flops_s / (peak_flops * dist.get_world_size())
        self._window = _LogWindow()
        if self.logger is not None:
            self.logger.log(metrics, step)
            log.info("step %d loss %.4f lr %.2e %.0f tokens/s", step, mean_loss, metrics["train/lr"],
                     metrics["train/tokens_per_s"])

    def maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.state.step % every == 0 and self.state.step != self.state.num_steps:
            self.save()

    def save(self) -> str:
        if self.logger is not None and self.logger.mlflow is not None:
            self.state.mlflow_run_id = self.logger.mlflow.run_id
        start = time.perf_counter()
        step = self.state.step
        tag = ckpt.save_checkpoint(self.engine, self.run_dir, self.state, self.run_dir / "config.json",
                                   self.cfg.checkpoint, before_commit=lambda: self.faults.maybe_crash_in_save(step))
        if self.logger is not None:
            self.logger.log({"checkpoint/save_s": time.perf_counter() - start}, self.state.step)
        return tag

    # ---- the end ------------------------------------------------------------------
    def finish(self) -> None:
        tag = ckpt.get_latest_tag(self.run_dir)
        if tag != ckpt.tag_for(self.state.step):
            tag = self.save()
        batch = self.load_batch(0, 0, 0)  # the same fixed batch on every rank
        engine_logits = self.engine_logits(batch)
        model = self.export_and_verify(tag, batch, engine_logits) if self.rank == 0 else None
        dist.barrier()  # the other ranks wait for rank 0's export
        self.maybe_evaluate(model)

    def engine_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Collective under ZeRO-3 (parameters are gathered layer by layer)."""
        self.engine.eval()
        with torch.no_grad():
            logits = self.engine(**batch).logits.float()
        self.engine.train()
        return logits

    def export_and_verify(self, tag: str, batch: dict[str, torch.Tensor],
                          engine_logits: torch.Tensor) -> torch.nn.Module:
        """Rank 0: the HF export of checkpoint `tag`, checked against the engine; returns the
        exported model (loaded, in eval mode)."""
        export_dir = self.run_dir / "export"
        model = build_model(self.cfg.model, len(self.tokenizer))
        ckpt.export_hf(model, ckpt.consolidated_state_dict(self.run_dir, tag), Path(self.cfg.run.tokenizer_dir),
                       export_dir)
        model.eval()
        with torch.no_grad():
            export_logits = model(**batch).logits.float()
        max_diff = (export_logits - engine_logits).abs().max().item()
        torch.save({**batch, "logits": engine_logits}, export_dir / "verify_batch.pt")
        log.info("exported %s to %s (max |logit diff| vs engine %.3g)", tag, export_dir, max_diff)
        self.logger.log({"export/max_abs_logit_diff": max_diff}, self.state.step)
        if self.logger.mlflow is not None and self.cfg.mlflow.log_model:
            self.logger.mlflow.log_artifact(export_dir, "export")
        return model

    def maybe_evaluate(self, model: torch.nn.Module | None) -> None:
        """Collective: the objective's evaluation on the task's eval split with the exported model
        (why not the engine: trainer/seq2seq.py), each rank a shard of it, so that no rank waits
        at a barrier for a whole split (the process group's timeout); rank 0 logs the figures as
        eval/* metrics and the files as artifacts. `model`: rank 0's export, the others load it."""
        if not self.cfg.eval.enabled or self.data.evaluate is None:
            return
        if model is None:
            model = load_model(self.cfg.model, self.run_dir / "export", self.engine.device)
        model.to(self.engine.device)
        result = self.data.evaluate(model, self.cfg.eval, self.run_dir)
        if result is None:
            return
        log.info("evaluation on %s:\n%s", self.cfg.eval.split, result.report)
        self.logger.log({f"eval/{name}": value for name, value in result.metrics.items()}, self.state.step)
        if self.logger.mlflow is not None:
            for path in result.files:  # RUN_DIR/eval/*, RUN_DIR/predictions/*: the same folders in MLflow
                self.logger.mlflow.log_artifact(path, path.parent.name)

    def close(self, status: str) -> None:
        self.telemetry.stop()  # first: its last samples (and the relayed ones) go into the run
        if self.logger is not None:
            self.logger.close(status)


def get_num_steps(cfg: TrainConfig, num_samples: int, saved: ckpt.TrainState | None = None) -> int:
    """The step the run ends at: train.steps, or train.epochs over `num_samples` training samples.
    Resumed (`saved`) with the train.epochs its checkpoint resolved, the run keeps that count
    even if the data changed since; a changed train.epochs or train.steps applies from the
    checkpoint's step on, as a changed train.steps always has."""
    if cfg.epochs is None:
        return cfg.steps
    if saved is not None and saved.epochs == cfg.epochs and saved.num_steps:
        return saved.num_steps
    return get_epoch_steps(cfg.epochs, num_samples, cfg.global_batch_size)


def check_data_position(state: ckpt.TrainState, global_batch_size: int, tag: str) -> None:
    """Step k reads global samples [k*G, (k+1)*G): that maps the checkpoint's position onto this
    run only if G is the one it was trained with (the world size may change, G may not)."""
    if state.consumed_samples != state.step * global_batch_size:
        saved = state.consumed_samples / state.step if state.step else float("nan")
        raise ValueError(
            f"checkpoint {tag} consumed {state.consumed_samples} samples in {state.step} steps (global batch "
            f"{saved:g}), but train.global_batch_size is {global_batch_size}: resuming would skip or repeat "
            f"samples. Resume with train.global_batch_size={saved:g}, or start a new run (another name, or "
            "checkpoint.resume=false)")


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's mean loss over its micro batches
    data_s: float
    step_s: float
    skipped: bool  # the update was dropped for a non-finite loss (on any rank)


class _LogWindow:
    """Accumulates per-step figures between two log steps."""

    def __init__(self):
        self.loss_sum = torch.zeros(())
        self.loss_steps = 0  # steps whose update was applied: a skipped step's NaN stays out of the mean
        self.steps = 0
        self.data_s = 0.0
        self.step_s = 0.0

    def add(self, result: StepResult) -> None:
        if not result.skipped:
            self.loss_sum += result.loss
            self.loss_steps += 1
        self.steps += 1
        self.data_s += result.data_s
        self.step_s += result.step_s

    def mean_loss_all_ranks(self) -> float:
        """NaN when every step of the window was skipped."""
        # One collective per log step, not per step: ranks see different micro batches.
        total = torch.stack([self.loss_sum, torch.tensor(float(self.loss_steps))])
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    def rates(self, global_batch: int, tokens_per_sample: int) -> dict[str, float]:
        step_s = self.step_s / self.steps
        return {
            "train/step_time_s": step_s,
            "train/data_wait_share": self.data_s / self.step_s,
            "train/samples_per_s": global_batch / step_s,
            # tokens = the data's tokens per sample: packed-window tokens (input_length 512 -> 568) for
            # span corruption, input_length + target_length (padding included) for seq2seq, the
            # window's max_length (padding included) for causal_lm
            "train/tokens_per_s": global_batch * tokens_per_sample / step_s,
        }


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)

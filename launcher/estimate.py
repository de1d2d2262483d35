"""`t5ja estimate`: memory of the model states per GPU (and CPU per node) under each ZeRO setting.

The figures are DeepSpeed's own estimators (deepspeed.runtime.zero.stage_1_and_2.
estimate_zero2_model_states_mem_needs and stage3.estimate_zero3_model_states_mem_needs, the
functions behind DeepSpeed's documented `*_all_cold` printers, which only print) applied to
the exact parameter count of the job's model, built on the meta device from trainer.model's
presets. They count model states only, for mixed-precision Adam: 16-bit parameters and
gradients, fp32 master parameters, gradients and the two Adam moments (2 + 2 + 4 + 4 + 8 =
20 bytes per parameter before partitioning). Activations, communication buckets and the
allocator's fragmentation need the rest of the GPU: a stage that "fits" with little left over
will not train.

ZeRO-1 has no estimator in DeepSpeed. It is derived from the ZeRO-2 figure: ZeRO-1 partitions
the optimizer states and fp32 copies like ZeRO-2 but keeps the 16-bit gradients whole on each
GPU until the accumulation boundary (stage_1_and_2.py, partition_gradients=False), so
ZeRO-1 = ZeRO-2 + 2 bytes x params x (1 - 1/num_gpus) without offload, and ZeRO-2 + 2 bytes x
params with the optimizer offloaded (ZeRO-2's offload figure counts no GPU gradient at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

GIB = 2**30
# (stage, offload) -> the shipped ds_configs/ file with exactly these settings.
SHIPPED_DS_CONFIGS = {(1, "none"): "zero1", (2, "none"): "zero2", (3, "none"): "zero3",
                      (3, "optimizer+params"): "zero3_offload"}


class EstimateConfig(BaseModel):
    """What `t5ja estimate` needs beyond the job: the GPU size and DeepSpeed's CPU margin."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_gib: float = Field(80.0, gt=0, description="memory of one GPU in GiB (an 80 GB H100/A100: 80)")
    cpu_buffer_factor: float = Field(
        1.5, ge=1, description="DeepSpeed's additional_buffer_factor: margin on the CPU figures")


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    largest_layer_params: int  # ZeRO-3 gathers one module's parameters whole on each GPU


@dataclass(frozen=True)
class EstimateRow:
    stage: int
    offload: str  # "none", "optimizer" or "optimizer+params"
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per node
    fits: bool  # gpu_bytes <= the GPU's memory (model states only)
    ds_config: str | None  # the shipped ds_configs/ name with these settings, if any


@dataclass(frozen=True)
class Estimate:
    model: str
    size: ModelSize
    num_nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int
    rows: list[EstimateRow]
    vocab_note: str = ""


def get_model_size(model_cfg, tokenizer_size: int) -> ModelSize:
    """Exact counts from the model built on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = _build_meta_model(model_cfg, tokenizer_size)
    # parameters() yields a tied weight once (T5's and Gemma's shared embedding); DeepSpeed's
    # own model_to_params dedups by data_ptr, which is 0 for every tensor on the meta device.
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    return ModelSize(total, largest)


def _build_meta_model(model_cfg, tokenizer_size: int):
    """The job's model without weights: from `model.init_from`'s config.json when that exists
    (the model the job will train: from_pretrained cannot load onto the meta device), else
    from the preset (a directory not downloaded yet: the preset is what it should hold)."""
    from trainer.model import build_model, get_model_class

    config_file = Path(model_cfg.init_from) / "config.json" if model_cfg.init_from else None
    if config_file is None or not config_file.is_file():
        return build_model(model_cfg.model_copy(update={"init_from": None}), tokenizer_size)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_file.parent, **model_cfg.overrides)
    return get_model_class(model_cfg)(config)


def _zero2(size: ModelSize, num_nodes: int, gpus_per_node: int, offload: str, buffer: float) -> tuple[int, int]:
    from trainer.distributed import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cpu, gpu = estimate_zero2_model_states_mem_needs(
        size.total_params, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes, cpu_offload=offload != "none",
        additional_buffer_factor=buffer)
    return gpu, cpu


def _zero1(size: ModelSize, num_nodes: int, gpus_per_node: int, offload: str, buffer: float) -> tuple[int, int]:
    gpu, cpu = _zero2(size, num_nodes, gpus_per_node, offload, buffer)
    # Add back the 16-bit gradients ZeRO-2 partitions away (see the module docstring).
    counted_by_zero2 = 0 if offload != "none" else int(2 * size.total_params / (num_nodes * gpus_per_node))
    return gpu + 2 * size.total_params - counted_by_zero2, cpu


def _zero3(size: ModelSize, num_nodes: int, gpus_per_node: int, offload: str, buffer: float) -> tuple[int, int]:
    from trainer.distributed import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # zero_init=False: the trainer builds the whole model on every rank before DeepSpeed
    # partitions it (no deepspeed.zero.Init); this changes the CPU figure only.
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        size.total_params, size.largest_layer_params, num_gpus_per_node=gpus_per_node, num_nodes=num_nodes,
        cpu_offload=offload != "none", cpu_offload_params=offload == "optimizer+params", zero_init=False,
        additional_buffer_factor=buffer)
    return gpu, cpu


ESTIMATORS = {1: _zero1, 2: _zero2, 3: _zero3}
# Every setting the table shows, in the order a user would try them (least partitioning first).
SETTINGS = [(1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"),
            (3, "optimizer+params")]


def get_estimate_rows(size: ModelSize, num_nodes: int, gpus_per_node: int, cfg: EstimateConfig) -> list[EstimateRow]:
    if num_nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"a cluster needs at least 1 node and 1 GPU per node, got {num_nodes} x {gpus_per_node}")
    gpu_memory = int(cfg.gpu_memory_gib * GIB)
    rows = []
    for stage, offload in SETTINGS:
        gpu, cpu = ESTIMATORS[stage](size, num_nodes, gpus_per_node, offload, cfg.cpu_buffer_factor)
        rows.append(EstimateRow(stage, offload, int(gpu), int(cpu), gpu <= gpu_memory,
                                SHIPPED_DS_CONFIGS.get((stage, offload))))
    return rows


@dataclass(frozen=True)
class EstimateInputs:
    """The parts of a job the estimate reads."""

    model: object  # trainer.model.ModelConfig
    tokenizer: object  # data_prep.config.TokenizerConfig
    launcher: object  # launcher.config.LauncherConfig
    data_output_dir: str | None  # where data prep writes (and finds) the trained tokenizer


def load_estimate_inputs(path: str | Path, overrides: list[str] = ()) -> EstimateInputs:
    """Only the sections the estimate reads, validated with their YAML paths (ConfigError lists
    every problem). Not `load_job`: an estimate must work before the corpora exist and for a
    preset the job's objective does not fit yet (gemma-7b in a T5 job file)."""
    from pydantic import ValidationError

    from data_prep.config import TokenizerConfig
    from launcher.config import LauncherConfig
    from launcher.job import ConfigError, apply_overrides, pydantic_problems, read_yaml
    from trainer.model import ModelConfig, get_model_problems

    raw = read_yaml(Path(path))
    problems = apply_overrides(raw, list(overrides))
    sections = {}
    for name, cls in (("model", ModelConfig), ("tokenizer", TokenizerConfig), ("launcher", LauncherConfig)):
        try:
            sections[name] = cls.model_validate(raw.get(name) or {})
        except ValidationError as err:
            problems += pydantic_problems(err, name)
    if "model" in sections:
        problems += get_model_problems(sections["model"])
    if problems:
        raise ConfigError(str(path), problems)
    return EstimateInputs(**sections, data_output_dir=(raw.get("data") or {}).get("output_dir"))


def get_tokenizer_size(inputs: EstimateInputs) -> tuple[int, str]:
    """The tokenizer's size for a preset whose vocabulary is sized from it, and where it came from:
    the job's tokenizer if it exists yet, else the size data prep will train."""
    from data_prep import layout
    from data_prep.tokenizer import get_hf_vocab_size

    tokenizer_dir = inputs.tokenizer.path or (inputs.data_output_dir and layout.tokenizer_dir(inputs.data_output_dir))
    if tokenizer_dir and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        return get_hf_vocab_size(Path(tokenizer_dir)), f"vocab sized from the tokenizer in {tokenizer_dir}"
    planned = inputs.tokenizer.vocab_size + inputs.tokenizer.num_sentinels
    return planned, f"vocab sized from tokenizer.vocab_size + num_sentinels = {planned} (no tokenizer trained yet)"


def estimate_job(inputs: EstimateInputs, cfg: EstimateConfig) -> Estimate:
    """The table for a job: its model preset (with overrides) and its cluster shape (launcher.*)."""
    from trainer.model import PRESETS

    values = {**PRESETS[inputs.model.preset]["config"], **inputs.model.overrides}
    tokenizer_size, note = (0, "") if values.get("vocab_size") is not None else get_tokenizer_size(inputs)
    size = get_model_size(inputs.model, tokenizer_size)
    shape = (inputs.launcher.nnodes, inputs.launcher.nproc_per_node)
    return Estimate(inputs.model.preset, size, *shape, int(cfg.gpu_memory_gib * GIB),
                    get_estimate_rows(size, *shape, cfg), note)


def get_recommendation(estimate: Estimate) -> str:
    """The first setting (least partitioning, no offload first) whose model states fit."""
    for row in estimate.rows:
        if row.fits:
            name = f"ZeRO-{row.stage}" + ("" if row.offload == "none" else f" with {row.offload} offload")
            where = f"ds_configs/{row.ds_config}.json" if row.ds_config else "no shipped ds_config: add the offload " \
                "section to a copy of the stage's file"
            return f"smallest setting whose model states fit: {name} ({where})"
    return "no setting fits: use more GPUs (ZeRO-3 divides the states by the GPU count) or larger ones"


def format_table(estimate: Estimate) -> str:
    """The estimate as aligned text for the terminal."""
    s = estimate.size
    lines = [
        f"{estimate.model}: {s.total_params:,} parameters (largest layer {s.largest_layer_params:,})"
        + (f"; {estimate.vocab_note}" if estimate.vocab_note else ""),
        f"cluster: {estimate.num_nodes} node(s) x {estimate.gpus_per_node} GPU(s), "
        f"{estimate.gpu_memory_bytes / GIB:g} GiB per GPU",
        "model states only (DeepSpeed's estimators; ZeRO-1 derived from ZeRO-2, see launcher/estimate.py); "
        "activations and buffers need the rest",
        "",
        f"{'stage':<7}{'offload':<18}{'GPU GiB':>9}{'left GiB':>10}{'CPU GiB/node':>14}  {'fits':<5}ds_config",
    ]
    for row in estimate.rows:
        left = (estimate.gpu_memory_bytes - row.gpu_bytes) / GIB  # for activations and buffers
        lines.append(f"ZeRO-{row.stage:<2}{row.offload:<18}{row.gpu_bytes / GIB:>9.1f}{left:>10.1f}"
                     f"{row.cpu_bytes / GIB:>14.1f}  {'yes' if row.fits else 'no':<5}{row.ds_config or '-'}")
    lines += ["", get_recommendation(estimate)]
    return "\n".join(lines)

"""Load a job: defaults -> YAML -> `a.b=c` overrides -> validate everything -> absolute paths.

Every problem is collected and reported at once with its YAML path (pydantic's field errors
and the cross-section checks alike), before anything starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typing

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from data_prep.config import DataConfig
from launcher.config import JobConfig
from launcher.ds_config import BatchSizes, get_ds_config_problems, read_ds_config, resolve_ds_config_path
from finetune.tasks import OBJECTIVE_TASKS, TASK_FILE_KEYS, get_task_objective_problems, get_task_path_problems
from trainer.model import get_causal_lm_presets, get_init_from_problems, get_model_problems, is_causal_lm
from trainer.config import describe_pydantic_error

Problem = tuple[str, str]  # (yaml path, what is wrong and what was expected)


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s):"] + [f"  - {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(str(path), [("(file)", "no such job file")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(str(path), [("(file)", f"not valid YAML: {err}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("(file)", f"expected a mapping of sections, got {type(raw).__name__}")])
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> list[Problem]:
    """`train.lr=1e-4`, `data.inputs.0.path=x`: values parsed as YAML scalars/lists."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append((item, "override must look like section.key=value"))
            continue
        try:
            _set_path(raw, key.split("."), yaml.safe_load(text) if text else "")
        except (yaml.YAMLError, IndexError, TypeError) as err:
            problems.append((key, f"cannot apply override: {err}"))
    return problems


def _set_path(node: Any, parts: list[str], value: Any) -> None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = int(part)
            if last:
                node[index] = value
            node = node[index]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})


def format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# Sections that are unions on `name`: pydantic puts the chosen member's tag in an error's
# location (objective.seq2seq.typo; task.livedoor for the member's own validator); the YAML path
# has no such level (objective.typo; task).
UNION_SECTIONS = ("objective", "task")


def _yaml_loc(loc: tuple) -> tuple:
    if len(loc) >= 2 and loc[0] in UNION_SECTIONS:
        return (loc[0], *loc[2:])
    return loc


def pydantic_problems(err: ValidationError, prefix: str = "") -> list[Problem]:
    head = (prefix,) if prefix else ()
    return [(format_loc(head + _yaml_loc(tuple(e["loc"]))), describe_pydantic_error(e)) for e in err.errors()]


def _valid_sections(raw: dict) -> dict[str, BaseModel]:
    """Each section validated on its own, so cross checks run even when another section fails."""
    sections = {}
    for name, field in JobConfig.model_fields.items():
        value = raw.get(name)
        if value is None:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                sections[name] = default
            continue
        cls = _section_class(field.annotation)
        # The field's metadata holds a union's discriminator (pydantic moves it off the annotation).
        annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        section = _validate_lenient(cls, value) if cls else _validate_union(annotation, value)
        if isinstance(section, BaseModel):
            sections[name] = section
    return sections


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section's model class for `Model` and `Model | None`; None for unions and scalars."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _validate_union(annotation: Any, value: Any) -> Any:
    """A union section (objective, task) ignoring unknown keys (already reported), or a scalar;
    None if anything else is wrong."""
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        # An unknown key's location is (member tag, key).
        unknown = {e["loc"][1] for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 2}
        if not isinstance(value, dict) or not unknown or len(unknown) != len(err.errors()):
            return None
        return _validate_union(annotation, {k: v for k, v in value.items() if k not in unknown})


def _validate_lenient(cls: type[BaseModel], value: Any) -> BaseModel | None:
    """The section, ignoring unknown keys (already reported); None if anything else is wrong."""
    try:
        return cls.model_validate(value)
    except ValidationError as err:
        unknown = {e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1}
        if not isinstance(value, dict) or len(unknown) != len(err.errors()):
            return None
        return _validate_lenient(cls, {k: v for k, v in value.items() if k not in unknown})


def resolve_paths(sections: dict[str, BaseModel], raw: dict, base_dir: Path) -> None:
    """Relative paths in the job are relative to base_dir (the current directory for users)."""

    def absolute(p: str) -> str:
        return str((base_dir / Path(p).expanduser()).resolve())

    raw["output_dir"] = absolute(raw.get("output_dir", JobConfig.model_fields["output_dir"].default))
    if "data" in sections:
        data: DataConfig = sections["data"]
        data.output_dir = absolute(data.output_dir)
        for spec in data.inputs:
            spec.path = absolute(spec.path)
    if "tokenizer" in sections and sections["tokenizer"].path:
        sections["tokenizer"].path = absolute(sections["tokenizer"].path)
    if "model" in sections and sections["model"].init_from:
        sections["model"].init_from = absolute(sections["model"].init_from)
    if "task" in sections:
        task = sections["task"]
        for key in TASK_FILE_KEYS:
            if getattr(task, key, None):  # a chat task's eval_file may be unset
                setattr(task, key, absolute(getattr(task, key)))
    if "deepspeed" in sections:
        ds = sections["deepspeed"]
        # A bare name (zero2) is looked up in ds_configs/; anything with a directory is a path.
        named = len(Path(ds.config).parts) == 1
        ds.config = str(resolve_ds_config_path(ds.config if named else absolute(ds.config)))


def cross_check(s: dict[str, BaseModel], given: set[str] = frozenset()) -> list[Problem]:
    """Checks that span sections; each runs when the sections it needs are valid. `given`: the
    sections the YAML has (one that is there but invalid is reported already, not as missing)."""
    problems: list[Problem] = []
    if "data" in s:
        problems += s["data"].find_problems()
    if "tokenizer" in s and s["tokenizer"].path and not Path(s["tokenizer"].path).is_dir():
        problems.append(("tokenizer.path", f"{s['tokenizer'].path}: no such tokenizer directory"))
    if "model" in s:
        problems += get_model_problems(s["model"])
        problems += get_init_from_problems(s["model"].init_from) if s["model"].init_from else []
    if "model" in s and "objective" in s and not get_model_problems(s["model"]):
        problems += _preset_problems(s["model"].preset, is_causal_lm(s["model"]), s["objective"].name)
    problems += _objective_problems(s, given)
    if "data" in s and "objective" in s and hasattr(s["objective"], "expanded_length"):
        want = s["objective"].expanded_length
        if s["data"].pack_length not in (None, want):
            problems.append(("data.pack_length", f"{s['data'].pack_length}, but objective.input_length="
                             f"{s['objective'].input_length} needs windows of {want} tokens (or leave it unset)"))
    if "train" in s and "launcher" in s:
        problems += _batch_problems(s)
    if "train" in s and "deepspeed" in s and "launcher" in s:
        problems += _deepspeed_problems(s)
    return problems


def _preset_problems(preset: str, causal: bool, objective: str) -> list[Problem]:
    """causal_lm trains a decoder-only LM; span corruption and seq2seq an encoder-decoder."""
    if causal and objective != "causal_lm":
        return [("model.preset", f"{preset} is a causal LM; objective {objective} needs an encoder-decoder (T5) "
                                 "preset (a causal LM trains with objective causal_lm)")]
    if not causal and objective == "causal_lm":
        return [("model.preset", f"{preset} is not a causal LM; objective causal_lm needs one of "
                                 f"{', '.join(get_causal_lm_presets())}")]
    return []


def _objective_problems(s: dict[str, BaseModel], given: set[str]) -> list[Problem]:
    """What each objective reads: span corruption data prep's token shards, seq2seq and causal_lm
    a task of their own kind."""
    if "objective" not in s:
        return []
    name = s["objective"].name
    if name == "span_corruption":
        problems = [] if "data" in s or "data" in given else [
            ("data", "required key is missing: objective span_corruption trains on data prep's token shards")]
        if "task" in s or "task" in given:
            problems.append(("task", "objective span_corruption reads no task (seq2seq and causal_lm do); set "
                                     "objective.name or remove it"))
        return problems
    problems = []
    if "model" in s and not s["model"].init_from and "data" not in given and not (
            "tokenizer" in s and s["tokenizer"].path):
        problems.append(("model.init_from", f"objective {name} needs a tokenizer: set model.init_from (a `t5ja "
                         "export` directory), or tokenizer.path / data for a randomly initialised preset"))
    if "task" in given:  # reported as it is, or valid
        if "task" not in s:
            return problems
        return problems + get_task_objective_problems(s["task"], name) + get_task_path_problems(s["task"])
    return problems + [("task", f"required key is missing: objective {name} trains on a task's examples "
                                f"(task.name: {' or '.join(OBJECTIVE_TASKS[name])})")]


def _batch_sizes(s: dict[str, BaseModel]) -> BatchSizes:
    launcher = s["launcher"]
    return BatchSizes(s["train"].global_batch_size, s["train"].micro_batch_size,
                      launcher.nnodes * launcher.nproc_per_node)


def _batch_problems(s: dict[str, BaseModel]) -> list[Problem]:
    batch = _batch_sizes(s)
    if batch.divisible:
        return []
    unit = batch.micro_batch_size * batch.world_size
    return [("train.global_batch_size",
             f"{batch.global_batch_size} is not a multiple of train.micro_batch_size ({batch.micro_batch_size}) x "
             f"data-parallel size ({batch.world_size}) = {unit}")]


def _deepspeed_problems(s: dict[str, BaseModel]) -> list[Problem]:
    path = Path(s["deepspeed"].config)
    ds, problems = read_ds_config(path)
    if ds is not None:
        problems += get_ds_config_problems(ds, path, s["train"], _batch_sizes(s))
    # A Slurm job's GPUs are on the compute nodes, not where it is submitted from.
    local = s["launcher"].backend == "local"
    if s["train"].precision == "fp16" and local and not _cuda_available():
        problems.append(("train.precision", "fp16 needs a CUDA GPU; DeepSpeed's CPU accelerator supports bf16 or fp32"))
    return problems


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_launchable(job: JobConfig, source: str) -> None:
    """What only training needs (prep runs on one node whatever the job's shape)."""
    if job.launcher.backend == "local" and job.launcher.nnodes != 1:
        raise ConfigError(source, [("launcher.nnodes", f"the local backend runs on one node, got "
                                    f"{job.launcher.nnodes}: use launcher.backend=slurm, or torchrun on each node")])


def check_preppable(job: JobConfig, source: str) -> None:
    """`t5ja prep` needs corpora to prepare: a fine-tuning job (seq2seq, causal_lm) reads its
    task's files itself and may have no `data` section."""
    if job.data is None:
        raise ConfigError(source, [("data", f"`t5ja prep` prepares the corpora of a `data` section, and this job "
                                    f"has none (objective {job.objective.name} reads its task's files when it "
                                    "trains: run `t5ja train` directly)")])


def load_job(path: str | Path, overrides: list[str] = (), base_dir: Path | None = None) -> JobConfig:
    """The validated job with absolute paths, or ConfigError listing every problem."""
    path = Path(path)
    base_dir = base_dir or Path.cwd()
    raw = read_yaml(path)
    problems = apply_overrides(raw, list(overrides))
    try:
        JobConfig.model_validate(raw)
    except ValidationError as err:
        problems += pydantic_problems(err)
    sections = _valid_sections(raw)
    resolve_paths(sections, raw, base_dir)
    problems += cross_check(sections, {key for key, value in raw.items() if value is not None})
    if problems:
        raise ConfigError(str(path), problems)
    resolved = {**raw, **{name: section.model_dump() for name, section in sections.items()}}
    return JobConfig.model_validate(resolved)

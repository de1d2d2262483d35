"""Model presets as data, built with Hugging Face transformers classes (no model code of ours).

A preset names an architecture (a transformers config + model class) and the config
values; `model.overrides` in the job file changes any of them. Adding a preset is adding a
table row, never a code branch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# architecture -> (transformers config class, model class), imported lazily by name so that
# validating a job does not import every model family.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "t5": ("T5Config", "T5ForConditionalGeneration"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}
# Architectures trained with the decoder-only objective, causal_lm (chat SFT); span corruption
# and seq2seq need an encoder-decoder.
CAUSAL_LM_ARCHITECTURES = frozenset({"gemma"})

# T5 v1.0 layout (Raffel et al. 2020): ReLU FFN, tied input/output embeddings. Special ids
# follow the T5 tokenizer layout that data prep trains: pad 0 (also decoder start), eos 1.
_T5_COMMON = dict(
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    relative_attention_num_buckets=32,
)

# Gemma (Gemma Team 2024) as the seed's table gives it: GeGLU FFN (2 x the width below),
# head size 256, vocab 256128, tied embeddings. Special ids of Gemma's tokenizer.
_GEMMA_COMMON = dict(head_dim=256, vocab_size=256128, max_position_embeddings=8192, pad_token_id=0,
                     eos_token_id=1, bos_token_id=2, tie_word_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # The seed model's layout (t5-base-japanese): 12+12 layers, d_model 768 -> 222.9M params.
    "t5-base-ja": dict(
        architecture="t5",
        config=dict(_T5_COMMON, vocab_size=32128, d_model=768, d_kv=64, d_ff=3072,
                    num_layers=12, num_decoder_layers=12, num_heads=12, dropout_rate=0.1),
    ),
    # T5-small layout (60.5M params at vocab 32128), for benchmarks.
    "t5-small-ja": dict(
        architecture="t5",
        config=dict(_T5_COMMON, vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                    num_layers=6, num_decoder_layers=6, num_heads=8, dropout_rate=0.1),
    ),
    # A few hundred thousand parameters plus embeddings: CPU tests and the quickstart.
    # vocab_size None = sized from the trained tokenizer.
    "t5-tiny": dict(
        architecture="t5",
        config=dict(_T5_COMMON, vocab_size=None, d_model=128, d_kv=32, d_ff=512,
                    num_layers=2, num_decoder_layers=2, num_heads=4, dropout_rate=0.0),
    ),
    # 2B: embedding 524,550,144 + 1,981,884,416 other parameters (d 2048, 18 layers, 8 heads, 1 KV head).
    "gemma-2b": dict(
        architecture="gemma",
        config=dict(_GEMMA_COMMON, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                    num_attention_heads=8, num_key_value_heads=1),
    ),
    # 7B: embedding 786,825,216 + 7,751,248,896 (d 3072, 28 layers, 16 heads, 16 KV heads).
    "gemma-7b": dict(
        architecture="gemma",
        config=dict(_GEMMA_COMMON, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=16),
    ),
    # The Gemma layout at CPU-test size; vocab sized from the tokenizer.
    "gemma-tiny": dict(
        architecture="gemma",
        config=dict(_GEMMA_COMMON, vocab_size=None, head_dim=32, hidden_size=128, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
    ),
}


class ModelConfig(BaseModel):
    """Which model to build."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("t5-tiny", description=f"model preset: one of {', '.join(PRESETS)}")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="values that replace the preset's transformers config fields"
    )
    init_from: str | None = Field(
        None, description="a Hugging Face model directory (what `t5ja export` writes: config.json, weights, "
                          "tokenizer files): the weights, architecture and tokenizer come from it (overrides still "
                          "apply); default: the preset, randomly initialised, with data prep's tokenizer")


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


# Any one of these makes a directory loadable by AutoTokenizer.from_pretrained.
TOKENIZER_MARKERS = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def get_init_from_problems(path: str, key: str = "model.init_from") -> list[tuple[str, str]]:
    """The directory must hold a model config and a tokenizer; checked before anything starts.
    `key`: where the path came from (`t5ja eval`'s is its --model option)."""
    directory = Path(path)
    if not directory.is_dir():
        return [(key, f"{path}: no such model directory")]
    missing = [] if (directory / "config.json").is_file() else ["config.json"]
    if not any((directory / name).is_file() for name in TOKENIZER_MARKERS):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_MARKERS)})")
    return [(key, f"{path}: no {' and no '.join(missing)} (expected a `t5ja export` or "
             "save_pretrained directory)")] if missing else []


def get_model_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(yaml path, message) for an unknown preset or override key; empty when valid (init_from is
    checked by get_init_from_problems: `t5ja estimate` works before that directory exists)."""
    if cfg.preset not in PRESETS:
        return [("model.preset", f"unknown preset {cfg.preset!r}; expected one of {sorted(PRESETS)}")]
    if not cfg.overrides:  # nothing to check, and the config class would import torch (2+ s)
        return []
    config_cls = _transformers_class(ARCHITECTURES[PRESETS[cfg.preset]["architecture"]][0])
    known = set(config_cls().to_dict())
    return [
        (f"model.overrides.{key}", f"not a field of {config_cls.__name__}")
        for key in cfg.overrides
        if key not in known
    ]


def is_causal_lm(cfg: ModelConfig) -> bool:
    return PRESETS[cfg.preset]["architecture"] in CAUSAL_LM_ARCHITECTURES


def get_causal_lm_presets() -> list[str]:
    return [name for name, preset in PRESETS.items() if preset["architecture"] in CAUSAL_LM_ARCHITECTURES]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_model_config(cfg: ModelConfig, tokenizer_size: int):
    """The transformers config for this job; vocab sized from the tokenizer when unset."""
    preset = PRESETS[cfg.preset]
    values = {**preset["config"], **cfg.overrides}
    if values.get("vocab_size") is None:
        # Multiple of 128 like T5's 32128: keeps embedding matmuls on fast tile sizes.
        values["vocab_size"] = round_up(tokenizer_size, 128)
    if values["vocab_size"] < tokenizer_size:
        raise ValueError(
            f"model.overrides.vocab_size={values['vocab_size']} is smaller than the tokenizer ({tokenizer_size} ids)"
        )
    config_cls = _transformers_class(ARCHITECTURES[preset["architecture"]][0])
    return config_cls(**values)


def get_model_class(cfg: ModelConfig) -> type:
    """The transformers model class of the preset's architecture (T5ForConditionalGeneration, ...)."""
    return _transformers_class(ARCHITECTURES[PRESETS[cfg.preset]["architecture"]][1])


def build_model(cfg: ModelConfig, tokenizer_size: int) -> torch.nn.Module:
    model_cls = get_model_class(cfg)
    if cfg.init_from:
        import torch

        # fp32 as a fresh model: DeepSpeed casts to the training precision itself.
        model = model_cls.from_pretrained(cfg.init_from, dtype=torch.float32, **cfg.overrides)
        if model.config.vocab_size < tokenizer_size:
            raise ValueError(f"model.init_from: {cfg.init_from} has vocab_size {model.config.vocab_size}, fewer "
                             f"than its tokenizer's {tokenizer_size} ids")
        return model
    return model_cls(build_model_config(cfg, tokenizer_size))

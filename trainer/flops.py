"""Model FLOPs per training sample, for MFU (model FLOPs utilisation).

The usual count (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): a token costs
6 FLOPs per parameter of every matmul it passes through (2 forward, 4 backward), plus the
attention scores and their weighted sum, 12 x layers x attention width x context per token
(no discount for causal masking). Embedding lookups are free; the LM head is a matmul.
Activation recomputation is not counted: MFU measures useful work, not the FLOPs executed.
"""

from __future__ import annotations


def t5_flops_per_sample(config, input_length: int, target_length: int) -> float:
    """A transformers T5Config: encoder over `input_length` tokens, decoder over `target_length`
    (self and cross attention), tied LM head over the targets."""
    d, ff, inner = config.d_model, config.d_ff, config.num_heads * config.d_kv
    gated = 3 if getattr(config, "is_gated_act", False) else 2  # T5 v1.1 has a gated FFN
    encoder_layer = 4 * d * inner + gated * d * ff  # q, k, v, o + the FFN
    decoder_layer = 8 * d * inner + gated * d * ff  # self + cross attention + the FFN
    matmuls = (6 * config.num_layers * encoder_layer * input_length
               + 6 * (config.num_decoder_layers * decoder_layer + d * config.vocab_size) * target_length)
    attention = 12 * inner * (config.num_layers * input_length * input_length
                              + config.num_decoder_layers * (target_length * target_length
                                                             + target_length * input_length))
    return float(matmuls + attention)


def decoder_flops_per_sample(config, length: int) -> float:
    """A transformers decoder-only config (Gemma, Llama layout: grouped KV heads, gated FFN,
    the LM head over every position) on a window of `length` tokens, padding included."""
    d, ff, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    layer = 2 * d * q_width + 2 * d * kv_width + 3 * d * ff  # q and o, k and v, the gated FFN
    matmuls = 6 * (config.num_hidden_layers * layer + d * config.vocab_size) * length
    attention = 12 * config.num_hidden_layers * q_width * length * length
    return float(matmuls + attention)

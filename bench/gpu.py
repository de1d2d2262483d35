"""One-GPU throughput and MFU: T5-base (the seed's layout) in bf16 and a Gemma-2B-layout causal
LM under ZeRO-3, each for about `--seconds` of timed steps. Run by bench/gpu.sh under torchrun
with one process:

    torchrun --standalone --nproc-per-node 1 bench/gpu.py [--seconds 100] [--models t5-base,gemma-2b]
    DS_ACCELERATOR=cpu torchrun --standalone --nproc-per-node 1 bench/gpu.py --smoke   # CPU check, tiny

MFU = model FLOPs per second / the peak bf16 matmul rate measured first on the same device
(8192^3 matmuls), not the datasheet figure. Model FLOPs per token are the usual 6 x parameters
of the matmuls a token passes through (forward + backward), plus attention scores
(12 x layers x d_model x context per token for a causal LM; for T5 the encoder, decoder and
cross attention likewise; PaLM's convention, no discount for causal masking), excluding
embedding lookups but including the LM head.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]

# The seed's Gemma table: 2B = d_model 2048, 18 layers, FFN 16384 (gated), 8 heads, 1 KV head,
# head size 256, vocab 256128.
GEMMA_2B = dict(vocab_size=256128, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192)
SMOKE_GEMMA = dict(GEMMA_2B, vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=32)


def measure_peak_matmul(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a square matmul, the best of `repeats` timed calls after a warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        if i:  # the first call is a warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_t5(smoke: bool):
    from trainer.flops import t5_flops_per_sample
    from trainer.model import ModelConfig, build_model

    model = build_model(ModelConfig(preset="t5-tiny" if smoke else "t5-base-ja"), 1024 if smoke else 32128)
    cfg = model.config
    input_length, target_length = (128, 32) if smoke else (512, 114)  # span corruption of 568-token windows

    def batch(micro: int, device) -> dict:
        return {"input_ids": torch.randint(2, cfg.vocab_size, (micro, input_length), device=device),
                "labels": torch.randint(2, cfg.vocab_size, (micro, target_length), device=device)}

    flops = t5_flops_per_sample(cfg, input_length, target_length)
    return model, batch, flops, input_length + target_length


def build_gemma(smoke: bool):
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(**(SMOKE_GEMMA if smoke else GEMMA_2B))
    model = GemmaForCausalLM(cfg)
    if not smoke:
        model.gradient_checkpointing_enable()  # 2.5B params and 2048-token sequences on one GPU
    seq = 128 if smoke else 2048

    def batch(micro: int, device) -> dict:
        ids = torch.randint(2, cfg.vocab_size, (micro, seq), device=device)
        return {"input_ids": ids, "labels": ids}

    d, heads, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = d * hd * (2 * heads + 2 * kv) + 3 * d * cfg.intermediate_size  # q, o, k, v; gate, up, down
    per_token = 6 * (cfg.num_hidden_layers * layer + d * cfg.vocab_size) + 12 * cfg.num_hidden_layers * heads * hd * seq
    return model, batch, per_token * seq, seq


MODELS = {
    # name: (builder, ZeRO stage, micro batch, micro batch in --smoke)
    "t5-base": (build_t5, 2, 32, 2),
    "gemma-2b": (build_gemma, 3, 4, 2),
}


def ds_config(stage: int, micro: int, bf16: bool) -> dict:
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    config.update(train_batch_size=micro, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=1,
                  gradient_clipping=1.0, bf16={"enabled": bf16}, fp16={"enabled": False})
    return config


def train_step(engine, batch: dict) -> None:
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    loss.item()  # wait for the step, as a training loop that logs its loss does


def run_model(name: str, args, device: torch.device, peak: float) -> dict:
    import deepspeed

    builder, stage, micro, smoke_micro = MODELS[name]
    micro = smoke_micro if args.smoke else micro
    model, make_batch, flops_per_sample, tokens_per_sample = builder(args.smoke)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(stage, micro, bf16=device.type == "cuda"))
    batch = make_batch(micro, engine.device)
    for _ in range(args.warmup_steps):
        train_step(engine, batch)
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds or steps < args.min_steps:
        train_step(engine, batch)
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens_s = steps * micro * tokens_per_sample / seconds
    flops_s = steps * micro * flops_per_sample / seconds
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del engine, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"model": name, "params_m": params / 1e6, "zero": stage, "micro_batch": micro, "steps": steps,
            "seconds": seconds, "tokens_per_s": tokens_s, "model_tflops": flops_s / 1e12, "mfu": flops_s / peak,
            "peak_memory_gib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seconds", type=float, default=100.0, help="timed seconds per model, after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--min-steps", type=int, default=3, help="timed steps at least")
    parser.add_argument("--smoke", action="store_true", help="tiny models and matmuls: a CPU check of this script")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    from trainer.distributed import init_distributed

    init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measure_peak_matmul(device, dtype, 512 if args.smoke else 8192, 3 if args.smoke else 10)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}: measured peak {str(dtype).split('.')[-1]} matmul {peak / 1e12:.1f} TFLOP/s", flush=True)
    results = [run_model(model, args, device, peak) for model in args.models.split(",")]
    print(f"\n{'model':10s} {'params M':>9s} {'ZeRO':>5s} {'micro':>6s} {'steps':>6s} {'tokens/s':>10s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s}")
    for r in results:
        print(f"{r['model']:10s} {r['params_m']:9.1f} {r['zero']:5d} {r['micro_batch']:6d} {r['steps']:6d} "
              f"{r['tokens_per_s']:10.0f} {r['model_tflops']:8.2f} {r['mfu']:6.1%} {r['peak_memory_gib']:9.1f}")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "peak_flops": peak, "results": results}, indent=1))


if __name__ == "__main__":
    main()

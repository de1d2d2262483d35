"""Objective causal_lm: chat SFT of a Gemma-layout causal LM. Unit tests of its data (labels only
on the model's turns, packing that keeps attention inside each conversation, the eval loss), and
one real `t5ja train` of gemma-tiny under ZeRO-3 on 2 ranks whose HF export (RUN_DIR/export, and
`t5ja export` of the run) loads with AutoModelForCausalLM and reproduces the engine's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, run_t5ja
from finetune.chat import END, IGNORE_INDEX, START
from finetune.tasks import ChatTaskData
from launcher.job import ConfigError, load_job
from trainer.causal_lm import CausalLMConfig, CausalLMData, get_loss_sum, get_window_batch

STEPS = 6

# A dozen short conversations: one with a system message, some multi-turn.
CONVERSATIONS = [
    [{"role": "system", "content": "あなたは丁寧な案内係です。"}, {"role": "user", "content": "猫の名前は?"},
     {"role": "assistant", "content": "名前はまだ無い。"}],
    [{"role": "user", "content": "どこで生れましたか。"}, {"role": "assistant", "content": "とんと見当がつかぬ。"},
     {"role": "user", "content": "何を覚えていますか。"},
     {"role": "assistant", "content": "薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。"}],
    [{"role": "user", "content": "吾輩とは誰ですか。"}, {"role": "assistant", "content": "吾輩は猫である。"}],
    [{"role": "user", "content": "書生とは何ですか。"}, {"role": "assistant", "content": "人間中で一番獰悪な種族です。"}],
    [{"role": "user", "content": "今日の天気は?"}, {"role": "assistant", "content": "晴れです。"},
     {"role": "user", "content": "明日は?"}, {"role": "assistant", "content": "雨の予報です。"}],
    [{"role": "user", "content": "東京の名物を一つ教えて。"}, {"role": "assistant", "content": "もんじゃ焼きです。"}],
    [{"role": "user", "content": "一足す一は?"}, {"role": "assistant", "content": "二です。"}],
    [{"role": "user", "content": "春の季語を挙げて。"}, {"role": "assistant", "content": "桜、菜の花、うららか。"}],
    [{"role": "user", "content": "次の文を丁寧にして: 行く"}, {"role": "assistant", "content": "参ります。"},
     {"role": "user", "content": "もっと短く。"}, {"role": "assistant", "content": "行きます。"}],
    [{"role": "user", "content": "富士山の高さは?"}, {"role": "assistant", "content": "三七七六メートルです。"}],
    [{"role": "user", "content": "おすすめの本は?"}, {"role": "assistant", "content": "夏目漱石の「吾輩は猫である」。"}],
    [{"role": "user", "content": "ありがとう。"}, {"role": "assistant", "content": "どういたしまして。"}],
]


class StubTokenizer:
    """Gemma's tokenizer in miniature: <bos> 2, pad 0, the turn markers one id each, every other
    character its own id (assigned on first sight), so ids decode back to text exactly."""

    bos_token_id, pad_token_id, eos_token_id = 2, 0, 1

    def __init__(self):
        self.ids = {START: 3, END: 4}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens
        ids, i = [], 0
        while i < len(text):
            piece = next((m for m in (START, END) if text.startswith(m, i)), text[i])
            ids.append(self.ids.setdefault(piece, len(self.ids) + 5))
            i += len(piece)
        return ids

    def decode(self, ids) -> str:
        names = {v: k for k, v in self.ids.items()}
        return "".join(names.get(int(i), "") for i in ids)

    def __len__(self) -> int:
        return len(self.ids) + 5


def build_data(max_length: int = 160, pack: bool = True) -> tuple[CausalLMData, StubTokenizer]:
    tokenizer = StubTokenizer()
    task = ChatTaskData({"train": CONVERSATIONS, "test": CONVERSATIONS[:4]}, [])
    cfg = CausalLMConfig(name="causal_lm", max_length=max_length, pack=pack)
    return CausalLMData(task, tokenizer, cfg, seed=0), tokenizer


def model_turns(conversation) -> str:
    return "".join(m["content"].strip() + END for m in conversation if m["role"] == "assistant")


def test_labels_are_the_model_turns_and_nothing_else():
    data, tokenizer = build_data()
    windows = data.windows
    assert windows.counts["num_examples"] == len(CONVERSATIONS) and len(windows.input_ids) < len(CONVERSATIONS)
    batch = data.get_batch(np.arange(data.num_samples))  # every window once (the first epoch's order)
    assert set(batch) == {"input_ids", "position_ids", "labels", "use_cache"} and batch["use_cache"] is False
    rows = data.order.windows(np.arange(data.num_samples))
    trained = ""
    for row in np.argsort(rows):  # back in build order: conversations in file order
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        kept = labels != IGNORE_INDEX
        assert torch.equal(labels[kept], ids[kept])
        trained += tokenizer.decode(ids[kept])
    assert trained == "".join(model_turns(c) for c in CONVERSATIONS)


def test_position_ids_restart_per_conversation_and_padding_is_not_trained():
    data, _ = build_data(pack=False)
    assert data.num_samples == len(CONVERSATIONS)
    window = data.windows
    for row in range(data.num_samples):
        length = int(window.attention_mask[row].sum())
        assert (window.position_ids[row, :length] == np.arange(length)).all()
        assert (window.position_ids[row, length:] == 0).all() and (window.labels[row, length:] == IGNORE_INDEX).all()


def test_packed_conversations_do_not_attend_to_each_other():
    """A packed window's logits are those of each conversation run alone (transformers builds
    the block-diagonal mask from the restarting position ids)."""
    from trainer.model import ModelConfig, build_model

    data, tokenizer = build_data()
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gemma-tiny"), len(tokenizer)).eval()
    windows = data.windows
    row = int(np.argmax(windows.sequence_ids.max(axis=1)))  # the window with the most conversations
    assert windows.sequence_ids[row].max() >= 3
    batch = {"input_ids": torch.from_numpy(windows.input_ids[row:row + 1]),
             "position_ids": torch.from_numpy(windows.position_ids[row:row + 1]), "use_cache": False}
    with torch.no_grad():
        packed = model(**batch).logits[0]
        for number in range(1, int(windows.sequence_ids[row].max()) + 1):
            span = np.flatnonzero(windows.sequence_ids[row] == number)
            alone = model(input_ids=torch.from_numpy(windows.input_ids[row, span])[None]).logits[0]
            torch.testing.assert_close(packed[span], alone, rtol=1e-4, atol=1e-4)


def test_eval_loss_is_the_mean_over_trained_tokens():
    from trainer.model import ModelConfig, build_model

    data, tokenizer = build_data()
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="gemma-tiny"), len(tokenizer)).eval()
    windows = data.eval_windows["test"]
    loss_sum, num_tokens = get_loss_sum(model, windows, batch_size=1)
    # Each model turn's characters, one id each, and its <end_of_turn>.
    assert num_tokens == sum(len(m["content"]) + 1 for c in CONVERSATIONS[:4] for m in c if m["role"] == "assistant")
    with torch.no_grad():  # transformers' own loss over the whole split in one batch
        expected = model(**get_window_batch(windows, np.arange(len(windows.input_ids)))).loss.item()
    assert loss_sum / num_tokens == pytest.approx(expected, rel=1e-5)


def test_a_causal_lm_preset_is_refused_for_span_corruption(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_job(ROOT / "configs/quickstart.yaml", [f"output_dir={tmp_path}", "model.preset=gemma-tiny"])
    assert "gemma-tiny is a causal LM" in str(err.value.problems)


def write_chat_job(out: Path, tokenizer_dir: Path) -> Path:
    for name, conversations in (("train.jsonl", CONVERSATIONS), ("eval.jsonl", CONVERSATIONS[:3])):
        (out / name).write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n"
                                        for c in conversations), encoding="utf-8")
    job = {
        "name": "sft", "output_dir": str(out),
        "tokenizer": {"path": str(tokenizer_dir)},
        "model": {"preset": "gemma-tiny"},
        "objective": {"name": "causal_lm", "max_length": 256, "pack": True},
        "task": {"name": "chat", "train_file": str(out / "train.jsonl"), "eval_file": str(out / "eval.jsonl")},
        "train": {"steps": STEPS, "global_batch_size": 4, "micro_batch_size": 2, "lr": 3e-3, "precision": "fp32",
                  "log_every": 2, "warmup_steps": 0},
        "eval": {"batch_size": 2},
        "deepspeed": {"config": "zero3"},
        "checkpoint": {"every_steps": 0},
        "mlflow": {"enabled": False},
        "telemetry": {"busbw_probe_mb": 1},
        "launcher": {"nproc_per_node": 2},
    }
    path = out / "sft.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.multiproc
def test_causal_lm_sft_under_zero3_exports_a_model_that_reproduces_the_engine(tmp_path, neko_data):
    from transformers import AutoModelForCausalLM

    from data_prep import layout

    result = run_t5ja("train", str(write_chat_job(tmp_path, layout.tokenizer_dir(neko_data))))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    run_dir = tmp_path / "sft"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == STEPS // 2 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    eval_loss = next(r for r in records if "eval/loss" in r)
    assert np.isfinite(eval_loss["eval/loss"]) and eval_loss["eval/num_windows"] >= 1
    assert next(r for r in records if "export/max_abs_logit_diff" in r)["export/max_abs_logit_diff"] < 1e-4

    # The run's own export, and `t5ja export` of its checkpoint: the same model.
    exported = run_t5ja("export", str(run_dir), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    verify = torch.load(run_dir / "export" / "verify_batch.pt")
    assert verify["use_cache"] is False and "attention_mask" not in verify
    inputs = {k: v for k, v in verify.items() if k != "logits"}
    for directory in (run_dir / "export", tmp_path / "hf"):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        assert type(model).__name__ == "GemmaForCausalLM"
        assert (directory / "spiece.model").is_file() and (directory / "model.safetensors").is_file()
        with torch.no_grad():
            logits = model(**inputs).logits.float()
        torch.testing.assert_close(logits, verify["logits"], rtol=1e-4, atol=1e-4)

    # eval/loss: both ranks' shards of the eval windows, summed, are the mean over all of them.
    from transformers import AutoTokenizer

    from trainer.causal_lm import tokenize_windows

    windows = tokenize_windows(CONVERSATIONS[:3], AutoTokenizer.from_pretrained(run_dir / "export"),
                               CausalLMConfig(name="causal_lm", max_length=256, pack=True))
    loss_sum, num_tokens = get_loss_sum(model, windows, batch_size=2)
    assert eval_loss["eval/loss"] == pytest.approx(loss_sum / num_tokens, rel=1e-5)
    assert eval_loss["eval/num_trained_tokens"] == num_tokens

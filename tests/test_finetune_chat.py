"""finetune.chat: Gemma's turn format, the loss mask, packing, the livedoor SFT set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from finetune.chat import (END, GENRE_INSTRUCTION, IGNORE_INDEX, START, TITLE_INSTRUCTION, ChatConfig,
                           ChatFormatError, LivedoorSFTConfig, build_livedoor_sft, build_windows, read_chat_jsonl,
                           render_text, tokenize_chat, write_chat_jsonl)
from finetune.livedoor import Article

BOS, PAD = 2, 0
SPECIAL = {START: 3, END: 4}


def encode(text: str) -> list[int]:
    """A stand-in for Gemma's tokenizer: the turn markers are one id each, other characters
    one id per character (offset past the special ids)."""
    ids, i = [], 0
    while i < len(text):
        marker = next((m for m in SPECIAL if text.startswith(m, i)), None)
        ids.append(SPECIAL[marker] if marker else 100 + ord(text[i]))
        i += len(marker) if marker else 1
    return ids


def decode(ids) -> str:
    names = {v: k for k, v in SPECIAL.items()} | {BOS: "<bos>"}
    return "".join(names.get(int(i), chr(int(i) - 100) if i >= 100 else "") for i in ids)


CHAT = [{"role": "system", "content": "丁寧に答える。"}, {"role": "user", "content": " 猫の名前は? "},
        {"role": "assistant", "content": "まだ無い。"}, {"role": "user", "content": "どこで生れた?"},
        {"role": "assistant", "content": "見当がつかぬ。"}]


def test_render_matches_gemmas_template_with_system_folded():
    assert render_text(CHAT) == (
        "<start_of_turn>user\n丁寧に答える。\n\n猫の名前は?<end_of_turn>\n"
        "<start_of_turn>model\nまだ無い。<end_of_turn>\n"
        "<start_of_turn>user\nどこで生れた?<end_of_turn>\n"
        "<start_of_turn>model\n見当がつかぬ。<end_of_turn>\n")


def test_loss_mask_covers_exactly_the_model_turns_and_their_end_of_turn():
    chat = tokenize_chat(CHAT, encode, BOS)
    assert chat.input_ids[0] == BOS and decode(chat.input_ids) == "<bos>" + render_text(CHAT)
    trained = decode(i for i, m in zip(chat.input_ids, chat.loss_mask) if m)
    assert trained == f"まだ無い。{END}見当がつかぬ。{END}"
    assert len(chat.loss_mask) == len(chat.input_ids)


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
    ([{"role": "assistant", "content": "a"}], "must alternate"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "may only come first"),
    ([{"role": "bot", "content": "a"}], "expected system, user or assistant"),
    ([{"role": "user", "content": 3}], "expected a string"),
])
def test_bad_conversations_are_named(messages, message):
    with pytest.raises(ChatFormatError, match=message):
        render_text(messages)


def test_read_reports_bad_lines(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": CHAT[1:3]}, ensure_ascii=False)
    path.write_text("\n".join([good, "{oops", json.dumps({"text": "x"}), good, ""]) + "\n", encoding="utf-8")
    conversations, report = read_chat_jsonl(path)
    assert len(conversations) == 2 and report.num_kept == 2
    assert [where.rsplit(":", 1)[1] for where, _ in report.skipped] == ["2", "3"]


def _example(num_user: int, num_model: int):
    return tokenize_chat([{"role": "user", "content": "あ" * num_user},
                          {"role": "assistant", "content": "い" * num_model}], encode, BOS)


def test_packing_fills_windows_in_order_and_masks_labels():
    examples = [_example(3, 2), _example(5, 1), _example(2, 2)]  # 23, 24 and 22 tokens
    windows = build_windows(examples, max_length=47, pad_id=PAD)
    assert windows.input_ids.shape == (2, 47)
    assert windows.sequence_ids[0].max() == 2 and windows.sequence_ids[1].max() == 1
    first = len(examples[0])
    assert windows.position_ids[0, first] == 0 and windows.position_ids[0, first - 1] == first - 1
    real = windows.attention_mask.astype(bool)
    assert (windows.input_ids[~real] == PAD).all() and (windows.labels[~real] == IGNORE_INDEX).all()
    trained = windows.labels != IGNORE_INDEX
    assert decode(windows.input_ids[0][trained[0]]) == f"いい{END}い{END}"
    assert (windows.labels[trained] == windows.input_ids[trained]).all()
    assert windows.counts["num_examples"] == 3 and windows.counts["num_trained_tokens"] == 8


def test_unpacked_and_overlong_are_counted():
    examples = [_example(3, 2), _example(40, 2), _example(3, 40)]  # 21, 51 and 59 tokens
    dropped = build_windows(examples, max_length=30, pad_id=PAD, pack=False)
    assert dropped.input_ids.shape == (1, 30) and dropped.counts["num_dropped_overlong"] == 2
    truncated = build_windows(examples, max_length=30, pad_id=PAD, pack=False, overlong="truncate")
    # The second is cut inside the user turn: nothing left to learn, so it is dropped, not kept.
    assert truncated.input_ids.shape == (2, 30) and truncated.counts["num_truncated_overlong"] == 1
    assert truncated.counts["num_dropped_overlong"] == 1
    assert decode(truncated.input_ids[1][truncated.labels[1] != IGNORE_INDEX]) == "い" * 11


def test_config_validation_names_keys():
    with pytest.raises(ValidationError, match="overlong"):
        ChatConfig(path="x", overlong="wrap")
    with pytest.raises(ValidationError, match="max_length"):
        ChatConfig(path="x", max_length=0)
    with pytest.raises(ValidationError, match="tasks"):
        LivedoorSFTConfig(tasks=["summary"])


def test_livedoor_sft_set_round_trips(tmp_path):
    article = Article("smax", "1", "http://x", "2012", "新型スマホ登場", "ｽﾏﾎが　発売された。\n価格は未定。")
    conversations = build_livedoor_sft([article], LivedoorSFTConfig(max_article_chars=8))
    title, genre = conversations
    assert title[0]["content"] == f"{TITLE_INSTRUCTION}\n\nスマホが発売され"  # normalised, then cut to 8 characters
    assert "新型スマホ登場" not in title[0]["content"] and title[1]["content"] == "新型スマホ登場"
    assert genre[0]["content"].startswith(f"{GENRE_INSTRUCTION}\n\n新型スマホ登場\n") and genre[1]["content"] == "エスマックス"
    path = write_chat_jsonl(conversations, tmp_path / "sft.jsonl")
    assert read_chat_jsonl(path)[0] == conversations
    assert np.all(tokenize_chat(genre, encode, BOS).input_ids[:2] == [BOS, SPECIAL[START]])

"""Chat SFT data for Gemma-layout causal LMs: turn format, loss masks, packing, a livedoor set.

Input: JSON lines `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`.
Rendering follows Gemma's chat template (tokenizer_config.json of the Gemma instruction-tuned
models): `<bos>` once, then per turn `<start_of_turn>{user|model}\\n{content}<end_of_turn>\\n`;
"assistant" is written "model"; Gemma has no system turn, so a leading system message is
folded into the first user turn as "{system}\\n\\n{user}"; contents are stripped; roles
alternate user/model starting with the user.

The loss mask is 1 exactly on the model's turns: its content and its `<end_of_turn>` (so the
model learns to stop), never on the role header or the "\\n" after the turn. Texts are
tokenised segment by segment at these boundaries, which makes the mask exact whatever the
tokenizer; the turn markers are special tokens in Gemma's tokenizer, so nothing merges
across them anyway.

Evaluation (`t5ja eval`) asks the model for each conversation's last model turn: the prompt is
the conversation before it, rendered and tokenised the same way, up to that turn's header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from finetune import Example, ReadReport, read_json_lines

START, END = "<start_of_turn>", "<end_of_turn>"
ROLE_NAMES = {"user": "user", "assistant": "model"}
IGNORE_INDEX = -100  # labels ignored by torch's cross entropy (and transformers' LM loss)

Message = dict[str, str]
Segment = tuple[str, bool]  # (text, trained on)


class ChatWindowsConfig(BaseModel):
    """How tokenised conversations become fixed-length training windows (the causal_lm objective's
    fields: trainer/causal_lm.py)."""

    model_config = ConfigDict(extra="forbid")

    max_length: int = Field(2048, gt=1, description="tokens per training window")
    pack: bool = Field(True, description="pack several conversations into each window (else one per window)")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="a conversation longer than max_length: drop it, or keep its first max_length tokens "
                            "(both counted in the build report; a truncated one left without a model token is "
                            "dropped)")


class ChatConfig(ChatWindowsConfig):
    """Chat SFT data: the file and how examples become fixed-length windows."""

    path: str = Field(description="chat JSON lines: {\"messages\": [{\"role\", \"content\"}]}")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered in Gemma's format; the message says why."""


def validate_messages(messages: object) -> list[Message]:
    """The messages as a list of {role, content}; ChatFormatError naming the first problem."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ChatFormatError(f"messages[{i}]: expected an object with 'role' and 'content' only")
        if message["role"] not in ("system", "user", "assistant"):
            raise ChatFormatError(f"messages[{i}].role: {message['role']!r}; expected system, user or assistant")
        if not isinstance(message.get("content"), str):
            raise ChatFormatError(f"messages[{i}].content: expected a string")
        if message["role"] == "system" and i != 0:
            raise ChatFormatError(f"messages[{i}]: a system message may only come first")
    return messages


def fold_system(messages: list[Message]) -> list[Message]:
    """Gemma has no system turn: its text opens the first user turn, a blank line after it."""
    if messages[0]["role"] != "system":
        return messages
    rest = messages[1:]
    if not rest or rest[0]["role"] != "user":
        raise ChatFormatError("a system message must be followed by a user message")
    first = {"role": "user", "content": messages[0]["content"].strip() + "\n\n" + rest[0]["content"].strip()}
    return [first, *rest[1:]]


def render_segments(messages: list[Message]) -> list[Segment]:
    """The conversation as (text, trained) segments in Gemma's turn format (no <bos>)."""
    turns = fold_system(validate_messages(messages))
    segments: list[Segment] = []
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ChatFormatError(f"turn {i} is {message['role']}; roles must alternate user/assistant, "
                                  "starting with user")
        header = f"{START}{ROLE_NAMES[message['role']]}\n"
        trained = message["role"] == "assistant"
        segments += [(header, False), (message["content"].strip() + END, trained), ("\n", False)]
    if not any(trained for _, trained in segments):
        raise ChatFormatError("no assistant turn: nothing to train on")
    return segments


def render_text(messages: list[Message]) -> str:
    """The rendered conversation as one string (what Gemma's chat template writes, less <bos>)."""
    return "".join(text for text, _ in render_segments(messages))


@dataclass
class TokenizedChat:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_chat(messages: list[Message], encode: Callable[[str], list[int]], bos_id: int | None) -> TokenizedChat:
    """Token ids and loss mask. `encode` must add no special tokens of its own (for a Hugging
    Face tokenizer: `lambda text: tok.encode(text, add_special_tokens=False)`)."""
    ids, mask = ([bos_id], [0]) if bos_id is not None else ([], [])
    for text, trained in render_segments(messages):
        pieces = encode(text)
        ids += pieces
        mask += [int(trained)] * len(pieces)
    return TokenizedChat(ids, mask)


def read_chat_jsonl(path: str | Path) -> tuple[list[list[Message]], ReadReport]:
    """Conversations of a chat JSON lines file; malformed lines are listed in the report."""
    report, conversations = ReadReport(str(path)), []
    for where, record in read_json_lines(path, report):
        if "messages" not in record:
            report.skip(where, "expected an object with a 'messages' list")
            continue
        try:
            render_segments(record["messages"])  # reject what cannot be rendered, here
        except ChatFormatError as err:
            report.skip(where, str(err))
            continue
        conversations.append(record["messages"])
    report.num_kept = len(conversations)
    return conversations, report


def write_chat_jsonl(conversations: list[list[Message]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for messages in conversations:
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path


# --- answering the last turn (`t5ja eval`) ---------------------------------------------------

@dataclass(frozen=True)
class ChatPrompt:
    """A conversation up to its last model turn, and that turn: what the model should answer."""

    text: str  # rendered, ending with the last model turn's header "<start_of_turn>model\n"
    input_ids: list[int]  # <bos> + the text, tokenised segment by segment as tokenize_chat does
    reference: str  # the last model turn's content, stripped
    num_cut_tokens: int  # tokens left out after <bos> because the prompt was longer than max_tokens


def build_chat_prompt(messages: list[Message], encode: Callable[[str], list[int]], bos_id: int | None,
                      max_tokens: int) -> ChatPrompt:
    """The prompt that asks for the conversation's last model turn, tokenised exactly as training
    saw it. A prompt over `max_tokens` keeps <bos> and its *last* tokens: the turn being answered
    is at the end (training's `overlong: truncate` keeps the first ones, which would cut it)."""
    segments = render_segments(messages)
    last = max(i for i, (_, trained) in enumerate(segments) if trained)
    head = [bos_id] if bos_id is not None else []
    body = [token for text, _ in segments[:last] for token in encode(text)]
    num_cut = max(0, len(head) + len(body) - max_tokens)
    return ChatPrompt(text="".join(text for text, _ in segments[:last]), input_ids=head + body[num_cut:],
                      reference=segments[last][0][:-len(END)], num_cut_tokens=num_cut)


def is_answer_correct(example: Example, prediction: str) -> bool:
    """pass@1 of a chat answer: an exact match with the reference turn after SQuAD's normalisation
    (finetune.metrics.normalize_answer: case, ASCII punctuation, English articles, whitespace).
    Japanese punctuation counts: 「晴れです」 is not 「晴れです。」."""
    from finetune.metrics import get_exact_match

    return bool(get_exact_match(prediction, example.target))


def get_pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS (Gemma's has a pad token; some causal LMs' have none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def get_stop_ids(tokenizer) -> list[int]:
    """EOS, and <end_of_turn> where the tokenizer has it as one token (Gemma's does): a model
    trained on this format ends its turn with it."""
    return [i for i in (tokenizer.eos_token_id, tokenizer.get_vocab().get(END)) if i is not None]


def _generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers of one batch of prompts (token ids), cut at the end of the model's turn."""
    import torch

    pad_id = get_pad_id(tokenizer)
    width = max(len(prompt) for prompt in prompts)
    ids, mask = np.full((len(prompts), width), pad_id, dtype=np.int64), np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        # Padding on the left: every row's answer starts at column `width` (transformers derives
        # the positions from the mask, so a padded prompt reads as it would alone).
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    with torch.inference_mode():
        output = model.generate(input_ids=torch.from_numpy(ids).to(model.device),
                                attention_mask=torch.from_numpy(mask).to(model.device),
                                max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                                eos_token_id=get_stop_ids(tokenizer), pad_token_id=pad_id)
    # .cpu() waits for the device: the batch's time includes all of the generation.
    texts = tokenizer.batch_decode(output[:, width:].cpu(), skip_special_tokens=True)
    # A tokenizer without <end_of_turn> as a token may still spell it out: the turn ends there.
    return [text.split(END)[0].strip() for text in texts]


def generate_answers(model, tokenizer, examples: Sequence[Example], prompt_ids: Mapping[str, list[int]],
                     batch_size: int, max_new_tokens: int) -> list[dict]:
    """One record per example (`finetune.serving.predict_in_batches`): the greedy answer to the
    prompt `prompt_ids[example.id]` (a ChatPrompt's input_ids), `example.target` the reference.
    `model`: a transformers causal LM."""
    from finetune.serving import predict_in_batches

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")

    def generate(batch: Sequence[Example]) -> list[str]:
        return _generate_answers(model, tokenizer, [prompt_ids[e.id] for e in batch], max_new_tokens)

    return predict_in_batches(model, examples, batch_size, generate)


# --- windows ---------------------------------------------------------------------------------

@dataclass
class Windows:
    """Fixed-length training windows, as arrays of shape (num_windows, length).

    position_ids restart at 0 for each conversation in a window, and sequence_ids number the
    conversations (0 for padding), so that attention can be kept inside each conversation.
    """

    input_ids: np.ndarray
    labels: np.ndarray  # the token where trained, else IGNORE_INDEX
    attention_mask: np.ndarray  # 1 on real tokens, 0 on padding
    position_ids: np.ndarray
    sequence_ids: np.ndarray
    num_examples: int = 0
    num_dropped: int = 0
    num_truncated: int = 0
    counts: dict = field(default_factory=dict)


def fit_examples(examples: list[TokenizedChat], max_length: int, overlong: str) -> tuple[list[TokenizedChat], int, int]:
    """Examples that fit a window: the too-long ones dropped or truncated, and both counts."""
    kept, num_dropped, num_truncated = [], 0, 0
    for example in examples:
        if len(example) <= max_length:
            kept.append(example)
        elif overlong == "truncate" and any(example.loss_mask[:max_length]):
            kept.append(TokenizedChat(example.input_ids[:max_length], example.loss_mask[:max_length]))
            num_truncated += 1
        # Dropped too: a truncation that keeps no model token (a window of only such examples
        # would have no label, and the mean loss over zero tokens is NaN).
        else:
            num_dropped += 1
    return kept, num_dropped, num_truncated


def group_examples(lengths: list[int], max_length: int, pack: bool) -> list[list[int]]:
    """Indices of the examples of each window, in order: a window is closed when the next
    example does not fit (greedy, no example split across windows, order kept)."""
    groups: list[list[int]] = []
    used = max_length  # forces a new window for the first example
    for index, length in enumerate(lengths):
        if not pack or used + length > max_length:
            groups.append([])
            used = 0
        groups[-1].append(index)
        used += length
    return groups


def build_windows(examples: list[TokenizedChat], max_length: int, pad_id: int, pack: bool = True,
                  overlong: str = "drop") -> Windows:
    """Pack (or pad one per window) the tokenised conversations into windows of max_length."""
    kept, num_dropped, num_truncated = fit_examples(examples, max_length, overlong)
    groups = group_examples([len(e) for e in kept], max_length, pack)
    shape = (len(groups), max_length)
    windows = Windows(np.full(shape, pad_id, np.int64), np.full(shape, IGNORE_INDEX, np.int64),
                      np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                      num_examples=len(kept), num_dropped=num_dropped, num_truncated=num_truncated)
    for row, group in enumerate(groups):
        start = 0
        for number, index in enumerate(group, 1):
            start = _place(windows, row, start, number, kept[index])
    windows.counts = get_window_counts(windows)
    return windows


def _place(windows: Windows, row: int, start: int, number: int, example: TokenizedChat) -> int:
    end = start + len(example)
    ids, mask = np.asarray(example.input_ids, np.int64), np.asarray(example.loss_mask, bool)
    windows.input_ids[row, start:end] = ids
    windows.labels[row, start:end] = np.where(mask, ids, IGNORE_INDEX)
    windows.attention_mask[row, start:end] = 1
    windows.position_ids[row, start:end] = np.arange(len(example))
    windows.sequence_ids[row, start:end] = number
    return end


def get_window_counts(windows: Windows) -> dict:
    """What the build kept and lost, for the run's log (nothing is dropped silently)."""
    num_tokens = int(windows.attention_mask.sum())
    return {"num_windows": int(windows.input_ids.shape[0]), "num_examples": windows.num_examples,
            "num_dropped_overlong": windows.num_dropped, "num_truncated_overlong": windows.num_truncated,
            "num_tokens": num_tokens, "num_trained_tokens": int((windows.labels != IGNORE_INDEX).sum()),
            "fill": num_tokens / windows.input_ids.size if windows.input_ids.size else 0.0}


# --- a Japanese SFT set from livedoor --------------------------------------------------------

TITLE_INSTRUCTION = "次の記事にタイトルを付けてください。"
GENRE_INSTRUCTION = "次の記事のジャンルを答えてください。"


class LivedoorSFTConfig(BaseModel):
    """The livedoor SFT set: article -> title and article -> genre name."""

    model_config = ConfigDict(extra="forbid")

    max_article_chars: int = Field(1000, gt=0, description="article bodies are cut to this many characters")
    tasks: list[Literal["title", "genre"]] = Field(["title", "genre"], min_length=1,
                                                   description="which conversations to make from each article")


def build_livedoor_sft(articles, cfg: LivedoorSFTConfig) -> list[list[Message]]:
    """Conversations from livedoor articles (pass the *training* split only: the test split's
    titles and genres must not leak into SFT). The title task shows only the body."""
    from data_prep.clean import normalize_neologdn
    from finetune.livedoor import GENRE_NAMES

    conversations = []
    for article in articles:
        title = normalize_neologdn(article.title)
        body = normalize_neologdn(article.body)[:cfg.max_article_chars]
        # task -> (instruction, article text shown, answer); a genre not in GENRE_NAMES keeps its directory name.
        prompts = {"title": (TITLE_INSTRUCTION, body, title),
                   "genre": (GENRE_INSTRUCTION, f"{title}\n{body}", GENRE_NAMES.get(article.genre, article.genre))}
        for task in cfg.tasks:
            instruction, text, answer = prompts[task]
            conversations.append([{"role": "user", "content": f"{instruction}\n\n{text}"},
                                  {"role": "assistant", "content": answer}])
    return conversations

"""Record -> example, per format and task: token ids, loss masks, truncation and record errors."""

import pytest
from conftest import VOCAB, ids

from loratune.core.errors import ConfigError
from loratune.data import IGNORE_INDEX, DataConfig, Formatter, Record, fit_pair
from loratune.data.labels import LabelMap
from loratune.errors import DataError

EOS = VOCAB["</s>"]


def fmt(tokenizer, task="causal-lm", format="prompt_completion", labels=None, **cfg):
    label_map = LabelMap(labels) if labels else None
    return Formatter(DataConfig(train="x.jsonl", format=format, **cfg), tokenizer, task, format, label_map)


def rec(**fields):
    return Record(fields, "data.jsonl, line 3")


def test_prompt_completion_learns_only_the_answer_and_eos(tok):
    out = fmt(tok)(rec(prompt="hello world", completion="the cat"))
    assert out.example["input_ids"] == ids("hello", "world", "the", "cat") + [EOS]
    assert out.example["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + ids("the", "cat") + [EOS]
    assert out.prompt_ids == ids("hello", "world")
    assert out.reference == "the cat"


def test_train_on_prompt_learns_everything(tok):
    out = fmt(tok, train_on_prompt=True)(rec(prompt="hello world", completion="the cat"))
    assert out.example["labels"] == out.example["input_ids"]


def test_instruction_uses_alpaca_layout_with_optional_input(tok):
    formatter = fmt(tok, format="instruction", train_on_prompt=True)
    with_input = formatter._pair(rec(instruction="sum", input="1 2", output="3"))
    without = formatter._pair(rec(instruction="sum", output="3"))
    assert with_input[0].endswith("### Instruction:\nsum\n\n### Input:\n1 2\n\n### Response:\n")
    assert "paired with an input" in with_input[0]
    assert "### Input" not in without[0] and "paired with an input" not in without[0]
    assert with_input[1] == without[1] == "3"


def test_translation_prompt_names_languages_for_causal_lm(tok):
    formatter = fmt(tok, format="translation", source_language="English", target_language="Spanish")
    prompt, answer = formatter._pair(rec(source="hello world", target="hola mundo"))
    assert prompt == "Translate English to Spanish:\nhello world\n"
    out = formatter(rec(source="hello world", target="hola mundo"))
    assert out.example["input_ids"][-3:] == ids("hola", "mundo") + [EOS]
    assert out.example["labels"].count(IGNORE_INDEX) == len(out.example["labels"]) - 3


def test_translation_for_seq2seq_reads_the_prompt_and_predicts_the_target(tok):
    out = fmt(tok, task="seq2seq", format="translation")(rec(source="hello world", target="hola mundo"))
    assert out.example["labels"] == ids("hola", "mundo") + [EOS]
    assert out.example["input_ids"] == tok("Translate English to Spanish:\nhello world\n")["input_ids"]
    assert out.reference == "hola mundo"


def test_classification_maps_names_indices_and_digit_strings(tok):
    formatter = fmt(tok, task="classification", format="classification", labels=["negative", "positive"])
    example = formatter(rec(text="good movie", label="positive")).example
    assert example == {"input_ids": ids("good", "movie"), "label": 1}
    assert formatter(rec(text="bad movie", label=0)).example["label"] == 0
    assert formatter(rec(text="bad movie", label="1")).example["label"] == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": "bad", "label": "neutral"}, "field 'label': unknown label 'neutral' (known: negative, positive)"),
        ({"text": "bad", "label": 5}, "field 'label': unknown label 5"),
        ({"text": "bad", "label": True}, "field 'label': expected a label name or index, got bool"),
        ({"text": "bad"}, "field 'label': missing"),
        ({"text": 3, "label": 0}, "field 'text': expected a string, got int"),
        ({"text": "  ", "label": 0}, "field 'text': is empty"),
    ],
)
def test_classification_record_errors_name_line_and_field(tok, fields, message):
    formatter = fmt(tok, task="classification", format="classification", labels=["negative", "positive"])
    with pytest.raises(DataError) as caught:
        formatter(rec(**fields))
    assert str(caught.value).startswith("data.jsonl, line 3, " + message)
    assert "\n" not in str(caught.value)


def test_configured_field_names_are_used(tok):
    formatter = fmt(tok, task="classification", format="classification", labels=["a", "b"],
                    text_field="review", label_field="stars")
    assert formatter(rec(review="good", stars="b")).example["label"] == 1


def test_classification_as_generation_with_templates_shows_label_names(tok):
    formatter = fmt(tok, format="classification", labels=["negative", "positive"],
                    prompt_template="review: {text} sentiment :", completion_template=" {label}")
    out = formatter(rec(text="good movie", label=1))
    assert out.example["input_ids"] == ids("review", ":", "good", "movie", "sentiment", ":", "positive") + [EOS]
    assert out.example["labels"][-2:] == [VOCAB["positive"], EOS]
    assert out.reference == "positive"


def test_template_with_unknown_field_names_the_field(tok):
    formatter = fmt(tok, prompt_template="{question}", completion_template="{completion}")
    with pytest.raises(DataError, match=r"line 3, field 'question': missing \(used by prompt_template\)"):
        formatter(rec(prompt="a", completion="b"))


def test_task_and_format_must_fit(tok):
    with pytest.raises(ConfigError, match="data.format: 'chat' cannot train a seq2seq model"):
        fmt(tok, task="seq2seq", format="chat")
    with pytest.raises(ConfigError, match="chat template"):
        fmt(tok, format="chat")


def test_fit_pair_keeps_eos_and_bos_and_the_end_of_the_prompt():
    prompt, answer = [1] + list(range(10, 20)), list(range(30, 40)) + [2]
    fitted_prompt, fitted_answer = fit_pair(prompt, answer, 12, keep_first=True)
    assert fitted_answer == [30, 31, 32, 33, 34, 2]  # half the room, EOS kept
    assert fitted_prompt == [1, 15, 16, 17, 18, 19]  # BOS, then the tokens nearest the answer
    assert fit_pair([5, 6], [7, 2], 12, keep_first=False) == ([5, 6], [7, 2])
    assert fit_pair([5, 6, 7, 8], [9, 2], 4, keep_first=False) == ([7, 8], [9, 2])


def test_long_record_is_truncated_to_max_length_with_bos(bos_tok):
    words = " ".join(["a", "b", "c", "d", "e", "f", "g", "h"] * 2)
    out = fmt(bos_tok, max_length=8)(rec(prompt=words, completion=words))
    assert len(out.example["input_ids"]) == 8 and out.truncated
    assert out.example["input_ids"][0] == VOCAB["<s>"]
    assert out.example["input_ids"][-1] == EOS and out.example["labels"][-1] == EOS
    assert out.example["labels"][:4] == [IGNORE_INDEX] * 4


def test_text_not_concatenated_is_cut_and_labels_every_token(tok):
    out = fmt(tok, format="text", concatenate_texts=False, max_length=8)(rec(text="a b c d e f g h a b"))
    assert out.example["input_ids"] == ids("a", "b", "c", "d", "e", "f", "g", "h")
    assert out.example["labels"] == out.example["input_ids"] and out.truncated
    assert fmt(tok, format="text")(rec(text="a b")).example["input_ids"] == ids("a", "b") + [EOS]


CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_chat_learns_only_assistant_turns(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    out = fmt(tokenizer, format="chat")(rec(messages=CHAT))
    learned = [t for t, label in zip(out.example["input_ids"], out.example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "Hello!<|im_end|>\n4<|im_end|>\n"
    assert tokenizer.decode(out.example["input_ids"]).startswith("<|im_start|>system")
    assert tokenizer.decode(out.prompt_ids).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert out.reference == "4"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hi", "field 'messages': expected a non-empty list"),
        ([{"role": "robot", "content": "x"}], r"field 'messages\[0\].role': expected one of"),
        ([{"role": "user", "content": 1}], r"field 'messages\[0\].content': expected a string, got int"),
        ([{"role": "user", "content": "x"}], "field 'messages': has no assistant message"),
    ],
)
def test_chat_record_errors(smollm2_tokenizer, messages, message):
    with pytest.raises(DataError, match="data.jsonl, line 3, " + message):
        fmt(smollm2_tokenizer, format="chat")(rec(messages=messages))

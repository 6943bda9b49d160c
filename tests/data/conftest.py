"""Fixtures for the data tests: a tiny word-level tokenizer with known ids, and file writers."""

import csv
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ("hello world the cat sat on mat good bad movie review sentiment : positive negative "
         "translate english to spanish hola mundo label text a b c d e f g h").split()
VOCAB = {token: i for i, token in enumerate(SPECIALS + WORDS)}


def make_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tok():
    """Word-level tokenizer without BOS: "hello world" -> [4, 5]; EOS is 2, pad 0."""
    return make_tokenizer(bos=False)


@pytest.fixture(scope="session")
def bos_tok():
    """Same vocabulary, but every text starts with BOS (id 1), like Llama tokenizers."""
    return make_tokenizer(bos=True)


def ids(*words: str) -> list[int]:
    return [VOCAB[w] for w in words]


@pytest.fixture
def write_jsonl(tmp_path):
    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_csv(tmp_path):
    def write(header, rows, name="data.csv", delimiter=","):
        path = tmp_path / name
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(header)
            writer.writerows(rows)
        return path

    return write

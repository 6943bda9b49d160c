"""Batching: right padding, attention mask, labels padded with -100."""

import torch

from loratune.batching import collate
from loratune.tasks import IGNORE_INDEX


def test_causal_batch_is_right_padded():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_token_id=0, task="causal-lm")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_seq2seq_labels_are_padded_to_their_own_length():
    examples = [{"input_ids": [5], "labels": [1, 2, 3]}, {"input_ids": [6, 7], "labels": [4]}]
    batch = collate(examples, pad_token_id=0, task="seq2seq")
    assert batch["input_ids"].tolist() == [[5, 0], [6, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_classification_labels_are_one_id_per_row():
    batch = collate([{"input_ids": [5, 6], "label": 1}, {"input_ids": [7], "label": 0}], 0, "classification")
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]

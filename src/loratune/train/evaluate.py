"""Evaluation: loss and perplexity, classification metrics, and metrics on generated text.

Generation-based metrics compare what the model writes after each prompt with the reference: exact label
match (accuracy, macro-F1) when the answers are label names, BLEU and chrF (sacrebleu) for translation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from loratune.batching import BatchMaker, common_prefix_length, decoder_body, pad_rows, prefix_cache
from loratune.train.step import batch_loss, head_loss, lm_hidden, split_lm


def macro_f1(predicted: Sequence, expected: Sequence) -> float:
    labels = sorted(set(expected) | set(predicted), key=str)
    scores = []
    for label in labels:
        tp = sum(p == label and e == label for p, e in zip(predicted, expected))
        fp = sum(p == label and e != label for p, e in zip(predicted, expected))
        fn = sum(p != label and e == label for p, e in zip(predicted, expected))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def _no_progress(items: Iterable, **_: object) -> Iterable:
    return items


def eval_batches(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive chunks of `size` items: evaluation keeps the examples' order."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Evaluation:
    """What one evaluation found: metrics by name (empty without evaluation data) and sample answers."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Forwards:
    """How evaluation runs the model, the same for each of its passes."""

    model: nn.Module
    device: torch.device
    batch_size: int
    autocast: Callable = nullcontext
    progress: Callable = _no_progress
    loss_chunk: int = 0


@dataclass
class LossTotals:
    """Sums over evaluated examples that add up across shards (ranks) before they become metrics; the lists
    join in shard order."""

    loss: float = 0.0  # loss x weight, summed
    weight: int = 0  # predicted tokens (or rows)
    predicted: list = field(default_factory=list)  # classification only
    expected: list = field(default_factory=list)
    chosen: list = field(default_factory=list)  # each example's highest-scoring label, when read from the loss

    def __add__(self, other: LossTotals) -> LossTotals:
        return LossTotals(self.loss + other.loss, self.weight + other.weight, self.predicted + other.predicted,
                          self.expected + other.expected, self.chosen + other.chosen)


@torch.no_grad()
def loss_totals(forwards: Forwards, examples: Sequence[dict], batches: BatchMaker, *, task: str,
                prompts: Sequence[list[int]] | None = None, label_tokens: Sequence[int] | None = None) -> LossTotals:
    """The summed loss and weight (and classification predictions) of `examples`, in batches as `batches`
    makes them.

    With `label_tokens` (each label's one token) and each example's `prompts`, also the label each prompt
    scores highest, read from the same forward: the hidden state of the prompt's last token is the one label
    scoring reads (a causal model's state at a position does not depend on later tokens), so the head on those
    rows scores every one-token label and an evaluation costs one pass instead of two.
    """
    model = forwards.model
    model.eval()
    parts = split_lm(model) if label_tokens is not None else None
    if label_tokens is not None and parts is None:
        raise ValueError(f"{type(model).__name__}: label scoring needs a causal LM with a plain output head")
    totals = LossTotals()
    for start in forwards.progress(range(0, len(examples), forwards.batch_size), desc="evaluating"):
        chunk = list(examples[start:start + forwards.batch_size])
        batch, prefix = batches.make(chunk, forwards.device, training=False)
        with forwards.autocast():
            if parts is None:
                loss, logits, weight = batch_loss(model, batch, task, forwards.loss_chunk, prefix)
            else:
                ends = [len(p) - 1 for p in prompts[start:start + len(chunk)]]
                hidden = lm_hidden(parts[0], batch, prefix, also_read=ends)
                loss, logits, weight = head_loss(parts[1], hidden, batch["labels"], forwards.loss_chunk)
                totals.chosen += _best_label(parts[1], hidden, ends, label_tokens)
        totals.loss += loss.item() * weight
        totals.weight += weight
        if task == "classification":
            totals.predicted += logits.argmax(-1).tolist()
            totals.expected += batch["labels"].tolist()
    return totals


def _best_label(head: nn.Module, hidden: torch.Tensor, ends: list[int], label_tokens: Sequence[int]) -> list[int]:
    """Per row, the index of the label whose token the head scores highest after position `ends[row]`."""
    rows = torch.arange(len(ends), device=hidden.device)
    logits = head(hidden[rows, torch.tensor(ends, device=hidden.device)]).float()
    return logits[:, torch.tensor(label_tokens, device=hidden.device)].argmax(dim=1).tolist()


def loss_metrics(totals: LossTotals, task: str) -> dict:
    mean = totals.loss / max(totals.weight, 1)
    metrics = {"loss": mean}
    if task == "classification":
        predicted, expected = totals.predicted, totals.expected
        metrics["accuracy"] = sum(p == e for p, e in zip(predicted, expected)) / max(len(expected), 1)
        metrics["macro_f1"] = macro_f1(predicted, expected)
    else:
        metrics["perplexity"] = math.exp(min(mean, 50.0))
    return metrics


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int, device: torch.device, autocast: Callable,
                   progress: Callable = lambda it, **_: it, share_prefix: bool = True) -> list[str]:
    """Greedy continuations of token-id prompts, decoded; a batch generates together, its padding masked.

    A decoder-only chunk whose prompts share a common prefix (`batching.common_prefix_length`) runs that prefix once, at
    batch 1 (`batching.prefix_cache`), and generates from its broadcast cache. Tokens and positions are
    the left-padded batch's, so the answers are too (its logits differ only by rounding); `share_prefix=False`
    keeps plain left padding.
    """
    model.eval()
    pad_id = tokenizer.pad_token_id
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    body = decoder_body(model) if share_prefix and not encoder_decoder else None
    texts: list[str] = []
    for chunk in progress(list(eval_batches(prompts, batch_size)), desc="generating"):
        prefix = common_prefix_length(chunk) if body is not None else 0
        ids, mask = (t.to(device) for t in pad_rows(chunk, pad_id, prefix, left=not encoder_decoder))
        with autocast():
            cache = {"past_key_values": prefix_cache(body, ids[:1, :prefix], len(chunk))[1]} if prefix else {}
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id, **cache)
        new_tokens = out if encoder_decoder else out[:, ids.shape[1]:]
        texts += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return texts


def label_from_text(text: str, label_names: Sequence[str]) -> str | None:
    """The label a generated answer names: the one it starts with (case-insensitive), else the first mentioned."""
    lowered = text.strip().lower()
    for name in sorted(label_names, key=len, reverse=True):
        if lowered.startswith(name.lower()):
            return name
    positions = [(lowered.find(name.lower()), name) for name in label_names if name.lower() in lowered]
    return min(positions)[1] if positions else None


def generation_metrics(outputs: Sequence[str], references: Sequence[str], label_names: Sequence[str] | None) -> dict:
    """Accuracy and macro-F1 when answers are labels; otherwise BLEU and chrF."""
    if label_names:
        predicted = [label_from_text(o, label_names) or "<none>" for o in outputs]
        expected = [label_from_text(r, label_names) or r.strip() for r in references]
        accuracy = sum(p == e for p, e in zip(predicted, expected)) / max(len(expected), 1)
        return {"accuracy": accuracy, "macro_f1": macro_f1(predicted, expected)}
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(list(outputs), [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(list(outputs), [list(references)]).score}

"""Evaluation by label scoring: when the answers are a known set of labels, the model's answer is the label
with the highest log-likelihood after the prompt, read from one forward pass instead of generated token by
token.

A batch's prompts run once (their common prefix once, at batch 1, from `batching.prefix_cache`); the last prompt
token's distribution scores every label's first token, and a label of several tokens adds one short
forward of its remaining tokens against the prompts' cache. A label's log-likelihood is the sum of its
tokens' log-probabilities (no end-of-sequence token). The chosen label is the one with the highest mean
log-probability per token (lm-eval-harness's length-normalised `acc_norm`, per token rather than per byte):
a sum lets a label of several tokens lose by construction, so an untrained model's "before" accuracy would
fall below chance. The summed choice is reported beside it (`label_choices`). For one-token labels the two
agree, and the scored answer is the one greedy generation writes.

When every label is one token and each example is its prompt and answer (`scores_ride_on_loss`), the
evaluation reads the scores from the loss's own forward instead (`evaluate.loss_totals`), so it costs one
pass over the held-out examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from loratune.batching import SharedPrefixCache, common_prefix_length, pad_rows, prefix_cache
from loratune.train.evaluate import Forwards, eval_batches
from loratune.train.step import split_lm


@torch.no_grad()
def label_log_likelihoods(model: nn.Module, prompts: Sequence[list[int]], labels: Sequence[list[int]],
                          batch_size: int, pad_id: int, device: torch.device,
                          autocast: Callable = nullcontext, progress: Callable = lambda it, **_: it,
                          share_prefix: bool = True) -> torch.Tensor:
    """(prompts x labels) float32 log-likelihoods of each label's tokens right after each prompt."""
    if not labels or any(not label for label in labels):
        raise ValueError("every label needs at least one token")
    parts = _lm_parts(model)
    model.eval()
    scores = []
    for chunk in progress(list(eval_batches(prompts, batch_size)), desc="scoring labels"):
        with autocast():
            scores.append(_score_batch(*parts, list(chunk), labels, pad_id, device, share_prefix))
    return torch.cat(scores) if scores else torch.zeros(0, len(labels))


def _lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    parts = split_lm(model)
    if parts is None:
        raise ValueError(f"{type(model).__name__}: label scoring needs a causal LM with a plain output head")
    return parts


def _score_batch(body: nn.Module, head: nn.Module, prompts: list[list[int]], labels: Sequence[list[int]],
                 pad_id: int, device: torch.device, share_prefix: bool) -> torch.Tensor:
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    prefix = common_prefix_length(prompts) if share_prefix else 0
    ids, mask = (t.to(device) for t in pad_rows(prompts, pad_id))
    _, cache = prefix_cache(body, ids[:1, :prefix], len(prompts))
    if all(len(label) == 1 for label in labels):  # no continuation runs against the prompts' cache
        with cache.prefix_only():
            return _first_token_scores(body, head, ids, mask, lengths, labels, prefix, cache).cpu()
    scores = _first_token_scores(body, head, ids, mask, lengths, labels, prefix, cache)
    for k, label in enumerate(labels):
        if len(label) > 1:
            scores[:, k] += _continuation(body, head, cache, mask, lengths, label, device)
    return scores.cpu()


def _first_token_scores(body: nn.Module, head: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                        lengths: torch.Tensor, labels: Sequence[list[int]], prefix: int,
                        cache: SharedPrefixCache) -> torch.Tensor:
    """Each label's first-token log-probability after each prompt: the right-padded prompts' tokens after
    `prefix` run against `cache`, which holds the prefix."""
    rows, device = ids.shape[0], ids.device
    positions = torch.arange(prefix, ids.shape[1], device=device).expand(rows, -1)
    hidden = body(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True).last_hidden_state
    last = hidden[torch.arange(rows, device=device), lengths - 1 - prefix]
    first = torch.log_softmax(head(last).float(), dim=-1)
    return torch.stack([first[:, label[0]] for label in labels], dim=1)


def _continuation(body: nn.Module, head: nn.Module, cache: SharedPrefixCache, mask: torch.Tensor,
                  lengths: torch.Tensor, label: list[int], device: torch.device) -> torch.Tensor:
    """Log-probability of `label[1:]` given each prompt and `label[0]`: the label's tokens run after the
    (padded) prompts against their cache, which is cut back to the prompts afterwards."""
    rows, extra = mask.shape[0], len(label)
    tokens = torch.tensor(label, device=device).expand(rows, -1)
    positions = lengths[:, None] + torch.arange(extra, device=device)[None, :]
    full_mask = torch.cat([mask, mask.new_ones(rows, extra)], dim=1)
    hidden = body(input_ids=tokens, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                  use_cache=True).last_hidden_state
    cache.crop(-extra)
    logp = torch.log_softmax(head(hidden[:, :-1]).float(), dim=-1)
    return logp.gather(2, tokens[:, 1:, None]).squeeze(2).sum(1)


def scored_labels(forwards: Forwards, prompts: Sequence[list[int]], answers: Sequence[list[int]], *,
                  pad_id: int) -> dict[str, list[int]]:
    """For each prompt, the index of the best label (`answers[k]` are label k's tokens): by mean
    log-probability per token (`"mean"`, the headline) and by summed log-probability (`"summed"`)."""
    scores = label_log_likelihoods(forwards.model, prompts, answers, forwards.batch_size, pad_id, forwards.device,
                                   forwards.autocast, forwards.progress)
    return label_choices(scores, answers)


def label_choices(scores: torch.Tensor, answers: Sequence[list[int]]) -> dict[str, list[int]]:
    """The best label per row of (prompts x labels) summed log-likelihoods: by the mean per token, and by the sum."""
    counts = torch.tensor([len(answer) for answer in answers], dtype=scores.dtype)
    return {"mean": (scores / counts).argmax(dim=1).tolist(), "summed": scores.argmax(dim=1).tolist()}


def length_sensitive(answers: Sequence[list[int]]) -> bool:
    """Whether the labels differ in token count, so that the summed and the per-token choice can differ."""
    return len({len(answer) for answer in answers}) > 1


def scores_ride_on_loss(examples: Sequence[dict], prompts: Sequence[list[int]], answers: Sequence[list[int]]) -> bool:
    """Whether the evaluation loss's forward can score the labels too: every label is one token and every
    example is its prompt followed by at least one answer token."""
    return all(len(answer) == 1 for answer in answers) and len(examples) == len(prompts) and all(
        len(ex["input_ids"]) > len(p) and list(ex["input_ids"][:len(p)]) == list(p) for ex, p in zip(examples, prompts))

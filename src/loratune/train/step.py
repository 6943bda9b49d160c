"""The loss of one batch, as a plain function: what the training loop and evaluation both call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from loratune.batching import checkpointed, decoder_body, shared_prefix_hidden
from loratune.batching.read_rows import only_read_rows
from loratune.recompute import recomputing_saves
from loratune.tasks import IGNORE_INDEX


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str,
               loss_chunk: int = 0, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(mean loss, logits, weight): weight is the number of predicted tokens (or rows) the mean is over.

    With `loss_chunk`, a causal LM's head and loss run that many tokens at a time and logits are None;
    with `prefix`, a causal LM's rows share their first `prefix` tokens, computed once.
    """
    with recomputing_saves():  # a few saved activations kept as the recipe that remakes them (`recompute`)
        return _batch_loss(model, batch, task, loss_chunk, prefix)


def _batch_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str, loss_chunk: int,
                prefix: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"]), logits, batch["labels"].numel()
    if task == "seq2seq":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, out.logits, int((batch["labels"] != IGNORE_INDEX).sum())
    return causal_lm_loss(model, batch, loss_chunk, prefix)


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(body, output head) of a transformers causal LM whose logits are plain `head(body(x))`, else None."""
    body = decoder_body(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    plain = not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))
    return (body, head) if body is not None and head is not None and plain else None


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model reads of a batch: a packed batch (one with `position_ids`) passes no attention mask,
    so transformers keeps attention within each sequence from the restarting position ids (which it reads
    only without a cache: none is built for a loss)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                   loss_chunk: int = 0, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Next-token loss computed only where there are labels (see `head_loss`)."""
    parts = split_lm(model)
    if parts is None:  # the model's own logits, read at the labelled positions
        return head_loss(nn.Identity(), model(**model_inputs(read_part(batch, prefix))).logits, batch["labels"])
    body, head = parts
    return head_loss(head, lm_hidden(body, batch, prefix), batch["labels"], loss_chunk)


def lm_hidden(body: nn.Module, batch: dict[str, torch.Tensor], prefix: int = 0,
              also_read: list[int] | None = None) -> torch.Tensor:
    """The body's last hidden states (B, n, H) of a batch, up to the last position a label reads (`read_part`)
    and, where given, each row's position `also_read[row]`; with `prefix`, its rows' common first tokens
    once. Only those positions' states are computed whole (`read_positions`)."""
    batch = read_part(batch, prefix, also_read)
    read = read_positions(batch, also_read)
    if prefix:
        return shared_prefix_hidden(body, batch["input_ids"], batch["attention_mask"], prefix, read)
    rows = None if read is None or checkpointed(body) else read.flatten().nonzero().flatten()
    with only_read_rows(rows):  # the last MLP where a label reads (`batching.read_rows`)
        return body(**model_inputs(batch)).last_hidden_state


def read_positions(batch: dict[str, torch.Tensor], also_read: list[int] | None = None) -> torch.Tensor | None:
    """(B, L) True where a label reads the output at that input position, at `also_read[row]`, and along a row
    without labels, padding left out; None for a batch without token labels."""
    labels, width = batch.get("labels"), batch["input_ids"].shape[1]
    if labels is None or labels.dim() != 2 or labels.shape[1] < width:
        return None
    read = torch.zeros(labels.shape[0], width, dtype=torch.bool, device=labels.device)
    labelled = labels[:, 1:width + 1] != IGNORE_INDEX  # (the last position of an untrimmed row predicts nothing)
    read[:, :labelled.shape[1]] = labelled
    if also_read is not None:
        read[torch.arange(len(also_read), device=read.device), torch.tensor(also_read, device=read.device)] = True
    read |= ~read.any(1, keepdim=True)
    return read & batch["attention_mask"].bool() if "attention_mask" in batch else read


def read_part(batch: dict[str, torch.Tensor], prefix: int = 0,
              also_read: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The batch without the tokens after the last position whose output a label reads (or the caller, at
    `also_read[row]`), row by row (at least `prefix` + 1 tokens each, so a shared prefix stays shared).

    A causal model's state at a position depends on no later token, and a token's own output is read only
    where the next token is a label: so the tokens after a row's last such position change nothing the loss
    or label scoring reads. With answer-only labels that is each row's final token (its end-of-turn), 2.6%
    of the demo's tokens. The trimmed tokens become padding: dropped from packed and shared-prefix rows, and
    columns no row keeps are cut. A packed batch (position ids, no mask) loses only such columns; a row
    without labels stays whole (label scoring reads its prompt's last position)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or labels.shape != batch["input_ids"].shape or labels.shape[1] < 2:
        return batch
    width = labels.shape[1]
    read = labels[:, 1:] != IGNORE_INDEX  # position t's output is read where token t + 1 is a label
    last = torch.where(read, torch.arange(width - 1, device=read.device), -1).amax(1)
    keep = torch.where(last >= 0, last + 1, width).clamp(min=prefix + 1)  # tokens each row keeps
    if also_read is not None:
        keep = torch.maximum(keep, torch.tensor(also_read, device=keep.device) + 1)
    trimmed, kept = dict(batch), min(int(keep.max()), width)
    if "attention_mask" in batch and "position_ids" not in batch:  # (a packed batch's model reads no mask)
        mask = batch["attention_mask"]
        trimmed["attention_mask"] = mask * (torch.arange(width, device=mask.device) < keep[:, None])
    for key in ("input_ids", "attention_mask", "position_ids"):
        if key in trimmed:
            trimmed[key] = trimmed[key][:, :kept]
    return trimmed


def head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
              loss_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(mean next-token loss, logits or None, weight) from the body's hidden states.

    The output head runs on the gathered labelled positions alone: with answer-only loss that is a few
    tokens per row instead of the whole sequence times the vocabulary, in time and in memory. With
    `loss_chunk` it runs that many positions at a time and the logits are None. `hidden` may stop before
    the labels do (`read_part`): where it stops, no later position is labelled.
    """
    targets = labels[:, 1:hidden.shape[1] + 1]
    mask = targets != IGNORE_INDEX
    weight = int(mask.sum())
    hidden = hidden[:, :targets.shape[1]]
    if loss_chunk:
        loss = chunked_head_loss(head, hidden[mask], targets[mask], loss_chunk)
        return loss / max(weight, 1), None, weight
    logits = head(hidden[mask])
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum") / max(weight, 1), logits, weight


def chunked_head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)`, `chunk` rows at a time, so at most one chunk of logits exists.

    A frozen `nn.Linear` head (the usual LoRA case) gets its input gradient computed chunk by chunk during
    the forward, which costs no extra work; a head that trains drops each chunk's logits after its forward
    and recomputes them in backward (one more head forward). `targets` are class indices: positions
    without a label are dropped before this is called.
    """
    if hidden.shape[0] == 0:  # no labelled token: a zero that still has a graph, like the unchunked loss
        return _head_loss(head, hidden, targets)
    training = torch.is_grad_enabled()
    if training and hidden.requires_grad and _frozen_linear(head):
        return _FrozenHeadLoss.apply(hidden, head.weight, head.bias, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        rows, labels = hidden[start:start + chunk], targets[start:start + chunk]
        loss = checkpoint(_head_loss, head, rows, labels, use_reentrant=False) if training else \
            _head_loss(head, rows, labels)  # evaluation: nothing to recompute
        total = total + loss
    return total


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _frozen_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


class _FrozenHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ W^T + b` against `targets`, for a head that does not train: the
    gradient with respect to `hidden`, softmax @ W - W[target], is computed per chunk of rows in forward
    and kept, so backward only scales it; each chunk reads W once (`_softmax_pass`)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            loss, grad = _softmax_pass(hidden[start:start + chunk], weight, bias, targets[start:start + chunk])
            total += loss
            grad_hidden[start:start + chunk] = grad
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_total.float()).to(grad_hidden.dtype), None, None, None, None


#: Output-head rows per block of `_softmax_pass` (49152-token vocabulary, 16 rows of 576, 2-core AVX2 CPU, one
#: process alternating: the head's loss and gradient 45.5 ms reading W twice, 32.8 / 35.4 / 37.1 ms reading it
#: once in blocks of 1024 / 2048 / 4096 rows)
VOCAB_BLOCK = 1024


def _softmax_pass(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, its gradient with respect to `rows`) of the logits `rows @ W^T + b`, reading W once:
    a running softmax over blocks of the vocabulary (each block's exponentials rescaled when a later block
    raises a row's maximum) accumulates softmax @ W while the block is in cache. The logits of a whole chunk
    are never held, and W is not read a second time for the gradient."""
    rows_n, vocabulary = rows.shape[0], weight.shape[0]
    step = VOCAB_BLOCK if weight.device.type == "cpu" else vocabulary  # (a GPU's one product is not memory-bound)
    peak = rows.new_full((rows_n, 1), -torch.inf, dtype=torch.float32)
    norm = rows.new_zeros((rows_n, 1), dtype=torch.float32)
    weighted = rows.new_zeros((rows_n, weight.shape[1]), dtype=torch.float32)
    target = rows.new_zeros(rows_n, dtype=torch.float32)
    for start in range(0, vocabulary, step):
        block = weight[start:start + step]
        logits = F.linear(rows, block, None if bias is None else bias[start:start + step]).float()
        here = labels - start
        inside = (here >= 0) & (here < block.shape[0])
        target += torch.where(inside, logits.gather(1, here.clamp(0, block.shape[0] - 1)[:, None])[:, 0], 0)
        # (a finite floor: a block whose logits are all -inf, say masked by the bias, must not make -inf - -inf)
        new_peak = torch.maximum(peak, logits.amax(1, keepdim=True)).clamp_(min=torch.finfo(torch.float32).min)
        rescale = (peak - new_peak).exp_()  # (0 on the first block)
        probs = logits.sub_(new_peak).exp_()
        norm.mul_(rescale).add_(probs.sum(1, keepdim=True))
        weighted.mul_(rescale).add_(probs.to(block.dtype) @ block)
        peak = new_peak
    loss = (peak + norm.log())[:, 0] - target
    grad = weighted.div_(norm).sub_(weight[labels].float())
    return loss.sum(), grad.to(rows.dtype)

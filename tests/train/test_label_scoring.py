"""Label scoring: exact log-likelihoods of each label after each prompt, and the answer greedy decoding gives."""

import json

import pytest
import torch
from tiny_models import llama

from loratune.batching import BatchMaker
from loratune.core.adapters import add_adapter
from loratune.core.errors import ConfigError
from loratune.core.lora_config import LoraConfig
from loratune.tasks import IGNORE_INDEX
from loratune.train.evaluate import Forwards, loss_totals
from loratune.train.label_scoring import (
    label_choices,
    label_log_likelihoods,
    length_sensitive,
    scored_labels,
    scores_ride_on_loss,
)
from loratune.train.loop import fit
from loratune.train.run_config import validate_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    model = llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def prompts(count, shared=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 60, (shared,), generator=generator).tolist()
    return [head + torch.randint(3, 60, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, 9, (count,), generator=generator)]


@torch.no_grad()
def reference(model, prompt, label):
    """log p(label | prompt) from one plain forward of prompt + label."""
    ids = torch.tensor([prompt + label])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(prompt) - 1 + j, token].item() for j, token in enumerate(label))


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "plain"])
def test_scores_equal_a_reference_computation_for_labels_of_one_or_more_tokens(model, share_prefix):
    labels = [[7], [9, 11], [13, 4, 5]]
    batch = prompts(7)
    scores = label_log_likelihoods(model, batch, labels, batch_size=3, pad_id=0, device=CPU,
                                   share_prefix=share_prefix)
    expected = torch.tensor([[reference(model, p, label) for label in labels] for p in batch])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=2e-5)


def test_the_scored_label_is_the_one_greedy_generation_writes(model):
    batch = prompts(24, seed=1)
    greedy = []
    for prompt in batch:
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=1, do_sample=False, pad_token_id=0)
        greedy.append(out[0, -1].item())
    names = sorted(set(greedy))  # every prompt's greedy answer is exactly one of these single-token labels
    assert len(names) >= 2
    chosen = scored_labels(Forwards(model, CPU, batch_size=5), batch, [[t] for t in names], pad_id=0)
    assert chosen["mean"] == chosen["summed"] == [names.index(t) for t in greedy]


def test_a_run_reports_scored_accuracy_and_generation_accuracy_only_when_asked(run_config):
    plain = fit(validate_config(run_config(train={"max_steps": 1}), "test"), quiet=True)
    assert {"accuracy", "macro_f1"} <= set(plain["after"]) and "generation_accuracy" not in plain["after"]
    assert plain["samples_after"][0]["output"] in ("negative", "positive")
    both = fit(validate_config(run_config(train={"max_steps": 1, "generation_eval": True},
                                          output_dir=str(plain["adapter_dir"]) + "-both"), "test"), quiet=True)
    assert {"accuracy", "generation_accuracy", "generation_macro_f1"} <= set(both["after"])
    assert both["after"]["accuracy"] == plain["after"]["accuracy"]
    assert both["after"]["loss"] == plain["after"]["loss"]


def test_a_head_label_scoring_cannot_read_has_its_labels_generated_instead(run_config, monkeypatch):
    """Gemma 2's logit soft-capping (or a logit scale) leaves no plain head to score labels with: the run
    generates the answers and reports their accuracy, rather than failing."""
    from loratune.train import session

    monkeypatch.setattr(session, "split_lm", lambda model: None)
    summary = fit(validate_config(run_config(train={"max_steps": 1}), "test"), quiet=True)
    assert {"accuracy", "macro_f1"} <= set(summary["after"]) and "generation_accuracy" not in summary["after"]
    assert summary["samples_after"]


def test_the_label_scoring_key_is_gone_and_classification_does_not_generate(run_config, tiny_bert):
    with pytest.raises(ConfigError, match="train.label_scoring"):
        validate_config(run_config(train={"label_scoring": False}), "test")
    with pytest.raises(ConfigError, match="train.generation_eval: a classification model does not generate"):
        validate_config(run_config(model={"name": tiny_bert, "task": "classification"},
                                   train={"generation_eval": True}), "test")


@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "plain"])
def test_single_token_labels_score_exactly_without_growing_the_cache(model, share_prefix):
    """With one-token labels no continuation needs the prompts' keys and values, so no layer keeps them: each
    layer's cache holds at most the shared prefix after it ran (the rest is freed layer by layer)."""
    labels = [[7], [9], [13]]
    batch = prompts(7)
    kept = []

    def after_layer(module, args, kwargs, output):
        cache = kwargs.get("past_key_values")
        layer = cache.layers[module.self_attn.layer_idx] if cache is not None else None
        kept.append(layer.keys.shape[-2] if layer is not None and layer.is_initialized else 0)

    hooks = [layer.register_forward_hook(after_layer, with_kwargs=True) for layer in model.model.layers]
    try:
        scores = label_log_likelihoods(model, batch, labels, batch_size=7, pad_id=0, device=CPU,
                                       share_prefix=share_prefix)
    finally:
        for hook in hooks:
            hook.remove()
    expected = torch.tensor([[reference(model, p, label) for label in labels] for p in batch])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=2e-5)
    prefix = 12 if share_prefix else 0  # prompts() share their first 12 tokens
    layers = len(model.model.layers)
    assert kept[-layers:] == [prefix] * layers  # the last forward: the rows' own tokens


def answered(batch, answers, end=2):
    """Examples as the formatter builds them: prompt + answer + end token, loss on the answer only."""
    return [{"input_ids": p + a + [end], "labels": [IGNORE_INDEX] * len(p) + a + [end]} for p, a in zip(batch, answers)]


@torch.no_grad()
def summed_answer_loss(model, examples):
    """Each example alone through a plain forward: the summed cross-entropy of its labelled tokens."""
    total = 0.0
    for example in examples:
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
        targets = torch.tensor(example["labels"][1:])
        keep = targets != IGNORE_INDEX
        total += torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum").item()
    return total


@pytest.mark.parametrize("batching", ["shared_prefix", "padded"])
def test_one_pass_gives_the_loss_and_the_labels_of_two_passes(model, batching):
    batch = prompts(11, seed=2)
    labels = [[7], [9], [13]]
    examples = answered(batch, [labels[i % 3] for i in range(len(batch))])
    assert scores_ride_on_loss(examples, batch, labels)
    forwards = Forwards(model, CPU, batch_size=4)
    totals = loss_totals(forwards, examples, BatchMaker(batching, "causal-lm", 0), task="causal-lm", prompts=batch,
                         label_tokens=[7, 9, 13])
    assert totals.weight == 2 * len(batch)  # the answer token and the end token of each example
    assert totals.loss == pytest.approx(summed_answer_loss(model, examples), rel=1e-5)
    scores = label_log_likelihoods(model, batch, labels, batch_size=4, pad_id=0, device=CPU)
    assert len(set(scores.argmax(1).tolist())) >= 2  # the check below compares more than one answer
    assert totals.chosen == scored_labels(forwards, batch, labels, pad_id=0)["mean"]
    plain = loss_totals(forwards, examples, BatchMaker(batching, "causal-lm", 0), task="causal-lm")
    assert plain.loss == pytest.approx(totals.loss, rel=1e-6) and plain.chosen == []


def test_only_one_token_labels_after_the_very_prompt_ride_on_the_loss():
    batch = prompts(3)
    examples = answered(batch, [[7]] * 3)
    assert not scores_ride_on_loss(examples, batch, [[7], [9, 11]])  # a continuation needs its own forward
    assert not scores_ride_on_loss(examples, [p[1:] for p in batch], [[7], [9]])  # prompt cut differently
    assert not scores_ride_on_loss([{"input_ids": p, "labels": p} for p in batch], batch, [[7], [9]])  # no answer
    assert not scores_ride_on_loss(examples[:2], batch, [[7], [9]])


@pytest.mark.parametrize("batching", ["padded", "packed", "shared_prefix"])
def test_a_run_scores_one_token_labels_in_the_loss_pass_as_two_passes_would(run_config, monkeypatch, batching):
    from loratune.train import session

    def config(suffix):
        return validate_config(run_config(train={"max_steps": 1, "batching": batching},
                                          output_dir=str(run_config()["output_dir"]) + suffix), "test")

    monkeypatch.setattr(session, "scores_ride_on_loss", lambda *args: False)
    two_passes = fit(config("-two"), quiet=True)
    monkeypatch.undo()

    def second_pass(*args, **kwargs):
        raise AssertionError("the labels were scored by a second pass")

    monkeypatch.setattr(session, "scored_labels", second_pass)
    one_pass = fit(config("-one"), quiet=True)
    for phase in ("before", "after"):
        assert one_pass[phase]["accuracy"] == two_passes[phase]["accuracy"]
        assert one_pass[phase]["loss"] == pytest.approx(two_passes[phase]["loss"], rel=1e-5)


def test_a_longer_correct_label_wins_per_token_where_the_sum_picks_the_short_one():
    """Every token of the three-token label is likelier than the one-token label's token (the head adds 2 to
    their logits), yet its summed log-probability is lower: three tokens' worth. The headline choice (mean per
    token) picks the long label for every prompt; the summed choice, reported beside it, the short one."""
    model = llama()
    short, long = [5], [20, 21, 22]
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[long] = 2.0
    model.lm_head = head
    batch = prompts(9, seed=3)
    scores = label_log_likelihoods(model, batch, [short, long], batch_size=4, pad_id=0, device=CPU)
    expected = torch.tensor([[reference(model, p, label) for label in (short, long)] for p in batch])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=2e-5)
    assert (expected[:, 1] / 3 > expected[:, 0]).all() and (expected[:, 1] < expected[:, 0]).all()
    chosen = label_choices(scores, [short, long])
    assert chosen["mean"] == [1] * len(batch)  # the long label
    assert chosen["summed"] == [0] * len(batch)  # the short one
    assert length_sensitive([short, long]) and not length_sensitive([[5], [6]])


def test_a_run_with_labels_of_different_lengths_reports_both_accuracies(run_config, tmp_path):
    rows = [{"text": "the good movie", "label": "great film"}, {"text": "the bad movie", "label": "bad"}] * 8
    path = tmp_path / "two-lengths.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    summary = fit(validate_config(run_config(data={"train": str(path)}, train={"max_steps": 1}), "test"), quiet=True)
    for phase in ("before", "after"):
        assert {"accuracy", "accuracy_summed"} <= set(summary[phase])
        assert 0.0 <= summary[phase]["accuracy_summed"] <= 1.0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| accuracy_summed |" in report

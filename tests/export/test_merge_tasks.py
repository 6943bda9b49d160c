"""Issue 27: a classification adapter (BERT with a LoRA and its own classifier head) merges and exports onto its
base: the task and the label count come from the adapter, and the merged model equals PEFT's merge."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import loratune as lt
from loratune.cli import main

LABELS = 3  # the base's head has 2: the merged model must take the adapter's


@pytest.fixture(scope="module")
def classifier_adapter(tiny_bert, tmp_path_factory):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=LABELS,
                                                               ignore_mismatched_sizes=True)
    lt.add_adapter(model, lt.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                                        modules_to_save=["classifier"], init_lora_weights=False))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("seq-cls") / "adapter"
    lt.save_adapter(model, folder)
    return folder


def peft_merged_logits(tiny_bert, adapter, ids) -> torch.Tensor:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=LABELS,
                                                              ignore_mismatched_sizes=True)
    merged = peft.PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    return merged(input_ids=ids).logits


@pytest.mark.parametrize("argv", [["merge", "--model", "{model}", "--adapter", "{adapter}", "--out", "{out}"],
                                  ["export", "{adapter}", "--model", "{model}", "--format", "safetensors",
                                   "--out", "{out}"]])
def test_a_classification_adapter_merges_onto_its_base(tiny_bert, classifier_adapter, tmp_path, argv):
    out = tmp_path / "merged"
    values = {"{model}": tiny_bert, "{adapter}": str(classifier_adapter), "{out}": str(out)}
    assert main([values.get(word, word) for word in argv]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == LABELS
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = torch.tensor([[4, 8, 9, 12, 5], [4, 20, 21, 22, 5]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, peft_merged_logits(tiny_bert, classifier_adapter, ids),
                              atol=1e-5)


def test_a_task_that_disagrees_with_the_adapter_is_one_line(tiny_bert, classifier_adapter, tmp_path, capsys):
    capsys.readouterr()
    assert main(["merge", "--model", tiny_bert, "--adapter", str(classifier_adapter), "--out", str(tmp_path / "m"),
                 "--task", "causal-lm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task_type SEQ_CLS" in err and not (tmp_path / "m").exists(), err

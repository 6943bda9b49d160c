"""Adapter management on whole models: inject, merge/unmerge/unload, disable, train, several adapters, mix."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from tiny_models import TokenNet, assert_unchanged, input_ids, logits, max_diff, snapshot, token_ids
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune import (
    AdapterNameError,
    ConfigError,
    LoraConfig,
    MergeError,
    TargetError,
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapters,
    merge,
    mixed_adapter_batch,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge,
)
from loratune.core.adapters import find_targets, lora_layers
from loratune.core.layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave

FAMILIES = ["gpt2", "llama", "bert", "t5", "opt"]


def _lora_paths(model: nn.Module) -> set[str]:
    return {path for path, _ in lora_layers(model)}


# --- outputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_default_init_leaves_outputs_unchanged(family):
    model = tm.BUILDERS[family]()
    base = logits(model)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear"))
    assert len(_lora_paths(model)) >= 8
    assert max_diff(logits(model), base) <= 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_unload_agree(family):
    model = tm.BUILDERS[family]()
    base = logits(model)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapted = logits(model)
    assert max_diff(adapted, base) > 1e-3  # the adapter really changes the outputs
    with disable_adapters(model):
        assert max_diff(logits(model), base) <= 1e-6
    merge(model)
    assert max_diff(logits(model), adapted) <= 1e-5
    with disable_adapters(model):  # unmerges for the block, merges back after
        assert max_diff(logits(model), base) <= 1e-5
    assert max_diff(logits(model), adapted) <= 1e-5
    unmerge(model)
    assert max_diff(logits(model), adapted) <= 1e-5
    plain = unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert max_diff(logits(plain), adapted) <= 1e-5


def test_unload_without_merge_gives_base_model():
    model = tm.llama()
    originals = dict(model.named_modules())
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    merge(model)
    plain = unload(model, merge=False)
    assert max_diff(logits(plain), base) <= 1e-5
    assert plain.model.layers[0].self_attn.q_proj is originals["model.layers.0.self_attn.q_proj"]


def test_dora_model_merge_and_unload():
    model = tm.gpt2()
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], use_dora=True, init_lora_weights=False))
    layer = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].mul_(1.2)
    adapted = logits(model)
    merge(model)
    assert max_diff(logits(model), adapted) <= 1e-5
    unmerge(model)
    assert max_diff(logits(model), adapted) <= 1e-5
    assert max_diff(logits(unload(model)), adapted) <= 1e-5


# --- training ------------------------------------------------------------------------------------------------
def _train(model: nn.Module, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = input_ids()
    labels = torch.tensor([0, 2])
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_training_changes_only_adapter_saved_modules_and_chosen_biases(bias):
    model = tm.bert_classifier()
    config = LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"], bias=bias)
    add_adapter(model, config)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    _train(model)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert changed == trainable  # everything trainable moved, nothing else did

    adapter = {k for k in before if ".lora_" in k or "classifier.modules_to_save.default." in k}
    lora_b = {k for k in adapter if "lora_B" in k}
    assert lora_b and lora_b <= changed
    expected = set(adapter)
    if bias == "all":
        expected |= {k for k in before if k.endswith(".bias") and "lora_" not in k and "classifier." not in k}
    elif bias == "lora_only":
        expected |= {k for k in before if k.endswith(".base_layer.bias")}
    assert trainable == expected
    assert "classifier.original_module.weight" not in changed and "classifier.original_module.bias" not in changed
    if bias != "none":
        assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in changed
    if bias == "all":
        assert "bert.embeddings.LayerNorm.bias" in changed
    assert "bert.encoder.layer.0.attention.self.query.base_layer.weight" not in changed


def test_trainable_parameter_count():
    model = tm.llama()
    total = sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    count = trainable_parameters(model)
    # q_proj is 16 -> 16 in each of 2 layers: A (2 x 16) + B (16 x 2)
    assert count.trainable == 2 * (2 * 16 + 16 * 2)
    assert count.total == total + count.trainable
    assert "trainable 128 of" in str(count)


# --- choosing targets ----------------------------------------------------------------------------------------
def test_target_list_matches_exact_name_or_dot_suffix():
    model = tm.llama()
    targets = find_targets(model, LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert set(targets) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.mlp.up_proj"}
    with pytest.raises(TargetError):  # "proj" is not a whole name component
        find_targets(model, LoraConfig(target_modules=["proj"]))


def test_target_regex_fullmatches_path():
    model = tm.llama()
    targets = find_targets(model, LoraConfig(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert set(targets) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}
    with pytest.raises(TargetError):  # fullmatch, not search
        find_targets(model, LoraConfig(target_modules=r"q_proj"))


@pytest.mark.parametrize("family, head", [("gpt2", "lm_head"), ("llama", "lm_head"), ("t5", "lm_head"),
                                          ("opt", "lm_head")])
def test_all_linear_excludes_output_head(family, head):
    model = tm.BUILDERS[family]()
    targets = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert head not in targets
    linear = {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    assert set(targets) == linear - {head}


def test_all_linear_skips_modules_to_save_and_is_saved_as_names():
    model = tm.bert_classifier()
    add_adapter(model, LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert isinstance(model.classifier, ModulesToSave)
    names = model.lora_configs["default"].target_modules
    assert len(names) == 2 * 6 + 1 and "bert.pooler.dense" in names and "classifier" not in names
    assert "bert.encoder.layer.1.attention.self.query" in names


def test_exclude_modules():
    model = tm.llama()
    targets = find_targets(model, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "mlp.up_proj"]))
    assert not any(p.endswith(("o_proj", "up_proj")) for p in targets)
    assert "model.layers.0.mlp.gate_proj" in targets
    targets = find_targets(model, LoraConfig(target_modules=["q_proj", "k_proj"], exclude_modules=r".*0\..*"))
    assert set(targets) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"}


def test_layers_to_transform():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]))
    assert _lora_paths(model) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    model = tm.gpt2()
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn"], layers_to_transform=0, layers_pattern="h"))
    assert _lora_paths(model) == {"transformer.h.0.attn.c_attn"}


def test_rank_and_alpha_pattern_per_module():
    model = tm.llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 1, r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3})
    add_adapter(model, config)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert attn0.q_proj.rank("default") == 4 and attn0.q_proj.scaling["default"] == 2.0
    assert attn1.q_proj.rank("default") == 2 and attn1.q_proj.scaling["default"] == 4.0
    assert attn0.v_proj.rank("default") == 1 and attn0.v_proj.scaling["default"] == 3.0


def test_rslora_scaling_in_layers():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(4.0)


def test_pissa_model_outputs_unchanged_at_step_zero():
    model = tm.llama()
    base = logits(model)
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa"))
    assert max_diff(logits(model), base) <= 1e-4
    residual = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert max_diff(residual, original) > 1e-2  # the base holds the residual now
    with disable_adapters(model):
        assert max_diff(logits(model), base) > 1e-3


def test_gaussian_init_outputs_unchanged():
    model = tm.opt()
    base = logits(model)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    assert torch.equal(logits(model), base)


def test_embedding_target():
    model = tm.llama()
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    assert isinstance(model.model.embed_tokens, LoraEmbedding)
    adapted = logits(model)
    assert max_diff(adapted, base) > 1e-3
    merge(model)
    assert max_diff(logits(model), adapted) <= 1e-5


# --- several adapters ----------------------------------------------------------------------------------------
def test_second_adapter_is_added_inactive_and_names_do_not_matter():
    model = TokenNet()
    ids = token_ids()
    add_adapter(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), name="first")
    out_first = model(ids).detach()
    other = TokenNet()
    add_adapter(other, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), name="renamed")
    assert torch.equal(other(ids), out_first)  # same seed, same init: the name plays no part
    torch.manual_seed(5)
    add_adapter(model, LoraConfig(r=3, target_modules=["proj", "mix"], init_lora_weights=False), name="second")
    assert active_adapters(model) == ["first"]
    assert torch.equal(model(ids), out_first)
    assert model.proj.lora_A["second"].weight.requires_grad and not model.proj.lora_A["first"].weight.requires_grad


def test_two_active_adapters_add_their_deltas():
    model = TokenNet()
    ids = token_ids()
    base = model(ids).detach()
    config = LoraConfig(r=2, target_modules=["proj", "mix", "head", "emb"], init_lora_weights=False)
    add_adapter(model, config, name="a")
    torch.manual_seed(1)
    add_adapter(model, LoraConfig(r=3, lora_alpha=5, target_modules=["head", "mix"], init_lora_weights=False),
                name="b")
    weights = {n: getattr(model, n).base_layer.weight.detach().clone() for n in ("proj", "mix", "head", "emb")}
    set_active_adapters(model, ["a", "b"])
    both = model(ids).detach()
    assert max_diff(both, base) > 1e-3
    merge(model)
    for name, weight in weights.items():
        layer = getattr(model, name)
        expected = weight + layer.delta_weight("a") + (layer.delta_weight("b") if "b" in layer.scaling else 0)
        assert max_diff(layer.base_layer.weight, expected) <= 1e-6
    assert max_diff(model(ids), both) <= 1e-5
    unmerge(model)

    # with only the (linear) head adapted, the outputs themselves add up
    head_only = TokenNet()
    add_adapter(head_only, LoraConfig(r=2, target_modules=["head"], init_lora_weights=False), name="a")
    torch.manual_seed(2)
    add_adapter(head_only, LoraConfig(r=3, target_modules=["head"], init_lora_weights=False), name="b")
    plain = TokenNet()(ids).detach()
    out = {}
    for names in (["a"], ["b"], ["a", "b"]):
        set_active_adapters(head_only, names)
        out[tuple(names)] = head_only(ids).detach()
    manual = plain + (out[("a",)] - plain) + (out[("b",)] - plain)
    assert max_diff(out[("a", "b")], manual) <= 1e-5


def test_delete_adapter_restores_outputs_and_original_modules():
    model = tm.gpt2()
    originals = dict(model.named_modules())
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False), name="a")
    out_a = logits(model)
    torch.manual_seed(3)
    add_adapter(model, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], init_lora_weights=False), name="b")
    set_active_adapters(model, ["a", "b"])
    merge(model, ["b"])
    delete_adapter(model, "b")
    assert active_adapters(model) == ["a"]
    assert max_diff(logits(model), out_a) <= 1e-5
    assert "transformer.h.0.attn.c_proj" not in _lora_paths(model)  # left with no adapter: unwrapped
    assert model.transformer.h[0].attn.c_proj is originals["transformer.h.0.attn.c_proj"]
    merge(model, ["a"])
    delete_adapter(model, "a")
    assert max_diff(logits(model), base) <= 1e-5
    assert {p: type(m) for p, m in model.named_modules()} == {p: type(m) for p, m in originals.items()}
    for path, module in model.named_modules():
        assert module is originals[path], path


def test_delete_keeps_other_merged_adapters_merged():
    model = TokenNet()
    ids = token_ids()
    add_adapter(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), name="a")
    torch.manual_seed(4)
    add_adapter(model, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False), name="b")
    out_a = model(ids).detach()
    set_active_adapters(model, ["a", "b"])
    merge(model)
    delete_adapter(model, "b")
    assert model.proj.merged == ["a"]
    assert max_diff(model(ids), out_a) <= 1e-5
    unmerge(model)
    assert max_diff(model(ids), out_a) <= 1e-5


# --- mixed batches -------------------------------------------------------------------------------------------
def _three_adapters(model: nn.Module, targets: list[str]) -> list[str]:
    names = ["x", "y", "z"]
    for i, name in enumerate(names):
        torch.manual_seed(10 + i)
        add_adapter(model, LoraConfig(r=1 + i, lora_alpha=2, target_modules=targets, init_lora_weights=False), name)
    return names


@pytest.mark.parametrize("targets", [["proj"], ["mix"], ["emb"], ["emb", "proj", "mix", "head"]])
def test_mixed_batch_rows_equal_single_adapter_runs(targets):
    model = TokenNet()
    ids = token_ids(batch=5)
    base = model(ids).detach()
    _three_adapters(model, targets)
    rows = ["y", None, "x", "z", "y"]
    with mixed_adapter_batch(model, rows):
        mixed = model(ids).detach()
    for i, name in enumerate(rows):
        if name is None:
            expected = base[i]
        else:
            set_active_adapters(model, [name])
            expected = model(ids[i:i + 1])[0].detach()
        assert max_diff(mixed[i], expected) <= 1e-5, (i, name)
    assert max_diff(mixed[0], base[0]) > 1e-4
    assert all(layer.row_plan is None for _, layer in lora_layers(model))


def test_mixed_batch_gpt2_eight_rows_eight_adapters():
    model = tm.gpt2()
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        add_adapter(model, LoraConfig(r=1 + i % 3, target_modules=["c_attn", "c_fc", "wte"], init_lora_weights=False),
                    name)
    ids = input_ids(batch=8)
    with mixed_adapter_batch(model, names):
        mixed = logits(model, ids)
    for i, name in enumerate(names):
        set_active_adapters(model, [name])
        assert max_diff(mixed[i], logits(model, ids[i:i + 1])[0]) <= 1e-5, name
    assert max_diff(mixed[0], mixed[1]) > 1e-3


def test_mixed_batch_refuses_dora_and_merged():
    model = TokenNet()
    add_adapter(model, LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    with pytest.raises(TargetError, match="DoRA"):
        with mixed_adapter_batch(model, ["default"]):
            pass
    model = TokenNet()
    add_adapter(model, LoraConfig(r=2, target_modules=["proj"]))
    merge(model)
    with pytest.raises(MergeError, match="unmerge"):
        with mixed_adapter_batch(model, ["default"]):
            pass


# --- weighted combinations -----------------------------------------------------------------------------------
def _two_for_combining():
    model = TokenNet()
    torch.manual_seed(7)
    add_adapter(model, LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "mix", "emb"], init_lora_weights=False),
                name="a")
    torch.manual_seed(8)
    add_adapter(model, LoraConfig(r=3, lora_alpha=2, target_modules=["proj", "mix"], init_lora_weights=False,
                                  use_rslora=True, rank_pattern={"mix": 1}), name="b")
    return model


def test_weighted_adapter_cat_is_exact_weighted_sum():
    model = _two_for_combining()
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "ab")
    for name in ("proj", "mix", "emb"):
        layer = getattr(model, name)
        expected = 0.7 * layer.delta_weight("a")
        if "b" in layer.scaling:
            expected = expected - 1.3 * layer.delta_weight("b")
        assert layer.rank("ab") == 5
        assert max_diff(layer.delta_weight("ab"), expected) <= 1e-5
        assert layer.delta_weight("ab").abs().max() > 1e-2
    ids = token_ids()
    set_active_adapters(model, ["ab"])
    combined = model(ids).detach()
    set_active_adapters(model, ["a"])
    assert max_diff(model(ids), combined) > 1e-4


def test_weighted_adapter_svd_is_best_rank_k():
    model = _two_for_combining()
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "svd2", combination_type="svd", svd_rank=2)
    layer = model.proj
    target = layer.delta_weight("a") + 0.5 * layer.delta_weight("b")
    u, s, vh = torch.linalg.svd(target)
    best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    assert layer.rank("svd2") == 2
    assert max_diff(layer.delta_weight("svd2"), best) <= 1e-5
    assert max_diff(layer.delta_weight("svd2"), target) > 1e-3  # rank 2 cannot hold a rank-5 update


def test_weighted_adapter_bad_input():
    model = _two_for_combining()
    before = snapshot(model)
    with pytest.raises(AdapterNameError, match="unknown adapter 'nope'"):
        add_weighted_adapter(model, ["a", "nope"], [1, 1], "c")
    with pytest.raises(AdapterNameError, match="already taken"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "b")
    with pytest.raises(AdapterNameError, match="one weight per adapter"):
        add_weighted_adapter(model, ["a", "b"], [1], "c")
    assert_unchanged(model, before)


# --- merging refusals ----------------------------------------------------------------------------------------
def test_safe_merge_with_non_finite_adapter_changes_nothing():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():  # a late layer, so earlier layers merge before the failure is found
        model.model.layers[1].mlp.down_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(MergeError, match="non-finite") as info:
        merge(model, safe=True)
    assert "\n" not in str(info.value)
    assert_unchanged(model, before)
    assert all(not layer.merged for _, layer in lora_layers(model))


def test_safe_merge_catches_overflow_in_a_half_precision_weight():
    model = tm.llama().to(torch.float16)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():  # finite in fp32, infinite once cast to fp16 (max 65504)
        for _, layer in lora_layers(model):
            layer.lora_A["default"].weight.fill_(100.0)
            layer.lora_B["default"].weight.fill_(1000.0)
    before = snapshot(model)
    with pytest.raises(MergeError, match="non-finite"):
        merge(model, safe=True)
    assert_unchanged(model, before)


def test_merging_tied_embedding_is_refused():
    model = tm.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    add_adapter(model, LoraConfig(r=2, target_modules=["wte", "c_attn"], init_lora_weights=False))
    before = snapshot(model)
    with pytest.raises(MergeError, match=r"cannot merge into 'transformer.wte'.*tied to 'lm_head.weight'"):
        merge(model)
    assert_unchanged(model, before)
    assert all(not layer.merged for _, layer in lora_layers(model))


# --- bad input leaves the model as it was --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"target_modules": ["q_prj"]}, TargetError, r"matched no module; closest names: .*q_proj"),
    ({"target_modules": ["self_attn"]}, TargetError, r"'model.layers.0.self_attn' is a LlamaAttention"),
    ({"target_modules": ["norm"]}, TargetError, r"'model.norm' is a LlamaRMSNorm"),
    ({"target_modules": ["q_proj"], "r": 17}, TargetError, r"r=17 is larger than layer .*in=16, out=16"),
    ({"target_modules": ["k_proj"], "r": 9, "init_lora_weights": "pissa"}, TargetError, r"r=9 is larger.*out=8"),
    ({"target_modules": ["k_proj"], "rank_pattern": {"k_proj": 17}}, TargetError, r"r=17 is larger.*out=8"),
    ({"target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": "pissa"}, TargetError, "pissa"),
    ({"target_modules": ["embed_tokens"], "use_dora": True}, TargetError, "use_dora supports"),
    ({"target_modules": ["q_proj"], "modules_to_save": ["head"]}, TargetError, r"modules_to_save \['head'\]"),
])
def test_bad_targets_raise_and_change_nothing(kwargs, error, fragment):
    model = tm.llama()
    before = snapshot(model)
    with pytest.raises(error, match=fragment) as info:
        add_adapter(model, LoraConfig(**kwargs))
    assert "\n" not in str(info.value)
    assert_unchanged(model, before)


def test_bad_second_adapter_leaves_first_intact():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    before = snapshot(model)
    for config in (LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="pissa"),
                   LoraConfig(r=2, target_modules=["nothing_here"])):
        with pytest.raises(TargetError):
            add_adapter(model, config, name="second")
    with pytest.raises(AdapterNameError, match="adapter name 'default' is already taken"):
        add_adapter(model, LoraConfig(r=2, target_modules=["v_proj"]))
    assert_unchanged(model, before)
    assert list(model.lora_configs) == ["default"]


def test_unknown_adapter_names():
    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    before = snapshot(model)
    for call in (lambda: delete_adapter(model, "other"), lambda: merge(model, "other"),
                 lambda: set_active_adapters(model, ["default", "other"])):
        with pytest.raises(AdapterNameError, match=r"unknown adapter 'other' \(adapters on this model: default\)"):
            call()
    assert str(pytest.raises(AdapterNameError, delete_adapter, model, "x").value).startswith("unknown adapter 'x'")
    assert_unchanged(model, before)
    assert active_adapters(model) == ["default"]


def test_invalid_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="r must be a positive integer, got 0"):
        LoraConfig(r=0, target_modules=["q_proj"])


def test_unsupported_module_type_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TargetError, match=r"target module '1' is a LayerNorm"):
        add_adapter(model, LoraConfig(target_modules=["0", "1"], r=2))
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], LoraLinear)


def test_saved_head_disable_unload_and_delete():
    model = tm.bert_classifier()
    original_head = model.classifier
    base = logits(model)
    add_adapter(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                  init_lora_weights=False))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.5)
    adapted = logits(model)
    assert max_diff(adapted, base) > 1e-2
    assert torch.equal(original_head.weight, model.classifier.original_module.weight)
    with disable_adapters(model):
        assert max_diff(logits(model), base) <= 1e-6
    plain = unload(model)
    assert type(plain.classifier) is nn.Linear and plain.classifier is not original_head
    assert max_diff(logits(plain), adapted) <= 1e-5

    model = tm.bert_classifier()
    original_head = model.classifier
    add_adapter(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    delete_adapter(model, "default")
    assert model.classifier is original_head
    assert max_diff(logits(model), base) <= 1e-6


def test_weighted_adapter_saves_and_loads_with_its_layers(tmp_path):
    from loratune import load_adapter, save_adapter

    model = tm.llama()
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False),
                name="a")
    torch.manual_seed(3)
    add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1], init_lora_weights=False),
                name="b")
    add_weighted_adapter(model, ["a", "b"], [0.5, 0.5], "ab")
    set_active_adapters(model, ["ab"])
    combined = logits(model)
    save_adapter(model, tmp_path, name="ab")
    fresh = tm.llama()
    load_adapter(fresh, tmp_path)
    assert _lora_paths(fresh) == {"model.layers.1.self_attn.q_proj"}
    assert max_diff(logits(fresh), combined) <= 1e-6


def test_new_lora_layers_follow_the_model_train_or_eval_mode():
    model = tm.gpt2().eval()
    add_adapter(model, LoraConfig(r=2, lora_dropout=0.5, target_modules=["c_attn"]))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in layers)


def test_layers_to_transform_selecting_nothing_says_so():
    model = tm.llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"layers_to_transform=\[99\] selects none.*0\.\.1"):
        add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[99]))
    assert_unchanged(model, before)

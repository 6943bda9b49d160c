"""Batches as `train.batching` says: packed batches against padded ones, the one common-prefix function, the
strategy each batch gets (and the one warning where it differs from the config), and the batch order."""

import pytest
import torch
from batching_tools import PAD, adapted, assert_same, examples, gpt2_without_dropout, loss_and_grads
from tiny_models import bloom, llama, mistral

from loratune.batching import (
    MIN_PREFIX,
    BatchMaker,
    BatchOrder,
    collate,
    common_prefix_length,
    fallback_warning,
    first_fit_rows,
    grouped_order,
    order_keys,
    pack_batch,
    pad_rows,
)
from loratune.core.errors import ConfigError
from loratune.train.run_config import validate_config

CPU = torch.device("cpu")


@pytest.mark.parametrize("builder", [llama, gpt2_without_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("answer_only", [True, False], ids=["answer", "every-token"])
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(builder, answer_only):
    model = adapted(builder)
    batch = examples([20, 7, 12, 5, 9, 3], answer_only=answer_only)
    packed = pack_batch(batch, PAD)
    assert packed["input_ids"].shape == (3, 20)  # 56 tokens in 3 rows of the longest, not 6 rows of 20
    assert int(packed["attention_mask"].sum()) == 56
    assert_same(loss_and_grads(model, packed), loss_and_grads(model, collate(batch, PAD, "causal-lm")))


def test_first_fit_lays_the_longest_first_and_fills_gaps():
    assert first_fit_rows([20, 7, 12, 5, 9, 3], 20) == [[0], [2, 1], [4, 3, 5]]
    with pytest.raises(ValueError, match="does not fit rows of 4"):
        first_fit_rows([5], 4)


def test_rows_are_padded_right_or_around_a_kept_prefix():
    rows = [[1, 2, 3, 4], [1, 2, 5]]
    ids, mask = pad_rows(rows, 0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 5, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    ids, mask = pad_rows(rows, 0, prefix=2, left=True)  # every row's last token is the batch's last
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 5]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]


def test_a_common_prefix_leaves_every_row_a_token_and_counts_only_from_min_prefix():
    start = list(range(3, 3 + MIN_PREFIX + 4))
    assert common_prefix_length([start + [1, 2], start + [1, 5, 6]]) == len(start) + 1
    assert common_prefix_length([start, start + [9]]) == len(start) - 1  # the shorter row keeps its last token
    assert common_prefix_length([start[:MIN_PREFIX] + [1], start[:MIN_PREFIX] + [2]]) == MIN_PREFIX
    assert common_prefix_length([start[:MIN_PREFIX - 1] + [1], start[:MIN_PREFIX - 1] + [2]]) == 0  # not worth it
    assert common_prefix_length([start]) == 0 and common_prefix_length([]) == 0


def test_each_batch_gets_the_strategy_that_applies():
    batch = examples([24, 17, 20], prefix=range(5, 20))
    packed, prefix = BatchMaker("packed", "causal-lm", PAD).make(batch, CPU)
    assert "position_ids" in packed and prefix == 0  # a packed batch's rows are not its examples
    maker = BatchMaker("shared_prefix", "causal-lm", PAD, checkpointing=True)  # one row where it fits
    assert maker.strategy(training=True) == "shared_prefix" and maker.make(batch, CPU)[1] >= 15
    assert BatchMaker("shared_prefix", "causal-lm", PAD).make(batch, CPU)[1] >= 15
    fsdp = BatchMaker("shared_prefix", "causal-lm", PAD, sharded=True)  # ranks' batches differ in training only
    assert fsdp.make(batch, CPU)[1] == 0 and fsdp.make(batch, CPU, training=False)[1] >= 15


def model_config(builder, attention="eager"):
    model = builder()
    model.set_attn_implementation(attention)
    return model.config


@pytest.mark.parametrize("builder, attention, max_length, checkpointing, expected", [
    (llama, "eager", 64, False, None),
    (llama, "sdpa", 64, True, "under gradient checkpointing, training batches over 32 tokens (the prefix and "
                              "every row's remainder) run padded"),  # the tiny Llama's 32 positions
    (bloom, "eager", 64, True, "under gradient checkpointing, every training batch runs padded"),
    (mistral, "eager", 64, True, "under gradient checkpointing, training batches over 16 tokens"),  # its window
    (bloom, "eager", 64, False, "remainders after the prefix run padded, not packed (ALiBi"),
    (mistral, "eager", 32, False, "run padded, not packed (rows longer than the sliding window of 16 tokens)"),
    (mistral, "eager", 16, False, None),
], ids=["applies", "checkpointing", "checkpointing-alibi", "checkpointing-window", "alibi", "short-window",
        "window-longer-than-rows"])
def test_one_warning_line_names_what_runs_where_shared_prefix_cannot(builder, attention, max_length, checkpointing,
                                                                      expected):
    maker = BatchMaker("shared_prefix", "causal-lm", PAD, checkpointing=checkpointing)
    warning = fallback_warning(maker, model_config(builder, attention), max_length)
    if expected is None:
        assert warning is None
    else:
        assert warning.startswith("train.batching: shared_prefix: ") and expected in warning and "\n" not in warning
    assert fallback_warning(BatchMaker("padded", "causal-lm", PAD, checkpointing=True), model_config(bloom), 64) is None
    fsdp = fallback_warning(BatchMaker("shared_prefix", "causal-lm", PAD, sharded=True), model_config(llama), 64)
    assert fsdp == ("train.batching: shared_prefix: training batches run padded under FSDP (each rank's batch would "
                    "make its own number of body forwards; evaluation still shares the prefix)")


def test_a_run_warns_once_what_gradient_checkpointing_runs_padded(run_config, capsys):
    from loratune.train.session import prepare

    config = validate_config(run_config(train={"batching": "shared_prefix", "gradient_checkpointing": True}), "t")
    session = prepare(config, quiet=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.batching" in line]
    assert lines == ["loratune: warning: train.batching: shared_prefix: under gradient checkpointing, training "
                     "batches over 64 tokens (the prefix and every row's remainder) run padded (a checkpointed "
                     "layer keeps no cache; evaluation still shares the prefix)"]  # the tiny GPT-2's 64 positions
    assert session.batches.strategy(training=True) == "shared_prefix" and session.batches.checkpointing
    prepare(validate_config(run_config(train={"batching": "shared_prefix"}), "t"), quiet=True)
    assert "train.batching" not in capsys.readouterr().err


def test_prefix_grouped_batches_hold_one_template_and_compute_its_prefix_once():
    templates = [list(range(5, 25)), list(range(30, 50))]  # two 20-token prompt templates, alternating
    data = [examples([20 + 3 + i % 5], prefix=templates[i % 2], seed=i)[0] for i in range(32)]
    plain = BatchOrder(32, 4, seed=0)
    grouped = BatchOrder(32, 4, seed=0, keys=order_keys(data, prefix_grouped=True))
    assert sorted(i for k in range(8) for i in grouped.batch(k)) == list(range(32))
    mixed = sum(len({i % 2 for i in plain.batch(k)}) > 1 for k in range(8))
    assert mixed >= 4  # a shuffled order mixes the templates in most batches
    for k in range(8):
        rows = grouped.batch(k)
        assert len({i % 2 for i in rows}) == 1
        assert common_prefix_length([data[i]["input_ids"] for i in rows]) >= 20
    assert order_keys(data, prefix_grouped=False) is None


def test_grouped_order_keeps_every_example_once_and_sorts_within_windows():
    keys = [[5], [50], [7], [48], [6], [49], [8], [47]]
    order = grouped_order(list(range(8)), keys, batch_size=2, group=2)
    assert sorted(order) == list(range(8))
    assert [[keys[i][0] for i in order[k:k + 2]] for k in range(0, 8, 2)] == [[5, 7], [48, 50], [6, 8], [47, 49]]


def test_removed_and_renamed_keys_say_so_in_one_line(run_config):
    with pytest.raises(ConfigError, match=r"^run\.yaml: train\.length_grouped: unknown key$"):
        validate_config(run_config(train={"length_grouped": True}), "run.yaml")
    with pytest.raises(ConfigError, match=r"^run\.yaml: data\.packing: renamed to data\.concatenate_texts$"):
        validate_config(run_config(data={"packing": False}), "run.yaml")

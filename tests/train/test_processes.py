"""The seam between the recipe and its processes: one process answers every named point without communicating,
and torchrun's ranks split a step's micro-batches and the evaluation between them as a single process would
take them (the runs themselves are compared in test_distributed.py)."""

import torch

from loratune.train.distributed import Torchrun
from loratune.train.processes import Processes


def test_one_process_takes_the_whole_step_and_every_example():
    one = Processes()
    assert one.is_main and one.world == 1
    assert list(one.micro_batches(3)) == [0, 1, 2]
    assert one.shard([1, 2, 3]) == [1, 2, 3] and one.unshard([1, 2]) == [1, 2] and one.total(5) == 5
    assert one.sum([1.0, 2.0]) == [1.0, 2.0] and one.any(False) is False and one.gather("x") == ["x"]
    assert one.on_main(lambda: 7) == 7 and one.agree(lambda: 8) == 8


def test_one_process_trains_through_the_loss_itself():
    model = torch.nn.Linear(2, 2)
    calls = []
    trainer = Processes().wrap(model, lambda m, batch, prefix=0: calls.append((m, batch, prefix)) or (1, None, 1))
    assert trainer({"x": 1}, prefix=3) == (1, None, 1)
    assert calls == [(model, {"x": 1}, 3)]


def test_ranks_deal_out_the_global_micro_batches_and_split_the_evaluation():
    """Rank r takes every world-th piece of the step's global batch from r; together the ranks take the pieces
    one process takes."""
    ranks = [Torchrun(rank, 2) for rank in (0, 1)]
    assert [list(r.micro_batches(2)) for r in ranks] == [[0, 2], [1, 3]]
    assert sorted(i for r in ranks for i in r.micro_batches(2)) == list(Processes().micro_batches(4))
    assert [r.shard(list(range(5))) for r in ranks] == [[0, 1], [2, 3, 4]]
    sharded = [Torchrun(rank, 2, shard_model=True) for rank in (0, 1)]  # FSDP: every rank runs every forward
    assert [r.shard(list(range(5))) for r in sharded] == [list(range(5))] * 2
    assert not ranks[1].is_main

"""train.learning_rate: auto: chosen on a part of the training split, never on the held-out split."""

import json
import math
import types

import pytest
import torch
from safetensors.torch import load_file

from loratune.train import fit
from loratune.train.auto_lr import CANDIDATES, carve_validation, for_run_length, range_choice
from loratune.train.run_config import validate_config

POSITIVE = ["good movie", "great film", "good acting", "great plot", "good review", "great acting"]
NEGATIVE = ["bad movie", "awful film", "bad acting", "awful plot", "bad review", "awful acting"]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_the_choice_does_not_change_when_the_held_out_labels_are_poisoned(run_config, tmp_path):
    rows = [{"text": f"the {t}", "label": "positive"} for t in POSITIVE] + \
           [{"text": f"the {t}", "label": "negative"} for t in NEGATIVE]
    train = write(tmp_path / "train.jsonl", rows * 3)
    clean = write(tmp_path / "clean.jsonl", rows)
    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in rows]
    poisoned = write(tmp_path / "poisoned.jsonl", flipped)
    summaries = {}
    for name, validation in (("clean", clean), ("poisoned", poisoned)):
        data = run_config(data={"train": train, "validation": validation},
                          train={"learning_rate": "auto", "max_steps": 20}, output_dir=str(tmp_path / name))
        summaries[name] = fit(validate_config(data, "test"), quiet=True)
    choices = [s["learning_rate_choice"] for s in summaries.values()]
    assert choices[0] == choices[1]  # the chosen rate and every round's validation losses
    assert choices[0]["chosen"] == for_run_length(choices[0]["round_winner"], 4, 20, CANDIDATES["lora"])
    assert [len(r["validation_loss"]) for r in choices[0]["rounds"]] == [6, 3]
    assert choices[0]["validation_examples"] == 3 and choices[0]["training_examples"] == 33
    # the poison reached the held-out split: its loss differs, so an evaluation that read it would differ too
    assert summaries["clean"]["before"]["loss"] != summaries["poisoned"]["before"]["loss"]
    report = (tmp_path / "clean" / "report.md").read_text()
    assert f"train.learning_rate: auto chose {choices[0]['chosen']:g} by successive halving" in report


@pytest.mark.parametrize("search", ["halving", "range"])
def test_the_run_after_the_choice_is_the_run_with_that_rate_given(run_config, tmp_path, search):
    auto = fit(validate_config(run_config(train={"learning_rate": "auto", "max_steps": 10, "lr_search": search},
                                          output_dir=str(tmp_path / "auto")), "test"), quiet=True)
    rate = auto["learning_rate_choice"]["chosen"]
    fixed = fit(validate_config(run_config(train={"learning_rate": rate, "max_steps": 10},
                                           output_dir=str(tmp_path / "fixed")), "test"), quiet=True)
    assert fixed["learning_rate_choice"] is None
    a = load_file(tmp_path / "auto" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "fixed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    config = (tmp_path / "auto" / "config.yaml").read_text()
    assert f"learning_rate: {rate}" in config


def test_the_range_test_reads_the_training_split_alone_and_chooses_a_tenth_of_its_lowest_loss(run_config, tmp_path):
    rows = [{"text": f"the {t}", "label": "positive"} for t in POSITIVE] + \
           [{"text": f"the {t}", "label": "negative"} for t in NEGATIVE]
    train = write(tmp_path / "train.jsonl", rows * 3)
    flipped = [{**r, "label": "negative" if r["label"] == "positive" else "positive"} for r in rows]
    choices = []
    for name, validation in (("clean", rows), ("poisoned", flipped)):
        data = run_config(data={"train": train, "validation": write(tmp_path / f"{name}.jsonl", validation)},
                          train={"learning_rate": "auto", "max_steps": 30, "lr_search": "range"},
                          output_dir=str(tmp_path / name))
        choices.append(fit(validate_config(data, "test"), quiet=True)["learning_rate_choice"])
    assert choices[0] == choices[1]  # the rate and every point of the curve
    curve = choices[0]["curve"]
    rates, losses = [rate for rate, _ in curve], [loss for _, loss in curve]
    lowest, highest = CANDIDATES["lora"][0] / 10, CANDIDATES["lora"][-1] * 10
    assert rates[0] == pytest.approx(lowest)  # 6 steps (a fifth of 30) from 1e-5 towards 5e-2, each x 5.5
    assert [b / a for a, b in zip(rates, rates[1:])] == pytest.approx([(highest / lowest) ** 0.2] * (len(rates) - 1))
    assert len(curve) == 6 or losses[-1] > 4 * min(losses[:-1])  # the whole test, or stopped where the loss blew up
    at_minimum = rates[losses.index(min(losses))]
    expected = min(CANDIDATES["lora"], key=lambda c: abs(math.log(c / (at_minimum / 10))))
    assert choices[0]["chosen"] == expected
    assert choices[0]["training_examples"] == 36  # the whole training split; no part carved
    report = (tmp_path / "clean" / "report.md").read_text()
    assert "by a range test" in report and "| step | rate | smoothed training loss |" in report


def test_the_range_choice_is_the_candidate_nearest_a_tenth_of_the_rate_at_the_lowest_smoothed_loss():
    lora = CANDIDATES["lora"]
    curve = [[1e-5 * 1.5 ** k, 2.0 - 0.1 * k] for k in range(12)] + [[1.3e-3 * 1.5 ** k, 3.0 + k] for k in range(4)]
    assert range_choice(curve, lora) == (1e-4, curve[11][0])  # lowest at 8.6e-4: a tenth is nearest 1e-4
    assert range_choice([[2e-2, 1.0], [4e-2, 0.5], [5e-2, 0.7]], lora) == (5e-3, 4e-2)
    assert range_choice([[1e-5, 1.0], [2e-5, 3.0]], lora) == (1e-4, 1e-5)  # never below the lowest candidate


def test_a_saved_choice_is_reused_only_by_the_search_that_made_it(run_config, tmp_path, monkeypatch):
    """A restarted run keeps its folder's choice; a run of the other `train.lr_search` searches again."""
    import loratune.train.auto_lr as auto_lr

    searches = []

    def choose(session, stopping):
        searches.append(session.config.train.lr_search)
        return {"chosen": 5e-4, "how": auto_lr.SEARCHES[session.config.train.lr_search]}

    monkeypatch.setattr(auto_lr, "choose", choose)
    for search in ("halving", "halving", "range", "range"):
        config = validate_config(run_config(train={"learning_rate": "auto", "lr_search": search}), "test")
        session = types.SimpleNamespace(config=config, processes=types.SimpleNamespace(world=1))
        assert auto_lr.resolve_learning_rate(session, tmp_path) and session.config.train.learning_rate == 5e-4
    assert searches == ["halving", "range"]
    assert json.loads((tmp_path / auto_lr.CHOICE_NAME).read_text())["how"] == "a range test"


def test_the_last_rounds_winner_is_scaled_down_to_the_runs_length():
    lora, full = CANDIDATES["lora"], CANDIDATES["full"]
    assert for_run_length(2e-3, 36, 188, lora) == 1e-3  # x 0.44 = 8.8e-4
    assert for_run_length(5e-3, 36, 188, lora) == 2e-3
    assert for_run_length(2e-4, 36, 188, full) == 1e-4
    assert for_run_length(5e-3, 20, 2000, lora) == 5e-4  # x 0.1: two candidates down for a long run
    assert for_run_length(2e-3, 188, 188, lora) == 2e-3  # a round as long as the run: unchanged
    assert for_run_length(1e-4, 36, 188, lora) == 1e-4  # never below the lowest candidate


def test_the_carved_part_is_disjoint_seeded_and_a_tenth():
    train, val = carve_validation(100, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert carve_validation(100, seed=3) == (train, val) and carve_validation(100, seed=4) != (train, val)


def test_a_run_stopped_after_its_choice_resumes_with_it_and_a_stop_during_the_search_saves_nothing(
        run_config, tmp_path, monkeypatch):
    import loratune.train.auto_lr as auto_lr
    import loratune.train.loop as loop
    from loratune.train.stop_signals import RunStopped

    data = run_config(train={"learning_rate": "auto", "max_steps": 10, "checkpoint_every": 5},
                      output_dir=str(tmp_path / "run"))
    real_start, searches = loop.start_run, []

    def stop_before_step_one(session, out):
        real_start(session, out)  # config.yaml (with the chosen rate) is written, no checkpoint yet
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "start_run", stop_before_step_one)
    try:
        fit(validate_config(data, "test"), quiet=True)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    chosen = json.loads((tmp_path / "run" / auto_lr.CHOICE_NAME).read_text())["chosen"]
    real_choose = auto_lr.choose
    monkeypatch.setattr(auto_lr, "choose", lambda *args: searches.append(1) or real_choose(*args))
    resumed = fit(validate_config(data, "test"), resume=True, quiet=True)  # restarts from step 0
    assert searches == [] and resumed["learning_rate_choice"]["chosen"] == chosen

    monkeypatch.setattr(auto_lr, "train_and_validate", lambda *args, **kwargs: 1.0)
    stop = validate_config({**data, "output_dir": str(tmp_path / "stopped")}, "test")
    monkeypatch.setattr(loop, "stop_requests", _requested_at_once)
    try:
        fit(stop, quiet=True)
        raise AssertionError("the run was not stopped")
    except RunStopped:
        pass
    assert not (tmp_path / "stopped" / auto_lr.CHOICE_NAME).exists()


class _Requested:
    requested, signal_name = True, "SIGTERM"


def _requested_at_once():
    from contextlib import nullcontext

    return nullcontext(_Requested())


def test_a_candidate_trains_through_the_runs_own_steps_and_batch_order(run_config, tiny_llama, tmp_path):
    """Given the whole training split and the run's rate and steps, a candidate of the search ends with the adapter
    the run itself trains (two micro-batches a step, 9 steps over 6 global batches an epoch: the order reshuffles;
    no dropout, so the random streams do not matter)."""
    import loratune as lt
    from loratune.train.auto_lr import train_and_validate
    from loratune.train.session import prepare

    config = validate_config(run_config(model={"name": tiny_llama, "task": "causal-lm"},
                                        lora={"lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                                        train={"max_steps": 9, "batch_size": 2, "grad_accum": 2,
                                               "warmup_steps": 2, "seed": 1}), "test")
    session = prepare(config, quiet=True)
    examples = list(session.data.train_examples)
    assert len(examples) // 4 < config.train.max_steps
    loss = train_and_validate(session, examples, examples[:4], config.train.learning_rate, config.train.max_steps)
    assert 0 < loss < float("inf")
    lt.save_adapter(session.model, tmp_path / "candidate")
    fit(config, quiet=True)
    run = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    candidate = load_file(tmp_path / "candidate" / "adapter_model.safetensors")
    assert run.keys() == candidate.keys()
    assert all(torch.equal(run[k], candidate[k]) for k in run)


def test_a_search_run_steps_the_parameters_the_model_trains_with_after_wrapping(run_config, tiny_llama, monkeypatch):
    """Sharding (FSDP under torchrun) replaces the parameters when the model is wrapped for training: a search
    run's optimizer must hold the replacements, as the run's own does."""
    import functools

    from loratune.train.auto_lr import train_and_validate
    from loratune.train.session import prepare

    config = validate_config(run_config(model={"name": tiny_llama, "task": "causal-lm"},
                                        lora={"lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                                        train={"max_steps": 4}), "test")
    session = prepare(config, quiet=True)
    replaced = {}

    def replacing_wrap(model, loss):
        for name, module in model.named_modules():
            for key, param in list(module.named_parameters(recurse=False)):
                if param.requires_grad:
                    fresh = torch.nn.Parameter(param.detach().clone())
                    setattr(module, key, fresh)
                    replaced[f"{name}.{key}"] = (fresh, fresh.detach().clone())
        return functools.partial(loss, model)

    monkeypatch.setattr(session.processes, "wrap", replacing_wrap)
    examples = list(session.data.train_examples)
    train_and_validate(session, examples, examples[:4], 1e-2, 2)
    assert replaced and all(not torch.equal(live, before) for live, before in replaced.values())

"""The continuous-batching engine on a tiny Llama with two random adapters: a request's greedy tokens are the
same alone and in any batch, whoever joins or leaves around it."""

import threading

import pytest
from serve_tools import wait_for

from loratune.pretrained import load_model
from loratune.serve.scheduler import Engine, Job, QueueFull, Sampling

PROMPTS = ["the cat sat on a mat", "hello world", "the good movie was great and the plot", "dog"]
MODELS = [None, "alpha", "beta"]


@pytest.fixture(scope="module")
def loaded(tiny_llama, adapter_root):
    model, tokenizer = load_model(tiny_llama, "causal-lm")
    engine = Engine(model, tokenizer)
    engine.start()
    for name in ("alpha", "beta"):
        engine.load_adapter(name, str(adapter_root / name)).result(timeout=30)
    engine.stop()
    return model, tokenizer


class Collector:
    def __init__(self) -> None:
        self.events, self.done = [], threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if event.finish_reason or event.error:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)


def job(tokenizer, prompt: str, adapter, **sampling) -> tuple[Job, Collector]:
    collect = Collector()
    return Job(tokenizer(prompt).input_ids, adapter, Sampling(**{"max_tokens": 24, "temperature": 0.0, **sampling}),
               collect), collect


def finish(pairs) -> list[tuple[list[int], str, str]]:
    for _, collect in pairs:
        assert collect.done.wait(60), "a request did not finish within 60 s"
        assert collect.events[-1].error is None, collect.events[-1].error
    return [(j.generated, c.text, c.events[-1].finish_reason) for j, c in pairs]


def run_alone(model, tokenizer, prompt, adapter, **sampling):
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        pair = job(tokenizer, prompt, adapter, **sampling)
        engine.submit(pair[0])
        return finish([pair])[0]
    finally:
        engine.stop()


def test_mixed_batch_with_joins_and_leaves_equals_each_request_alone(loaded):
    model, tokenizer = loaded
    cases = [(p, a) for p in PROMPTS for a in MODELS]
    alone = {}
    engine = Engine(model, tokenizer)
    engine.start()
    for case in cases:
        pair = job(tokenizer, *case)
        engine.submit(pair[0])
        alone[case] = finish([pair])[0]
    engine.stop()
    by_prompt = [{alone[(p, a)][0][:8].__repr__() for a in MODELS} for p in PROMPTS]
    assert all(len(outputs) == 3 for outputs in by_prompt), "each adapter must change the greedy output"

    # First wave all at once (one batch of mixed lengths and adapters, with different max_tokens so rows leave
    # at different steps); the second wave joins while the first is decoding.
    engine = Engine(model, tokenizer, max_batch=16)
    first = [job(tokenizer, *case, max_tokens=4 + 4 * i) for i, case in enumerate(cases[:6])]
    second = [job(tokenizer, *case) for case in cases[6:]]
    for j, _ in first:
        engine.submit(j)
    engine.start()
    try:
        assert wait_for(lambda: first[0][1].events, what="a first token")  # the first wave is decoding
        for j, _ in second:
            engine.submit(j)
        batched = finish(first + second)
    finally:
        engine.stop()
    for (case, (tokens, text, reason)), (j, _) in zip(zip(cases, batched), first + second):
        want_tokens, want_text, want_reason = alone[case]
        limit = j.sampling.max_tokens
        assert tokens == want_tokens[:limit], case
        assert want_text.startswith(text) and text.split() == want_text.split()[:len(text.split())], case
        assert reason == (want_reason if limit >= len(want_tokens) else "length"), case


def test_stop_string_cuts_the_answer_and_is_never_streamed(loaded):
    model, tokenizer = loaded
    _, text, _ = run_alone(model, tokenizer, "hello world", None)
    words = text.split()
    stop = " ".join(words[3:5])
    tokens, cut, reason = run_alone(model, tokenizer, "hello world", None, stop=("zzz", stop))
    assert reason == "stop" and cut == text[:text.index(stop)]
    assert stop not in cut


def test_sampling_is_repeatable_with_a_seed(loaded):
    model, tokenizer = loaded
    draws = [run_alone(model, tokenizer, "the cat", "alpha", temperature=1.5, seed=s, max_tokens=16)[0]
             for s in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    nucleus = run_alone(model, tokenizer, "the cat", "alpha", temperature=1.5, top_p=1e-6, seed=3, max_tokens=16)
    greedy = run_alone(model, tokenizer, "the cat", "alpha", max_tokens=16)
    assert nucleus[0] == greedy[0]  # a tiny top_p keeps only the most likely token


def test_full_queue_refuses_and_cancelled_rows_leave(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_queued=2)
    pairs = [job(tokenizer, "dog", "alpha", max_tokens=100) for _ in range(2)]
    for j, _ in pairs:
        engine.submit(j)
    with pytest.raises(QueueFull):
        engine.submit(job(tokenizer, "dog", None)[0])
    engine.cancel(pairs[0][0])
    engine.start()
    try:
        finish(pairs[1:])
        assert pairs[0][1].events == []  # cancelled before it ran: never started
        assert engine.stats() == {"running": 0, "queued": 0}
    finally:
        engine.stop()


def test_loading_refuses_what_a_mixed_batch_cannot_run(loaded, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    import loratune as lt

    model, tokenizer = loaded
    donor = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lt.add_adapter(donor, lt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lt.save_adapter(donor, tmp_path / "dora")
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        with pytest.raises(lt.TargetError, match="DoRA"):
            engine.load_adapter("dora", str(tmp_path / "dora")).result(timeout=30)
        assert "dora" not in lt.active_adapters(model) and sorted(model.lora_configs) == ["alpha", "beta"]
    finally:
        engine.stop()


def test_tiny_temperature_and_top_p_are_the_greedy_limit_not_an_error(loaded):
    """Issue 27: temperature 1e-39 overflowed logits/temperature to NaN and failed the whole batch with 500."""
    model, tokenizer = loaded
    greedy = run_alone(model, tokenizer, "the cat", "alpha", max_tokens=12)
    for sampling in ({"temperature": 1e-39}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}):
        assert run_alone(model, tokenizer, "the cat", "alpha", max_tokens=12, seed=1, **sampling) == greedy, sampling


def test_one_rows_failed_draw_fails_that_request_alone(loaded, monkeypatch):
    import loratune.serve.scheduler as scheduler

    model, tokenizer = loaded
    alone = [run_alone(model, tokenizer, prompt, adapter, max_tokens=12) for prompt, adapter in
             (("hello world", None), ("the cat", "beta"))]
    real = scheduler._sample

    def fails_for_top_p_half(logits, sampling, generator):
        if sampling.top_p == 0.5 and len(job_sampled) > 2:  # fail mid-decode, while the others are running
            raise RuntimeError("invalid multinomial distribution")
        job_sampled.append(1)
        return real(logits, sampling, generator)

    job_sampled = []
    monkeypatch.setattr(scheduler, "_sample", fails_for_top_p_half)
    engine = Engine(model, tokenizer, max_batch=8)
    pairs = [job(tokenizer, "hello world", None, max_tokens=12), job(tokenizer, "the cat", "beta", max_tokens=12)]
    bad = job(tokenizer, "dog", "alpha", max_tokens=12, temperature=1.0, top_p=0.5, seed=0)
    for j, _ in [pairs[0], bad, pairs[1]]:
        engine.submit(j)
    engine.start()
    try:
        assert finish(pairs) == alone
        assert bad[1].done.wait(60) and "sampling failed" in bad[1].events[-1].error
        assert wait_for(lambda: engine.stats() == {"running": 0, "queued": 0}, what="every row to leave")
    finally:
        engine.stop()


def generate_alone(model, tokenizer, prompt: str, adapter, max_new_tokens: int = 24) -> list[int]:
    """Greedy `model.generate` on one prompt (what `loratune generate` runs), the adapter set for its one row."""
    import torch

    import loratune as lt

    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad(), lt.mixed_adapter_batch(model, [adapter]):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_token_id else tokens


def burst_equals_alone(model, tokenizer, cases) -> None:
    """Submit `cases` (prompt, adapter) at once, the fifth asking for one token only, and check each request's
    greedy tokens against `generate` alone."""
    expected = [generate_alone(model, tokenizer, *case) for case in cases]
    engine = Engine(model, tokenizer, max_batch=16)
    pairs = [job(tokenizer, *case, max_tokens=1 if i == 4 else 24) for i, case in enumerate(cases)]
    engine.submit(*(j for j, _ in pairs))
    engine.start()
    try:
        got = finish(pairs)
    finally:
        engine.stop()
    for i, ((tokens, _, _), want) in enumerate(zip(got, expected)):
        assert tokens == (want[:1] if i == 4 else want), cases[i]


def test_prompts_arriving_together_are_prefilled_in_one_padded_forward_each_with_its_own_tokens(loaded, monkeypatch):
    """Issue 25: the requests of one step share one left-padded prefill forward (mixed lengths and adapters, one
    row finishing at its first token), and each still gets `generate`'s greedy tokens."""
    model, tokenizer = loaded
    cases = [(p, a) for p in PROMPTS for a in MODELS][:9]
    assert len({len(tokenizer(p).input_ids) for p, _ in cases}) > 2 and len({a for _, a in cases}) == 3
    sizes = []
    real = Engine._prefill

    def counting(self, jobs):
        sizes.append(len(jobs))
        return real(self, jobs)

    monkeypatch.setattr(Engine, "_prefill", counting)
    burst_equals_alone(model, tokenizer, cases)
    assert sizes == [len(cases)]  # one forward for all of them


def test_choices_sharing_one_prompt_are_prefilled_once(loaded, monkeypatch):
    """A request's `n` jobs share one prompt list: one prefill row, its cache row copied to each choice."""
    import loratune.serve.scheduler as scheduler

    model, tokenizer = loaded
    real, rows = scheduler.pad_rows, []

    def counting(prompts, *args, **options):
        rows.append(len(prompts))
        return real(prompts, *args, **options)

    monkeypatch.setattr(scheduler, "pad_rows", counting)
    prompt = tokenizer("the good movie was great").input_ids
    collectors = [Collector() for _ in range(3)]
    pairs = [(Job(prompt, "alpha", Sampling(max_tokens=12, temperature=0.0), c), c) for c in collectors]
    other = job(tokenizer, "dog", "alpha", max_tokens=12)
    engine = Engine(model, tokenizer)
    engine.submit(*(j for j, _ in pairs), other[0])
    engine.start()
    try:
        got = finish([*pairs, other])
    finally:
        engine.stop()
    assert rows == [2]  # the shared prompt once, "dog" once
    want = generate_alone(model, tokenizer, "the good movie was great", "alpha", 12)
    assert [g[0] for g in got[:3]] == [want] * 3
    assert got[3][0] == generate_alone(model, tokenizer, "dog", "alpha", 12)


def test_a_prefix_all_prompts_share_is_computed_once_per_adapter_and_each_row_keeps_its_tokens(loaded, monkeypatch):
    """Issue 25: prompts arriving together that start alike (a chat template's system turn) run that start once
    per adapter, not once per row, and each row still gets `generate`'s greedy tokens."""
    import loratune.serve.scheduler as scheduler
    from loratune.batching import common_prefix_length

    model, tokenizer = loaded
    system = "you are a helpful assistant and you answer about the cat and the dog : "
    cases = [(system + p, a) for p in PROMPTS for a in MODELS]
    prompts = [tokenizer(p).input_ids for p, _ in cases]
    shared = len(tokenizer(system).input_ids) - 1
    assert all(ids[:shared] == prompts[0][:shared] for ids in prompts) and shared >= 8
    real, prefixes = scheduler.prefix_cache, []

    def counting(body, prefix_ids, rows):
        prefixes.append(tuple(prefix_ids.shape))
        return real(body, prefix_ids, rows)

    monkeypatch.setattr(scheduler, "prefix_cache", counting)
    burst_equals_alone(model, tokenizer, cases)
    assert prefixes == [(len(MODELS), common_prefix_length(prompts))]  # one forward, a row per adapter and the base


def test_choices_and_a_second_wave_after_a_shared_prefix_keep_their_tokens(loaded, monkeypatch):
    """After a prefill that shared its prompts' prefix, a request's `n` choices get one prompt row each copied, and
    rows that join later (left-padded against the moved cache) still decode `generate`'s greedy tokens."""
    import loratune.serve.scheduler as scheduler

    real, prefixes = scheduler.prefix_cache, []
    monkeypatch.setattr(scheduler, "prefix_cache", lambda *args: prefixes.append(args[1].shape) or real(*args))
    model, tokenizer = loaded
    system = "you are a helpful assistant and you answer about the cat and the dog : "
    first = [(system + p, a) for p in PROMPTS[:3] for a in MODELS[1:]]
    later = [(system + "what about the plot", "alpha"), ("dog", "beta")]
    engine = Engine(model, tokenizer, max_batch=16)
    prompt = tokenizer(system + "the movie").input_ids
    choices = [Collector() for _ in range(2)]
    pairs = [(Job(prompt, "beta", Sampling(max_tokens=12, temperature=0.0), c), c) for c in choices]
    wave = [job(tokenizer, *case, max_tokens=12) for case in first]
    engine.submit(*(j for j, _ in pairs + wave))
    engine.start()
    try:
        assert wait_for(lambda: wave[0][1].events, what="a first token")
        joined = [job(tokenizer, *case, max_tokens=12) for case in later]
        for j, _ in joined:
            engine.submit(j)
        got = finish(pairs + wave + joined)
    finally:
        engine.stop()
    assert len(prefixes) == 1 and prefixes[0][0] == 2  # the first prefill shared its prefix over two adapters
    want = generate_alone(model, tokenizer, system + "the movie", "beta", 12)
    assert [g[0] for g in got[:2]] == [want, want]
    for (tokens, _, _), case in zip(got[2:], first + later):
        assert tokens == generate_alone(model, tokenizer, *case, 12), case


def test_the_decoder_body_is_the_model_under_the_head_or_none(loaded):
    """The one body lookup (training's loss and evaluation use it too); without a separate body, prompts
    prefill whole: no shared prefix."""
    from torch import nn

    from loratune.batching import decoder_body

    model, _ = loaded
    assert decoder_body(model) is model.model
    assert decoder_body(nn.Linear(2, 2)) is None

    class Unnamed(nn.Module):
        base_model_prefix = "transformer"  # naming no submodule

    assert decoder_body(Unnamed()) is None

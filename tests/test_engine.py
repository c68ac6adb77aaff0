"""The continuous-batching engine without HTTP: sequences joining and leaving one batch give the
tokens they give alone, a cancelled job frees its row, the waiting line is bounded, and a failed
model call fails only its own step's jobs."""

import pytest
import torch

from minillm.engine import Engine, Job, JobError, Overloaded
from minillm.generate import SamplingConfig, generate
from tests.serving import tiny_tokenizer, wait_for


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from minillm.config import GPTConfig
    from minillm.model import GPT

    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=2048, n_layer=2, n_head=2, n_embd=32, impl="torch"))
    return model.eval(), tokenizer


def greedy(max_new_tokens, **kw):
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0, top_k=None, seed=0, **kw)


def drain(job: Job, timeout: float = 30) -> tuple[list[list[int]], list[str], list[str]]:
    """Every sequence's tokens, text and finish reason, once all have finished."""
    tokens, texts, reasons = [[] for _ in range(len(job))], [""] * len(job), [""] * len(job)
    while not all(reasons):
        event = job.events.get(timeout=timeout)
        assert not isinstance(event, JobError), event.message
        if event.token is not None:
            tokens[event.index].append(event.token)
        texts[event.index] += event.text
        reasons[event.index] = event.finish_reason or reasons[event.index]
    return tokens, texts, reasons


def test_sequences_joining_a_running_batch_give_the_tokens_they_give_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=4).start()
    try:
        long = Job([tokenizer.encode("To be, or not")], [greedy(300, stop_at_eot=False)])
        engine.submit(long)
        first = long.events.get(timeout=10)  # it is running: the next jobs join a batch in progress
        assert first.index == 0
        prompts = ["café", "Whether 'tis", "日本", "The question"]
        jobs = [Job([tokenizer.encode(p)], [greedy(20 + 7 * i)]) for i, p in enumerate(prompts)]
        for job in jobs:
            engine.submit(job)
        for prompt, job in zip(prompts, jobs):
            tokens, texts, reasons = drain(job)
            [alone] = generate(model, [prompt], job.configs[0], tokenizer=tokenizer)
            assert tokens[0] == alone.tokens and texts[0] == alone.text and reasons[0] == alone.finish_reason
        tokens, _, _ = drain(long)
        [alone] = generate(model, ["To be, or not"], long.configs[0], tokenizer=tokenizer)
        assert [first.token] + tokens[0] == alone.tokens
        # 300 + 20 + 27 + 34 + 41 tokens in far fewer steps: the short jobs rode along with the long one
        assert engine.steps < 300 + 20 + 27 + 34 + 41 - 100
    finally:
        engine.close()


def test_several_sequences_of_a_job_use_seed_plus_index(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=2).start()  # 3 sequences, 2 rows: one waits for a row
    try:
        configs = [SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=None, seed=40 + k) for k in range(3)]
        job = Job([tokenizer.encode("To be")] * 3, configs)
        engine.submit(job)
        tokens, texts, _ = drain(job)
        expected = generate(model, ["To be"] * 3, SamplingConfig(max_new_tokens=15, temperature=1.0, top_k=None, seed=40),
                            tokenizer=tokenizer)
        assert tokens == [c.tokens for c in expected] and texts == [c.text for c in expected]
    finally:
        engine.close()


def test_cancelling_frees_the_row_and_the_waiting_line_is_bounded(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=1, queue_size=1).start()
    try:
        running = Job([[5, 6]], [greedy(2000, stop_at_eot=False)])
        engine.submit(running)
        running.events.get(timeout=10)
        waiting = Job([[7]], [greedy(5)])
        engine.submit(waiting)
        assert engine.stats() == {"busy": 1, "slots": 1, "waiting": 1}
        with pytest.raises(Overloaded):
            engine.submit(Job([[8]], [greedy(5)]))
        running.cancel()
        tokens, _, reasons = drain(waiting)  # it gets the freed row
        assert len(tokens[0]) <= 5 and reasons[0] in ("length", "stop")
        assert wait_for(lambda: engine.stats()["busy"] == 0)
        generated = 1
        while not running.events.empty():
            generated += running.events.get_nowait().token is not None
        assert generated < 2000  # it was stopped, not run to the end
    finally:
        engine.close()


def test_a_sequence_must_fit_the_context_window(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=1)
    with pytest.raises(ValueError, match="do not fit the context window of 2048"):
        engine.submit(Job([[1] * 2000], [greedy(49)]))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(Job([[]], [greedy(1)]))
    with pytest.raises(ValueError, match="needs a seed"):
        Job([[1]], [SamplingConfig(seed=None)])


def test_a_failed_model_call_fails_its_jobs_and_the_engine_keeps_serving(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    logs = []
    engine = Engine(model, tokenizer, max_batch=2, log=logs.append).start()
    try:
        bad = Job([[1, 10**6]], [greedy(3)])  # an id outside the vocabulary: the model refuses it
        engine.submit(bad)
        assert isinstance(bad.events.get(timeout=10), JobError)
        assert any("token id 1000000 is outside the vocabulary" in line for line in logs)
        good = Job([[1, 2]], [greedy(4)])
        engine.submit(good)
        tokens, _, _ = drain(good)
        assert tokens[0] == generate(model, [[1, 2]], greedy(4))[0].tokens and engine.running
    finally:
        engine.close()

"""The serving engine: scheduler decisions, batched decode equal to decoding alone, prompt
chunks, cancellation, stop strings, errors, and the reasoning/answer split."""

from __future__ import annotations

import pytest
import torch

from turbollm import SamplingParams
from turbollm.engine.scheduler import Scheduler
from turbollm.engine.sequence import Event, Sequence, SeqState
from turbollm.engine.engine import Engine
from turbollm.text.output import OutputText
from turbollm.errors import ContextLengthError

from conftest import REFERENCE_DIR

GREEDY = SamplingParams(temperature=0, max_tokens=24)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "List three colors:", "Once upon a time",
           "1, 2, 3, 4,", "The meaning of life is"]


class Collector:
    def __init__(self):
        self.events: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if e.channel == "content")

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None


def run_all(engine: Engine, prompts, params=GREEDY, max_steps=10_000):
    outs = [Collector() for _ in prompts]
    seqs = [engine.submit(engine.model.encode(p), params, out) for p, out in zip(prompts, outs)]
    for _ in range(max_steps):
        if all(s.is_finished for s in seqs):
            break
        engine.step()
    assert all(s.is_finished for s in seqs)
    return seqs, outs


# ---- scheduler ---------------------------------------------------------------------------

def _seq(n_prompt: int) -> Sequence:
    return Sequence(list(range(1, n_prompt + 1)), GREEDY, 4, lambda ev: None)


def test_scheduler_admits_up_to_the_slots_and_chunks_prompts_at_fixed_boundaries():
    sched = Scheduler(n_slots=2, n_batch=4)
    a, b, c = _seq(10), _seq(3), _seq(2)
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert plan.admitted == [a, b] and sched.n_waiting == 1
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    assert plan.prefill is a and plan.prefill_range == (0, 4) and plan.decode == []
    a.n_prefilled = 4
    b.state = SeqState.DECODE  # pretend b is decoding: it is batched, a keeps prefilling from 4
    plan = sched.schedule()
    assert plan.admitted == [] and plan.decode == [b] and plan.prefill_range == (4, 8)
    b.state = SeqState.FINISHED
    assert sched.remove_finished() == [b]
    assert sched.schedule().admitted == [c] and c.slot == 1  # the slot b left


def test_a_new_request_takes_the_lowest_free_slot_number():
    sched = Scheduler(n_slots=3, n_batch=4)
    a, b, c, d = _seq(2), _seq(2), _seq(2), _seq(2)
    sched.add(a), sched.add(b), sched.add(c)
    sched.schedule()
    a.state = SeqState.FINISHED
    sched.remove_finished()
    sched.add(d)
    sched.schedule()
    assert [s.slot for s in (b, c, d)] == [1, 2, 0]


def test_scheduler_drops_cancelled_waiting_requests():
    sched = Scheduler(n_slots=1, n_batch=4)
    a, b = _seq(2), _seq(2)
    sched.add(a), sched.add(b)
    sched.schedule()
    b.cancelled = True
    assert sched.remove_finished() == [b] and sched.n_waiting == 0


# ---- engine on the default model -----------------------------------------------------------

def test_batched_decode_gives_the_tokens_of_decoding_alone(fast_model):
    alone = [fast_model.generate(p, GREEDY) for p in PROMPTS]
    engine = Engine(fast_model, n_slots=4, slot_ctx=1024, n_batch=512)
    seqs, outs = run_all(engine, PROMPTS)
    for a, seq, out in zip(alone, seqs, outs):
        assert seq.generated == a.token_ids
        assert out.text == a.text and out.finish == a.finish_reason
    assert engine.totals.n_decode_steps < engine.totals.n_decode_tokens / 2  # rows really were batched


@pytest.mark.parametrize("folder, quant", [("gemma4-tiny-moe", "Q4_0"), ("gemma4-tiny-ple", "Q4_K_M")])
def test_batched_decode_of_gemma4_moe_and_ple_gives_the_tokens_of_decoding_alone(folder, quant):
    from turbollm import Model
    model = Model.load(REFERENCE_DIR / folder / f"{folder}-{quant}.gguf", ctx_size=512)
    alone = [model.generate(p, GREEDY).token_ids for p in PROMPTS[:4]]
    seqs, _ = run_all(Engine(model, n_slots=4, slot_ctx=256), PROMPTS[:4])
    assert [s.generated for s in seqs] == alone


def test_a_prompt_fed_in_chunks_between_decode_steps_gives_the_same_tokens(fast_model):
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "banana", "cherry", "plum"] * 20) + ". The"
    ids = fast_model.encode(long_prompt)
    assert len(ids) > 2 * 64
    chunked = Engine(fast_model, n_slots=2, slot_ctx=1024, n_batch=64)
    short = Collector()
    chunked.submit(fast_model.encode("Once upon a time"), SamplingParams(temperature=0, max_tokens=40), short)
    chunked.step(), chunked.step()  # the short one is decoding when the long one arrives
    seqs, _ = run_all(chunked, [long_prompt])
    # the same chunks alone: prompt tokens in [0, 64), [64, 128), ... as the engine fed them
    cache = fast_model.network.new_cache(len(ids) + GREEDY.max_tokens, fast_model.cache)
    for start in range(0, len(ids), 64):
        hidden = fast_model.network.forward(torch.tensor(ids[start:start + 64]), cache)
    expected, logits = [], fast_model.network.logits(hidden[-1:])[0]
    for _ in range(len(seqs[0].generated)):
        token = int(torch.argmax(logits))
        expected.append(token)
        logits = fast_model.network.logits(fast_model.network.forward(torch.tensor([token]), cache))[0]
    assert seqs[0].generated == expected


def test_cancelling_frees_the_slot_at_the_next_step(fast_model):
    engine = Engine(fast_model, n_slots=1, slot_ctx=1024)
    first, second = Collector(), Collector()
    a = engine.submit(fast_model.encode("Once upon a time"), SamplingParams(temperature=0, max_tokens=500), first)
    b = engine.submit(fast_model.encode("The capital of France is"), SamplingParams(temperature=0, max_tokens=3), second)
    for _ in range(3):
        engine.step()
    assert a.state is SeqState.DECODE and b.state is SeqState.WAITING and engine.kv_bytes_in_use > 0
    engine.cancel(a)
    engine.step()
    assert a.is_finished and first.finish == "cancelled" and a.cache is None
    assert engine.scheduler.running == [b]
    while not b.is_finished:
        engine.step()
    assert second.finish == "length" and len(b.generated) == 3


def test_stop_strings_end_the_sequence_and_are_not_returned(fast_model):
    full = fast_model.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20)).text
    assert " 7," in full
    engine = Engine(fast_model, n_slots=2, slot_ctx=512)
    (seq,), (out,) = run_all(engine, ["1, 2, 3, 4,"], SamplingParams(temperature=0, max_tokens=20, stop=(" 7,",)))
    assert out.text == full[:full.index(" 7,")] and out.finish == "stop"


def test_requests_that_do_not_fit_a_slot_are_refused_before_queueing(fast_model):
    engine = Engine(fast_model, n_slots=2, slot_ctx=64)
    ids = list(range(10, 74))
    with pytest.raises(ContextLengthError, match="64 tokens but a slot's context is 64"):
        engine.submit(ids, GREEDY, Collector())
    with pytest.raises(ContextLengthError, match="ask for at most 44 tokens"):
        engine.submit(ids[:20], SamplingParams(max_tokens=45), Collector())
    assert engine.n_waiting == 0


def test_a_failing_step_ends_its_requests_with_the_error_and_the_engine_goes_on(fast_model, monkeypatch):
    engine = Engine(fast_model, n_slots=1, slot_ctx=256)
    broken = Collector()
    engine.submit(fast_model.encode("Hello"), GREEDY, broken)
    monkeypatch.setattr(engine.network, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    assert broken.finish == "error" and "boom" in broken.events[-1].error
    monkeypatch.undo()
    (seq,), (out,) = run_all(engine, ["Hello"])
    assert out.finish == "length" and len(seq.generated) == GREEDY.max_tokens


def test_the_engine_thread_serves_submissions_until_stopped(fast_model):
    import threading
    engine = Engine(fast_model, n_slots=2, slot_ctx=512).start()
    try:
        done, outs = threading.Semaphore(0), []
        for p in PROMPTS[:3]:
            out = Collector()
            outs.append(out)
            engine.submit(fast_model.encode(p), GREEDY, lambda ev, out=out: (out(ev), ev.finish_reason and done.release()))
        for _ in outs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert [o.text for o in outs] == [fast_model.generate(p, GREEDY).text for p in PROMPTS[:3]]


# ---- the reasoning / answer split (Gemma 4 channel tokens) ----------------------------------

@pytest.fixture(scope="module")
def gemma4_tokenizer():
    from turbollm.gguf.reader import GGUFFile
    from turbollm.text.tokenizer import Tokenizer
    return Tokenizer.from_metadata(GGUFFile(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf").metadata)


def _split(tokenizer, text: str, stops=()) -> tuple[str, str, bool]:
    out = OutputText(tokenizer, stops)
    pieces = []
    for token in tokenizer.encode(text, add_special=False, parse_special=True):
        pieces += out.push(token)
        if out.stopped:
            break
    pieces += out.flush()
    return ("".join(t for c, t in pieces if c == "reasoning"), "".join(t for c, t in pieces if c == "content"), out.stopped)


def test_thought_channel_goes_to_reasoning_and_the_rest_to_content(gemma4_tokenizer):
    reasoning, content, _ = _split(gemma4_tokenizer, "<|channel>thought\nThe user wants a number.<channel|>The answer is 4.")
    assert reasoning == "The user wants a number." and content == "The answer is 4."
    assert _split(gemma4_tokenizer, "No thinking here.") == ("", "No thinking here.", False)
    # an empty thought channel (thinking turned off) leaves only the answer
    assert _split(gemma4_tokenizer, "<|channel>thought\n<channel|>Four.") == ("", "Four.", False)


def test_stop_strings_apply_to_the_answer_not_the_thoughts(gemma4_tokenizer):
    reasoning, content, stopped = _split(gemma4_tokenizer, "<|channel>thought\nsay STOP later<channel|>one STOP two", ("STOP",))
    assert reasoning == "say STOP later" and content == "one " and stopped


def test_a_model_without_channel_tokens_only_has_content(fast_model):
    out = OutputText(fast_model.tokenizer)
    ids = fast_model.tokenizer.encode("<|channel>thought\nhello", add_special=False)
    text = "".join(t for token in ids for c, t in out.push(token)) + "".join(t for c, t in out.flush())
    assert text == "<|channel>thought\nhello"


# ---- what a chat request asks of the template ----------------------------------------------

def _chat(**body):
    from turbollm.server.schemas import ChatCompletionRequest
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **body})


def test_thinking_follows_the_request_then_the_server_default():
    assert _chat().thinking(default=True) and not _chat().thinking(default=False)
    assert not _chat(messages=[{"role": "user", "content": "/no_think what is 2+2?"}]).thinking(default=True)
    assert not _chat(chat_template_kwargs={"enable_thinking": False}).thinking(default=True)
    assert _chat(chat_template_kwargs={"enable_thinking": True}).thinking(default=False)
    assert not _chat(reasoning={"enabled": False}).thinking(default=True)
    assert not _chat(reasoning={"effort": "none"}).thinking(default=True)
    assert not _chat(reasoning_effort="none").thinking(default=True)
    assert _chat(reasoning_effort="high").thinking(default=False)


def test_old_thoughts_never_reach_the_template():
    body = _chat(messages=[
        {"role": "user", "content": "/no_think  what is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nadd them<channel|>4", "reasoning_content": "add them"},
        {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}]},
    ])
    assert body.template_messages() == [{"role": "user", "content": "what is 2+2?"},
                                        {"role": "assistant", "content": "4"},
                                        {"role": "user", "content": "and 3+3?"}]


def test_gemma4_prompt_opens_or_closes_the_thought_channel():
    from turbollm import Model
    model = Model.load(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf", ctx_size=512)
    messages = [{"role": "user", "content": "hi"}]
    on, off = model.chat_prompt(messages, enable_thinking=True), model.chat_prompt(messages, enable_thinking=False)
    assert on == "<|turn>system\n<|think|><turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"
    assert off == "<|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"

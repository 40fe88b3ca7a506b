"""The LLM engine (kernel/llm/) in-process, with the real model (conftest's ``model_path``): generation,
batching, streaming, stop sequences, sampling, JSON-schema-constrained output, cancellation, queueing, limits
and errors as docs/abi.md section 4 (llm.generate) states; then llm.cancel, json_schema and model through the
real kernel and real agent processes."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from agentproc.errors import ENOENT
from kernel.llm import Engine, EngineError, Engines, SamplingParams
from kernel.llm import engine as engine_mod
from kernel.llm.text import Detokenizer
from kernel.testing import TEST_CONFIG, KernelProc

N_SEQ_MAX = 4
N_CTX_SEQ = 1024
WAIT_S = 60
# Continuations the model is sure of: batching moves logits slightly (kernel/llm/engine.py docstring), so exact
# equality with a solo run is only a property of greedy choices won by a clear margin.  Each still needs the
# right prompt, positions and KV of its own sequence.
CONFIDENT_PROMPTS = ["January, February, March,", "A, B, C, D, E,", "one, two, three, four,",
                     "The theory of relativity says"]


@dataclass
class Outcome:
    """Everything the sink said about one request."""

    chunks: list[str] = field(default_factory=list)
    done: dict | None = None
    error: EngineError | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        assert self.error is None, f"request failed: {self.error!r}"
        assert self.done is not None
        return self.done["text"]


class Sink:
    """The engine's sink: records events per request and checks that done/error comes once, last."""

    def __init__(self):
        self._lock = threading.Lock()
        self._outcomes: dict[int, Outcome] = {}

    def outcome(self, req) -> Outcome:
        with self._lock:
            return self._outcomes.setdefault(req.id, Outcome())

    def __call__(self, events):
        """The engine hands over one step's events at a time."""
        for req, kind, payload in events:
            self.event(req, kind, payload)

    def event(self, req, kind, payload):
        out = self.outcome(req)
        assert not out.finished.is_set(), f"event {kind} after the request ended"
        if kind == "chunk":
            assert req.stream and payload["text"], "chunks only when streaming, never empty"
            out.chunks.append(payload["text"])
            return
        if kind == "done":
            out.done = payload
        else:
            assert kind == "error" and isinstance(payload, EngineError)
            out.error = payload
        out.finished.set()


@pytest.fixture(scope="module")
def sink():
    return Sink()


@pytest.fixture(scope="module")
def engine(sink, model_path):
    eng = Engine(model_path, sink, n_ctx_seq=N_CTX_SEQ, n_seq_max=N_SEQ_MAX, n_threads=2)
    eng.start()
    yield eng
    eng.close()


def submit(engine, sink, prompt, stream=False, owner=None, **params):
    """Submit as ``owner``; by default a new owner each time, so that no request reuses another's cached prefix
    (prefix reuse changes the shape of the prefill, see kernel/llm/engine.py's docstring)."""
    req = engine.submit(prompt, SamplingParams(**params), stream=stream, owner=owner if owner else object())
    return req, sink.outcome(req)


def wait(out: Outcome) -> Outcome:
    assert out.finished.wait(WAIT_S), "the request did not finish in time"
    return out


def generate(engine, sink, prompt, stream=False, **params) -> Outcome:
    return wait(submit(engine, sink, prompt, stream=stream, **params)[1])


def wait_idle(engine):
    deadline = time.monotonic() + WAIT_S
    while engine.stats()["active"] or engine.stats()["waiting"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)


# ---- generation ---------------------------------------------------------------------------------------------


def test_greedy_generation_stops_at_max_tokens_with_usage(engine, sink):
    out = generate(engine, sink, "The capital of France is", max_tokens=8)
    assert out.text.strip()
    assert out.done["finish_reason"] == "length"
    assert out.done["usage"] == {"prompt_tokens": len(engine.tokenize("The capital of France is")),
                                 "completion_tokens": 8, "cached_tokens": 0}
    assert engine.tokenize("The capital of France is")[0] == engine.tokenize("")[0]  # BOS first


def test_batched_equals_unbatched(engine, sink):
    alone = [generate(engine, sink, p, max_tokens=16).text for p in CONFIDENT_PROMPTS]
    assert "April, May" in alone[0] and "F, G" in alone[1]
    outs = [submit(engine, sink, p, max_tokens=16)[1] for p in CONFIDENT_PROMPTS]
    together = [wait(o).text for o in outs]
    assert together == alone
    assert len(set(alone)) == len(alone)


def test_stream_chunks_concatenate_to_the_text(engine, sink):
    out = generate(engine, sink, "Once upon a time", stream=True, max_tokens=32)
    assert len(out.chunks) > 1
    assert "".join(out.chunks) == out.text
    assert out.text == generate(engine, sink, "Once upon a time", max_tokens=32).text


def test_multibyte_characters_are_never_split(engine, sink):
    out = generate(engine, sink, "日本の首都は東京です。中国の首都は", stream=True, max_tokens=24)
    assert any(ord(c) > 0x7F for c in out.text), out.text  # the prompt did produce non-ASCII text
    assert "\ufffd" not in out.text
    assert "".join(out.chunks) == out.text


def test_stop_sequence_truncates_before_its_first_occurrence(engine, sink):
    free = generate(engine, sink, "The capital of France is", max_tokens=32).text
    stop = free[len(free) // 2 : len(free) // 2 + 4]  # seen in the unconstrained output: cannot pass vacuously
    assert len(stop) == 4
    expected = free[: free.index(stop)]
    out = generate(engine, sink, "The capital of France is", stream=True, max_tokens=32,
                   stop=["never appears in this text", stop])
    assert out.text == expected
    assert out.done["finish_reason"] == "stop"
    assert "".join(out.chunks) == expected  # the held-back start of the stop string was never streamed
    assert 0 < out.done["usage"]["completion_tokens"] < 32


def test_seeded_sampling_is_reproducible(engine, sink):
    params = dict(max_tokens=24, temperature=0.8, seed=42)
    first = generate(engine, sink, "My favourite food is", **params).text
    second = generate(engine, sink, "My favourite food is", **params).text
    assert first == second
    others = {generate(engine, sink, "My favourite food is", max_tokens=24, temperature=0.8, seed=s).text
              for s in (1, 2, 3)}
    assert others - {first}, "different seeds should give some different text"


def test_generation_ends_with_length_at_the_end_of_the_sequence_context(engine, sink):
    word = engine.tokenize(" word", add_bos=False)[0]
    prompt = engine.tokenize("") + [word] * (N_CTX_SEQ - 2)  # one token short of the per-sequence context
    out = generate(engine, sink, prompt, max_tokens=100)
    assert out.done["finish_reason"] == "length"
    assert out.done["usage"] == {"prompt_tokens": N_CTX_SEQ - 1, "completion_tokens": 1, "cached_tokens": 0}


# ---- scheduling, cancellation ---------------------------------------------------------------------------------


def test_more_requests_than_sequences_all_complete(engine, sink):
    outs = [submit(engine, sink, f"Item number {i} on the list is", max_tokens=4)[1] for i in range(3 * N_SEQ_MAX)]
    stats = engine.stats()
    assert stats["active"] <= N_SEQ_MAX
    assert stats["waiting"] >= 1  # queued, not dropped
    for out in outs:
        assert wait(out).done["usage"]["completion_tokens"] == 4
    wait_idle(engine)


def test_cancel_reports_ecanceled_and_frees_the_slot(engine, sink):
    long = [submit(engine, sink, "1, 2, 3, 4, 5,", stream=True, owner="counter", max_tokens=1000)
            for _ in range(N_SEQ_MAX)]
    queued_req, queued = submit(engine, sink, "The capital of France is", max_tokens=4)
    deadline = time.monotonic() + WAIT_S
    while not long[0][1].chunks:  # the first one is generating
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not queued.finished.is_set()  # every sequence is busy
    assert engine.cancel(long[0][0]) is True
    assert wait(long[0][1]).error.code == "ECANCELED"
    assert engine.cancel(long[0][0]) is False  # already over
    assert wait(queued).done["finish_reason"] == "length"  # got the freed sequence
    assert engine.cancel(queued_req) is False
    assert engine.cancel_owner("counter") == N_SEQ_MAX - 1
    for _, out in long[1:]:
        assert wait(out).error.code == "ECANCELED"
    wait_idle(engine)


def test_cancel_a_waiting_request(engine, sink):
    busy = [submit(engine, sink, "1, 2, 3,", owner="busy", max_tokens=1000) for _ in range(N_SEQ_MAX)]
    req, out = submit(engine, sink, "Never admitted", max_tokens=4)
    assert engine.cancel(req) is True
    assert wait(out).error.code == "ECANCELED"
    assert engine.cancel_owner("busy") == N_SEQ_MAX
    for _, o in busy:
        assert wait(o).error.code == "ECANCELED"
    wait_idle(engine)


def test_a_failing_decode_fails_its_requests_and_the_engine_goes_on(engine, sink, monkeypatch):
    real = engine_mod.llama_cpp.llama_decode
    calls = []

    def fail_once(ctx, batch):
        calls.append(1)
        return -3 if len(calls) == 1 else real(ctx, batch)

    monkeypatch.setattr(engine_mod.llama_cpp, "llama_decode", fail_once)
    failed = generate(engine, sink, "The capital of France is", max_tokens=4)
    assert failed.error is not None and failed.error.code == "EIO"
    assert generate(engine, sink, "The capital of France is", max_tokens=4).done["finish_reason"] == "length"


def test_idle_engine_uses_no_cpu(engine):
    wait_idle(engine)
    proc = psutil.Process()
    before = sum(proc.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(proc.cpu_times()[:2]) - before < 0.05


# ---- chat ------------------------------------------------------------------------------------------------------


def test_render_chat_uses_the_gemma_turns(engine, sink):
    text = engine.render_chat([{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "What is the capital of France?"},
                               {"role": "assistant", "content": "Paris."},
                               {"role": "user", "content": "And of Italy?"}])
    assert text.startswith("<start_of_turn>user\nAnswer briefly.")
    assert "<end_of_turn>\n<start_of_turn>model\nParis.<end_of_turn>" in text
    assert text.endswith("<start_of_turn>user\nAnd of Italy?<end_of_turn>\n<start_of_turn>model\n")
    out = generate(engine, sink, text, max_tokens=16)
    assert out.done["finish_reason"] in ("stop", "length")
    assert "<end_of_turn>" not in out.text


def test_render_chat_rejects_unknown_roles(engine):
    with pytest.raises(EngineError) as err:
        engine.render_chat([{"role": "tool", "content": "x"}])
    assert err.value.code == "EINVAL"
    with pytest.raises(EngineError) as err:
        engine.render_chat([])
    assert err.value.code == "EINVAL"


# ---- limits and errors -----------------------------------------------------------------------------------------


def test_prompt_longer_than_the_sequence_context_is_e2big(engine):
    with pytest.raises(EngineError) as err:
        engine.submit("word " * 2000, SamplingParams())
    assert err.value.code == "E2BIG"
    assert f"{N_CTX_SEQ}" in str(err.value)
    with pytest.raises(EngineError) as err:  # exactly n_ctx_seq tokens leave no room for one more
        engine.submit([2] * N_CTX_SEQ, SamplingParams())
    assert err.value.code == "E2BIG"


@pytest.mark.parametrize("params", [
    dict(max_tokens=-1), dict(max_tokens=0), dict(max_tokens=4097), dict(top_p=0), dict(top_p=1.5),
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-1), dict(seed=-1), dict(stop=[""]),
    dict(stop=["x"] * 9), dict(max_tokens=True),
])
def test_invalid_params_are_einval(engine, params):
    with pytest.raises(EngineError) as err:
        engine.submit("Hello", SamplingParams(**params))
    assert err.value.code == "EINVAL"


def test_invalid_token_ids_are_einval(engine):
    for prompt in ([], [-1], [10**9]):
        with pytest.raises(EngineError) as err:
            engine.submit(prompt, SamplingParams())
        assert err.value.code == "EINVAL"


def test_stats_count_the_work(engine, sink, model_path):
    before = engine.stats()
    generate(engine, sink, "Water boils at", max_tokens=5)
    after = engine.stats()
    assert after["tokens_generated"] - before["tokens_generated"] == 5
    assert after["prompt_tokens"] - before["prompt_tokens"] == len(engine.tokenize("Water boils at"))
    assert after["steps"] > before["steps"]
    assert engine.model_name == Path(model_path).name
    # The profile (docs/engine.md, "Profile"): every step's decode time and tokens land in one kind of batch.
    steps = sum(after[f"decode_steps_{k}"] - before[f"decode_steps_{k}"] for k in ("decode", "prefill", "mixed"))
    assert steps == after["steps"] - before["steps"]
    assert after["tokens_decode"] - before["tokens_decode"] == 4  # 5 sampled, the last never fed back
    assert after["tokens_prefill"] - before["tokens_prefill"] == len(engine.tokenize("Water boils at"))
    assert after["batch_rows"] - before["batch_rows"] == steps
    assert after["requests_started"] - before["requests_started"] == 1 and after["queued_s"] >= before["queued_s"]


# ---- life cycle (own engines) ----------------------------------------------------------------------------------


def test_start_fails_with_eio_for_a_missing_model(tmp_path):
    eng = Engine(str(tmp_path / "missing.gguf"), Sink())
    with pytest.raises(EngineError) as err:
        eng.start()
    assert err.value.code == "EIO" and "missing.gguf" in str(err.value)
    eng.close()


def test_close_cancels_pending_requests_and_is_idempotent(model_path):
    sink = Sink()
    eng = Engine(model_path, sink, n_ctx_seq=256, n_seq_max=1, n_threads=2, n_batch=32)
    eng.start()
    running = eng.submit("1, 2, 3,", SamplingParams(max_tokens=200))
    waiting = eng.submit("4, 5, 6,", SamplingParams(max_tokens=200))
    eng.close()
    for req in (running, waiting):
        assert sink.outcome(req).error.code == "ECANCELED"
    eng.close()
    with pytest.raises(EngineError) as err:
        eng.submit("x", SamplingParams())
    assert err.value.code == "ECANCELED"


# ---- Detokenizer (no model) -------------------------------------------------------------------------------------


def feed_all(stream: Detokenizer, pieces: list[bytes]) -> list[str]:
    out = [stream.feed(p) for p in pieces]
    if not stream.stopped:
        out.append(stream.finish())
    return out


def test_text_stream_holds_back_a_possible_stop_string():
    s = Detokenizer(["END"])
    assert s.feed(b"abc E") == "abc "  # "E" could start "END"
    assert s.feed(b"N") == ""
    assert s.feed(b"X") == "ENX"  # it did not
    assert s.feed(b" then END and more") == " then "
    assert s.stopped and s.text == "abc ENX then "


def test_text_stream_cuts_at_the_earliest_of_several_stops():
    s = Detokenizer(["world", "lo w"])
    chunks = feed_all(s, [b"hel", b"lo", b" wor", b"ld"])
    assert s.text == "hel" and "".join(chunks) == "hel"


def test_text_stream_decodes_utf8_split_across_tokens():
    data = "é日".encode()
    s = Detokenizer([])
    chunks = feed_all(s, [data[i : i + 1] for i in range(len(data))])
    assert "".join(chunks) == "é日" and all("\ufffd" not in c for c in chunks)
    broken = Detokenizer([])
    assert "".join(feed_all(broken, [b"a", "日".encode()[:2]])) == "a\ufffd"


# ---- JSON-schema-constrained output, several models ------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def check_person(text: str) -> None:
    doc = json.loads(text)
    assert set(doc) == {"name", "age"}, doc
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 24
    assert isinstance(doc["age"], int) and not isinstance(doc["age"], bool)


def test_json_schema_constrains_the_output(engine, sink):
    free = generate(engine, sink, "Here is a person:", max_tokens=24).text
    with pytest.raises(ValueError):
        json.loads(free)  # unconstrained, the model does not write this JSON by itself: the grammar did
    out = generate(engine, sink, "Here is a person:", max_tokens=64, json_schema=PERSON)
    check_person(out.text)
    assert out.done["finish_reason"] == "stop"  # the grammar completed, then only end-of-generation was allowed
    seeded = generate(engine, sink, "A person:", max_tokens=64, json_schema=PERSON, temperature=1.0, seed=3)
    check_person(seeded.text)


def test_an_unusable_json_schema_is_einval(engine):
    for schema in ({"type": "nonsense"}, {"$ref": "#/missing"}, ["not", "a", "map"]):
        with pytest.raises(EngineError) as err:
            engine.submit("x", SamplingParams(json_schema=schema))
        assert err.value.code == "EINVAL" and "json_schema" in str(err.value)


def test_engines_route_by_model_name(engine, sink):
    engines = Engines({"default": engine, "other": engine})
    req = engines.submit("January, February,", SamplingParams(max_tokens=3), model="other", owner=object())
    assert wait(sink.outcome(req)).done["usage"]["completion_tokens"] == 3
    assert engines.get(None) is engine and engines.tokenize("x", model="other") == engine.tokenize("x")
    with pytest.raises(EngineError) as err:
        engines.submit("x", SamplingParams(), model="gpt-5")
    assert err.value.code == "ENOENT" and "default, other" in str(err.value)


# ---- through the kernel and real agents (docs/abi.md 4: llm.cancel, json_schema, model) -------------------------


def test_an_agent_cancels_its_own_generation_with_llm_cancel(kernel):
    rec, out = kernel.run("""
        from agentproc.client import default
        c = default()
        rid = c.send("llm.generate", {"prompt": "Write a very long story:", "max_tokens": 2000, "stream": True})
        print("FIRST", "seq" in c.next_message(rid))
        print("CANCEL", c.call("llm.cancel", {"id": rid})["cancelled"])
        msg = c.next_message(rid)
        while "seq" in msg:
            msg = c.next_message(rid)
        print("REPLY", msg["ok"], msg["error"]["code"])
        print("AGAIN", c.call("llm.cancel", {"id": rid})["cancelled"])
        print("DONE", c.call("llm.generate", {"prompt": "Hi", "max_tokens": 2})["usage"]["completion_tokens"])
    """)
    assert rec["exit_status"] == 0, out
    assert "FIRST True" in out and "CANCEL True" in out and "REPLY False ECANCELED" in out
    assert "AGAIN False" in out and "DONE 2" in out
    # Requests are named per connection: nobody else can cancel them, and an unknown id cancels nothing.
    assert kernel.client.call("llm.cancel", {"id": 1}) == {"cancelled": False}


def test_an_agent_gets_json_matching_its_schema(kernel):
    rec, out = kernel.run(f"""
        import json
        from agentproc import llm
        c = llm.generate("Here is a person:", json_schema={PERSON!r}, max_tokens=64)
        print("JSON", json.dumps(c.text), c.finish_reason, c.usage["completion_tokens"])
        try:
            llm.generate("x", json_schema={{"type": "nonsense"}})
        except Exception as exc:
            print("BAD", type(exc).__name__)
    """)
    assert rec["exit_status"] == 0, out
    line = out.split("JSON ", 1)[1].splitlines()[0]
    text, reason = json.JSONDecoder().raw_decode(line)[0], line.rsplit(" ", 2)[1]
    check_person(text)
    assert reason == "stop" and "BAD EINVAL" in out


def test_a_second_model_is_served_by_name(tmp_path, model_path):
    config = TEST_CONFIG + f'\n[models.second]\npath = "{model_path}"\nn_seq_max = 2\n'
    k = KernelProc(tmp_path, config)
    try:
        args = {"prompt": "January, February, March,", "max_tokens": 6}
        second = k.client.call("llm.generate", dict(args, model="second"))
        default = k.client.call("llm.generate", dict(args, model="default"))
        assert second["text"] == default["text"] and "April" in second["text"]
        chat = k.client.call("llm.chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                          "model": "second"})
        assert chat["usage"]["completion_tokens"] >= 1
        with pytest.raises(ENOENT, match="default, second"):
            k.client.call("llm.generate", dict(args, model="third"))
    finally:
        k.stop()

"""Time and memory the engine spends for an agent beyond its syscall's own cost (docs/sandbox.md, "Threat model"):
tokenizing a huge prompt must not stall the event loop, a long prompt's prefill must not stall another agent's
stream for whole batches, the engine time of grammar-constrained sampling and of preparing a request is
charged to its owner by the fair scheduler, not only its tokens, and one agent's one-off requests cannot fill
the swap budget that every agent's cached sessions share.

The engine cases run the real engine in-process on the real model; the event-loop case runs the real kernel.
"""
from __future__ import annotations

import threading
import time

import pytest

from kernel.llm import Engine, SamplingParams
from kernel.llm.slots import SESSIONS_PER_OWNER
from kernel.llm.scheduler import FairScheduler
from agentproc.errors import E2BIG
from kernel.testing import TEST_CONFIG, KernelProc
from tests.escape.conftest import attack, kill, neighbour_of, wait_output
from tests.test_engine import Sink, wait

pytestmark = pytest.mark.timeout(180)

PREFILL_CHUNK = 16
LONG_PROMPT = "The history of the world, told in many small parts. " * 40  # ~440 tokens


class RecordingFair(FairScheduler):
    """The fair policy, on a clock that never moves (no decay), recording every charge by owner: whole tokens
    fed (ints) apart from engine time converted to tokens (floats)."""

    def __init__(self):
        super().__init__(clock=lambda: 0.0)
        self.tokens: dict = {}
        self.time: dict = {}

    def charge(self, req, tokens) -> None:
        book = self.tokens if isinstance(tokens, int) else self.time
        book[req.owner] = book.get(req.owner, 0) + tokens
        super().charge(req, tokens)


@pytest.fixture(scope="module")
def policy():
    return RecordingFair()


@pytest.fixture(scope="module")
def sink():
    return Sink()


@pytest.fixture(scope="module")
def engine(sink, model_path, policy):
    eng = Engine(model_path, sink, n_ctx_seq=1024, n_seq_max=4, n_batch=256, n_threads=2, scheduler=policy,
                 prefill_chunk=PREFILL_CHUNK)
    eng.start()
    yield eng
    eng.close()


def test_a_long_prefill_is_chunked_while_another_agent_streams(engine, sink):
    """While the victim streams, the attacker's prompt enters at most PREFILL_CHUNK tokens a step, so the victim
    gets a token every step of it (whole n_batch steps would give it ~2 tokens over the whole prefill)."""
    victim = engine.submit("Once upon a time", SamplingParams(max_tokens=200), owner="victim", stream=True)
    v = sink.outcome(victim)
    deadline = time.monotonic() + 30
    while len(v.chunks) < 2:
        assert time.monotonic() < deadline and not v.finished.is_set(), "the victim never streamed"
        time.sleep(0.005)
    n_prompt = len(engine.tokenize(LONG_PROMPT))
    assert n_prompt > 20 * PREFILL_CHUNK
    before = len(v.chunks)
    attacker = wait(sink.outcome(engine.submit(LONG_PROMPT, SamplingParams(max_tokens=1), owner="attacker")))
    during = len(v.chunks) - before
    assert attacker.done["usage"]["prompt_tokens"] == n_prompt
    assert during >= 0.8 * n_prompt / PREFILL_CHUNK, (during, n_prompt)
    engine.cancel(victim)
    wait(v)


def test_grammar_sampling_and_preparation_are_charged_to_their_owner(engine, sink, policy):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "tags"]}
    constrained = engine.submit("A JSON record:", SamplingParams(max_tokens=48, json_schema=schema),
                                owner="grammar")
    plain = engine.submit("A JSON record:", SamplingParams(max_tokens=48), owner="plain")
    wait(sink.outcome(constrained))
    wait(sink.outcome(plain))
    assert policy.tokens["grammar"] > 0 and policy.tokens["plain"] > 0
    # Engine time beyond the tokens: building and parsing the grammar, sampling under it.
    assert policy.time.get("grammar", 0) > 0
    assert policy.time["grammar"] > policy.time.get("plain", 0)
    assert policy.service("grammar") == pytest.approx(policy.tokens["grammar"] + policy.time["grammar"])


BIG_PROMPTS = """
import json, msgpack, time
from agentproc import client
sock = client.default().sock
prompt = "word " * ((2 << 20) // 5)  # 2 MiB: ~0.4 M tokens, far past the context (E2BIG once tokenized)
for i in range(4):
    sock.send(msgpack.packb({"v": 1, "id": i + 1, "call": "llm.generate",
                             "args": {"prompt": prompt, "max_tokens": 1}}))
codes = []
while len(codes) < 4:
    reply = msgpack.unpackb(sock.recv())
    codes.append((reply.get("error") or {}).get("code", "ok"))
print("codes", json.dumps(codes), flush=True)
"""


@pytest.fixture(scope="module")
def big_kernel(tmp_path_factory, model_path):
    """A kernel that takes 4 MiB frames, so that an agent may send prompts that cost seconds to tokenize."""
    kernel = KernelProc(tmp_path_factory.mktemp("big"), TEST_CONFIG.replace("max_frame = 65536",
                                                                             "max_frame = 4194304"))
    yield kernel
    kernel.stop()


def test_tokenizing_huge_prompts_does_not_stall_the_event_loop(big_kernel):
    """Four 2 MiB prompts cost the kernel seconds of tokenizing; the event loop must not wait for any of it."""
    kernel = big_kernel
    with neighbour_of(kernel) as neighbour:
        worst, done, client = [0.0], threading.Event(), kernel.new_client()  # a socket for this thread

        def ping():
            while not done.is_set():
                t = time.perf_counter()
                client.call("sys.ping")
                worst[0] = max(worst[0], time.perf_counter() - t)
                time.sleep(0.01)

        pinger = threading.Thread(target=ping)
        pinger.start()
        try:
            rec, _, out = attack(kernel, BIG_PROMPTS, timeout=120)
        finally:
            done.set()
            pinger.join(10)
        assert 'codes ["E2BIG", "E2BIG", "E2BIG", "E2BIG"]' in out, out
        assert worst[0] < 1.0, f"sys.ping waited {worst[0]:.2f} s while the kernel tokenized"
        neighbour.assert_unharmed()


CANCEL_IN_PREPARATION = BIG_PROMPTS.replace("codes = []", """sock.send(msgpack.packb({"v": 1, "id": 9, "call": "llm.cancel", "args": {"id": 4}}))
codes = []""").replace("while len(codes) < 4:", "while len(codes) < 5:")


def test_a_request_still_being_prepared_can_be_cancelled(big_kernel):
    """Request 4 waits behind three seconds-long preparations when the agent cancels it: it ends ECANCELED at
    once, the cancel answers ok, the three others run."""
    rec, _, out = attack(big_kernel, CANCEL_IN_PREPARATION, timeout=120)
    assert out.count("ECANCELED") == 1 and out.count("E2BIG") == 3 and '"ok"' in out, out


QUEUE_AND_EXIT = BIG_PROMPTS.replace("range(4)", "range(8)").replace(
    "codes = []", "time.sleep(0.3); print('queued', flush=True); os._exit(0)\ncodes = []")


def test_an_ended_agents_preparations_are_dropped(big_kernel):
    """An agent queues seconds of tokenizing and exits: the kernel drops what has not started, so a neighbour's
    generation is not kept waiting behind the dead agent's work."""
    client = big_kernel.client
    t = time.monotonic()
    with pytest.raises(E2BIG):
        client.call("llm.generate", {"prompt": "word " * ((2 << 20) // 5), "max_tokens": 1})
    one = time.monotonic() - t  # one such preparation, measured in this run
    with neighbour_of(big_kernel) as neighbour:
        rec, _, out = attack(big_kernel, "import os\n" + QUEUE_AND_EXIT, timeout=60)
        assert "queued" in out, out
        t = time.monotonic()
        reply = client.call("llm.generate", {"prompt": "Hello", "max_tokens": 2})
        assert reply["usage"]["completion_tokens"] == 2
        waited = time.monotonic() - t
        assert waited < 3 * one + 0.5, (waited, one)  # behind at most the one that had started, not all eight
        neighbour.assert_unharmed()


def test_one_agents_sessions_do_not_fill_the_shared_swap(engine, sink):
    """Every finished generation stays as a cached session of its owner; evicted, it becomes a snapshot in the
    swap budget all agents share.  A flood of one-off prompts from one owner keeps at most SESSIONS_PER_OWNER
    of them, and another owner's session survives it."""
    wait(sink.outcome(engine.submit("The victim's long-lived conversation begins here.",
                                    SamplingParams(max_tokens=2), owner="keeper")))
    for i in range(4 * engine.n_seq_max + SESSIONS_PER_OWNER):
        wait(sink.outcome(engine.submit(f"One-off prompt number {i} about {i * 7919}",
                                        SamplingParams(max_tokens=2), owner="flood")))
    sessions = engine._slots.sessions  # the engine thread is idle: the list is stable
    assert sum(s.owner == "flood" for s in sessions) <= SESSIONS_PER_OWNER
    assert any(s.owner == "keeper" for s in sessions) or any(s.owner == "keeper" for s in engine._slots.slots)


def test_a_session_dropped_while_making_room_for_its_own_reuse_is_prefilled(engine, sink):
    """The owner's new request reuses its oldest evicted session; making room evicts another of its idle slots,
    which takes the owner past SESSIONS_PER_OWNER and drops the very session being reused.  The request must
    prefill instead (it once failed with EIO: a kernel bug)."""
    first = "Alpha: the first of many distinct conversations about rivers, mountains and old roads."
    prompts = [first] + [f"Number {i} begins another unrelated story about {i * 31} ships." for i in
                         range(engine.n_seq_max + SESSIONS_PER_OWNER - 1)]
    for prompt in prompts:
        wait(sink.outcome(engine.submit(prompt, SamplingParams(max_tokens=1), owner="reuser")))
    assert any(s.owner == "reuser" and s.tokens[:8] == engine.tokenize(first)[:8] for s in engine._slots.sessions)
    out = wait(sink.outcome(engine.submit(first + " And then", SamplingParams(max_tokens=2), owner="reuser")))
    assert out.done is not None and out.done["usage"]["completion_tokens"] == 2, out.error


FLEET_ASKER = """
import sys, time
from agentproc import llm
system = "You are the fleet's shared assistant. Answer in one short sentence. " * 8
out = llm.chat([{"role": "system", "content": system}, {"role": "user", "content": sys.argv[2]}], max_tokens=4)
print("CACHED", out.usage["cached_tokens"], flush=True)
time.sleep(float(sys.argv[1]))  # an agent's cached KV lives while it does
"""


def test_prefix_sharing_stays_inside_its_fleet(tmp_path, model_path):
    """``share_prefix = "fleet"``: an agent reuses the cached prompt of another agent launched in its fleet, but
    an agent of another fleet, or of none, never does (the timing side channel stays inside the fleet), and an
    agent cannot choose its own fleet: only its spawner sets it."""
    k = KernelProc(tmp_path, TEST_CONFIG.replace("[llm]", '[llm]\nshare_prefix = "fleet"'))
    try:
        def run(fleet, delay, question):
            extra = {"fleet": fleet} if fleet else {}
            rec = k.client.call("proc.spawn", {"source": FLEET_ASKER, "name": f"asker-{fleet}", **extra,
                                               "argv": [str(delay), question]})
            return rec["id"]

        first = run("blue", 60, "Name a colour.")
        assert "CACHED 0" in wait_output(k, first, "CACHED")
        mate, stranger, loner = run("blue", 0, "Name a fruit."), run("red", 0, "Name a tree."), \
            run(None, 0, "Name a bird.")
        assert int(_done(k, mate).split("CACHED")[1]) > 50
        kill(k, first)
        assert "CACHED 0" in _done(k, stranger) and "CACHED 0" in _done(k, loner)
        assert k.record(mate)["fleet"] == "blue" and k.record(loner)["fleet"] is None
        rec, results, out = attack(k, """
from agentproc.client import default
attempt("spawn", lambda: default().call("proc.spawn", {"source": "print(1)", "fleet": "blue"}))
""", name="fleet-crasher")
        assert results["spawn"].startswith("DENIED EPERM"), out  # only operators (admin) spawn, fleets included
    finally:
        k.stop()


def _done(k, agent_id: int) -> str:
    rec = k.wait(agent_id, 60)
    out = k.output(agent_id)
    assert rec["exit_status"] == 0, out
    return out

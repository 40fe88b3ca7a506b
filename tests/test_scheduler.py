"""The scheduler (kernel/llm/scheduler.py): the policies on their own, then through the engine with the real model --
the active batch cap, round robin, the fair policy's preemption and priorities, and admission control when the
KV pool is full (queued, never dropped)."""
from __future__ import annotations

import threading
import time

import pytest

from kernel.llm import Engine, EngineError, SamplingParams
from kernel.llm.scheduler import FairScheduler, FifoScheduler, RoundRobinScheduler, make_scheduler, priority_weight
from tests.test_engine import WAIT_S, Sink, wait


class Req:
    """What a policy reads of a request."""

    _ids = iter(range(1, 10**6))

    def __init__(self, owner="a", priority=0):
        self.id = next(self._ids)
        self.owner = owner
        self.priority = priority

    def __repr__(self):
        return f"<Req {self.id} {self.owner}>"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


# ---- policies alone -------------------------------------------------------------------------------------------


def test_fifo_runs_the_oldest_and_never_preempts():
    p = FifoScheduler()
    reqs = [Req() for _ in range(5)]
    for r in reqs:
        p.add(r)
    assert p.pick(2, set()) == reqs[:2]
    for _ in range(10):
        p.charge(reqs[0], 100)
    assert p.pick(2, set(reqs[:2])) == reqs[:2]  # service does not matter
    p.remove(reqs[0])
    assert p.pick(2, set()) == reqs[1:3] and len(p) == 4


def test_round_robin_rotates_after_a_slice():
    p = RoundRobinScheduler(slice_tokens=4)
    a, b, c = Req(), Req(), Req()
    for r in (a, b, c):
        p.add(r)
    assert p.pick(2, set()) == [a, b]
    p.charge(a, 3)
    assert p.pick(2, set()) == [a, b]  # a has one token of its slice left
    p.charge(a, 1)
    p.charge(b, 4)
    assert p.pick(2, set()) == [c, a]  # both used their slices: to the back, in that order
    p.remove(c)
    assert p.pick(2, set()) == [a, b] and len(p) == 2


def test_fair_runs_the_least_served_owner_first():
    clock = Clock()
    p = FairScheduler(slice_tokens=8, halflife_s=60, clock=clock)
    busy1, busy2, quiet = Req("busy"), Req("busy"), Req("quiet")
    for r in (busy1, busy2):
        p.add(r)
    p.charge(busy1, 50)
    p.add(quiet)
    assert p.pick(1, {busy1}) == [quiet]  # 50 - 8 (hysteresis) > 0
    assert p.pick(3, set()) == [quiet, busy1, busy2]  # the same owner's requests: arrival order
    p.charge(quiet, 45)
    assert p.pick(1, {quiet}) == [quiet]  # 45 - 8 < 50: it keeps its place...
    p.charge(quiet, 15)
    assert p.pick(1, {quiet}) == [busy1]  # ...until it is a whole slice ahead (60 - 8 > 50)
    # Service is per owner: both of busy's requests count against it.
    p.charge(busy2, 100)
    assert p.service("busy") == 150


def test_fair_weights_service_by_priority():
    clock = Clock()
    p = FairScheduler(slice_tokens=1, clock=clock)
    admin, user = Req("admin", priority=10), Req("user", priority=0)
    p.add(admin), p.add(user)
    assert priority_weight(10) == 4 and priority_weight(0) == 1 and priority_weight(-5) == 0.5
    p.charge(admin, 300)
    p.charge(user, 100)
    assert p.pick(1, set()) == [admin]  # 300 / 4 < 100
    p.charge(admin, 200)
    assert p.pick(1, set()) == [user]  # 500 / 4 > 100


def test_fair_service_decays_so_nobody_starves():
    clock = Clock()
    p = FairScheduler(slice_tokens=1, halflife_s=10, clock=clock)
    old, new = Req("old"), Req("new")
    p.add(old)
    p.charge(old, 1000)
    p.add(new)
    p.charge(new, 100)
    assert p.pick(1, set()) == [new]
    clock.t += 40  # four half-lives: old's 1000 -> 62.5, new's 100 -> 6.25
    assert p.service("old") == pytest.approx(62.5)
    p.charge(new, 60)  # 66.25 > 62.5
    assert p.pick(1, set()) == [old]
    p.remove(old), p.remove(new)
    assert len(p) == 0


def test_make_scheduler_names():
    assert isinstance(make_scheduler("fifo"), FifoScheduler)
    assert make_scheduler("rr", rr_slice=7).slice == 7
    assert isinstance(make_scheduler("fair"), FairScheduler)
    with pytest.raises(ValueError, match="fifo, rr, fair"):
        make_scheduler("lottery")


# ---- through the engine ---------------------------------------------------------------------------------------


class Timeline(Sink):
    """A sink that also records when each request produced each chunk and when it ended."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[float, int, str]] = []

    def event(self, req, kind, payload):
        self.events.append((time.monotonic(), req.id, kind))
        super().event(req, kind, payload)

    def ended(self, req) -> float:
        return next(t for t, rid, kind in self.events if rid == req.id and kind != "chunk")

    def chunks_before(self, req, when: float) -> int:
        return sum(1 for t, rid, kind in self.events if rid == req.id and kind == "chunk" and t < when)


@pytest.fixture
def make_engine(model_path):
    engines = []

    def make(sink, **kw):
        kw.setdefault("n_threads", 1)
        kw.setdefault("n_ctx_seq", 512)
        kw.setdefault("n_batch", 256)
        eng = Engine(model_path, sink, **kw)
        eng.start()
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()


def go(engine, prompt, owner, stream=True, priority=0, **params):
    return engine.submit(prompt, SamplingParams(**params), owner=owner, stream=stream, priority=priority)


def test_the_active_batch_is_capped(make_engine):
    sink = Sink()
    eng = make_engine(sink, n_seq_max=4, max_active=2, scheduler="fifo")
    reqs = [go(eng, f"Count with me: {i},", owner=f"o{i}", max_tokens=24) for i in range(4)]
    seen_active = set()
    while not all(sink.outcome(r).finished.is_set() for r in reqs):
        seen_active.add(eng.stats()["active"])
        time.sleep(0.005)
    assert max(seen_active) == 2
    for r in reqs:
        assert wait(sink.outcome(r)).done["usage"]["completion_tokens"] == 24


def test_fifo_makes_a_short_request_wait_and_fair_does_not(make_engine):
    for policy in ("fifo", "fair"):
        sink = Timeline()
        eng = make_engine(sink, n_seq_max=2, max_active=1, scheduler=policy, rr_slice=4)
        long = go(eng, "Write a long story about a dragon:", owner="long", max_tokens=120)
        while sink.chunks_before(long, time.monotonic() + 1) < 5:  # the long one is under way
            time.sleep(0.005)
        short = go(eng, "The capital of France is", owner="short", max_tokens=4)
        wait(sink.outcome(short)), wait(sink.outcome(long))
        if policy == "fifo":
            assert sink.ended(long) < sink.ended(short)
        else:
            assert sink.ended(short) < sink.ended(long)
            assert sink.chunks_before(long, sink.ended(short)) < 60  # it came before most of the long one
        eng.close()


def test_fair_gives_a_higher_priority_owner_more_of_the_batch(make_engine):
    sink = Timeline()
    eng = make_engine(sink, n_seq_max=2, max_active=1, scheduler="fair", rr_slice=2)
    low = go(eng, "Once upon a time there was a", owner="low", priority=0, max_tokens=200)
    high = go(eng, "Once upon a time there lived a", owner="high", priority=10, max_tokens=48)
    wait(sink.outcome(high))
    done_at = sink.ended(high)
    wait(sink.outcome(low))
    # weight 4 against 1: "low" got roughly a quarter of the tokens while "high" ran (a stop string could end the
    # stream early, so count steps through usage instead of chunks)
    low_tokens = sink.chunks_before(low, done_at)
    high_tokens = sink.outcome(high).done["usage"]["completion_tokens"]
    assert high_tokens == 48
    assert 0 < low_tokens < high_tokens / 2


def test_round_robin_interleaves_under_a_batch_of_one(make_engine):
    sink = Timeline()
    eng = make_engine(sink, n_seq_max=2, max_active=1, scheduler="rr", rr_slice=4)
    a = go(eng, "1, 2, 3, 4,", owner="a", max_tokens=40)
    b = go(eng, "A, B, C, D,", owner="b", max_tokens=40)
    wait(sink.outcome(a)), wait(sink.outcome(b))
    first_end = min(sink.ended(a), sink.ended(b))
    assert sink.chunks_before(a, first_end) >= 5 and sink.chunks_before(b, first_end) >= 5


def test_a_full_kv_pool_queues_requests_and_serves_them_all(make_engine):
    sink = Sink()
    # One full-length sequence's worth of KV cells for four slots: three sequences of up to ~190 tokens cannot
    # all be resident, so the engine must evict and resume them -- and finish every one.
    eng = make_engine(sink, n_seq_max=4, max_active=4, kv_size=256, n_ctx_seq=256, scheduler="fifo")
    prompt = "Here is a list of animals: cat, dog, cow, horse, sheep, goat, pig, hen, duck, goose," * 3
    reqs = [go(eng, prompt, owner=f"o{i}", stream=False, max_tokens=100) for i in range(3)]
    for r in reqs:
        out = wait(sink.outcome(r))
        assert out.error is None, out.error
        assert out.done["finish_reason"] in ("length", "stop")
    stats = eng.stats()
    assert stats["evictions"] >= 1 and stats["restores"] + stats["text_evictions"] >= 1, stats


def test_an_engine_rejects_sizes_that_cannot_work(model_path):
    for kw in (dict(n_seq_max=4, max_active=5), dict(n_seq_max=4, n_batch=2),
               dict(n_ctx_seq=512, kv_size=256), dict(scheduler="lottery")):
        with pytest.raises(EngineError) as err:
            Engine(model_path, Sink(), **kw)
        assert err.value.code == "EINVAL"


def test_config_chooses_the_scheduler_and_checks_it(tmp_path):
    from kernel import config

    path = tmp_path / "aiosd.toml"
    path.write_text('[llm]\nscheduler = "rr"\nmax_active = 8\nrr_slice = 16\ndefault_model = "small"\n'
                    '[models.small]\npath = "/m.gguf"\nn_ctx_seq = 512\n')
    cfg = config.load(path)
    assert (cfg.llm.scheduler, cfg.llm.max_active, cfg.llm.rr_slice) == ("rr", 8, 16)
    assert cfg.models["small"].path == "/m.gguf" and cfg.models["small"].n_ctx_seq == 512
    assert config.load(None).llm.scheduler == "fair"
    for bad, words in (('[llm]\nscheduler = "lottery"\n', "fifo, rr, fair"),
                       ("[llm]\nmax_active = 0\n", "max_active"),
                       ("[models.x]\nn_ctx_seq = 512\n", "path"),
                       ('[models.default]\npath = "/m.gguf"\n', "default"),
                       ('[llm]\ndefault_model = "nope"\n', "nope"),
                       ('[llm]\nshare_prefix = "everyone"\n', "agent, fleet, group, all")):
        path.write_text(bad)
        with pytest.raises(config.ConfigError, match=words):
            config.load(path)


def test_share_prefix_takes_a_scope_or_the_old_switch(tmp_path):
    from kernel import config

    path = tmp_path / "aiosd.toml"
    for text, scope in (("true", "all"), ("false", "agent"), ('"group"', "group"), ('"fleet"', "fleet")):
        path.write_text(f"[llm]\nshare_prefix = {text}\n")
        assert config.load(path).llm.share_prefix == scope
    assert config.load(None).llm.share_prefix == "agent"


def test_kv_layout_auto_follows_prefix_sharing(tmp_path):
    """``auto``: a stream per slot while agents reuse only their own KV (attention walks one sequence's cells),
    one pool when they share prefixes (shared cells, not copies); explicit layouts win."""
    from kernel import config
    from kernel.llm import kv_unified

    path = tmp_path / "aiosd.toml"
    for text, unified in (("", False), ('share_prefix = "fleet"', True), ('kv_layout = "unified"', True),
                          ('share_prefix = "group"\nkv_layout = "streams"', False)):
        path.write_text(f"[llm]\n{text}\n")
        assert kv_unified(config.load(path).llm) is unified, text
    path.write_text('[llm]\nkv_layout = "sparse"\n')
    with pytest.raises(config.ConfigError, match="auto, unified, streams"):
        config.load(path)

"""Swap (kernel/llm/swap.py) and the engine's resident sessions: exact eviction and restore,
spilling to disk, the text fallback, prefix reuse within an owner (and only there), and a multi-turn chat whose
second turn reuses the first's KV through the real kernel and a real agent process."""
from __future__ import annotations

import os
import time

import pytest

from kernel.llm import Engine, SamplingParams
from tests.test_engine import CONFIDENT_PROMPTS, WAIT_S, Sink, wait

# Any prompts will do for the exact tests: with one slot, a resumed sequence's cells come back at the same
# places and every step is a batch of one token, so its logits are bit for bit those of an uninterrupted run.
PROMPTS = ["The history of the Roman empire", "My grandmother's favourite recipe is", "In the year 2050,"]


@pytest.fixture
def make_engine(model_path):
    engines = []

    def make(**kw):
        kw.setdefault("n_threads", 1)
        kw.setdefault("n_ctx_seq", 512)
        kw.setdefault("n_batch", 256)
        sink = Sink()
        eng = Engine(model_path, sink, **kw)
        eng.start()
        engines.append(eng)
        return eng, sink

    yield make
    for eng in engines:
        eng.close()


def until(cond) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def run(eng, sink, prompts, owner_tag, **params):
    """Submit every prompt at once (each its own owner) and return their texts."""
    reqs = [eng.submit(p, SamplingParams(**params), owner=f"{owner_tag}{i}") for i, p in enumerate(prompts)]
    return [wait(sink.outcome(r)).text for r in reqs]


def solo(eng, sink, prompts, owner_tag, **params):
    """Each prompt alone, one after another."""
    return [run(eng, sink, [p], f"{owner_tag}{i}-", **params)[0] for i, p in enumerate(prompts)]


@pytest.mark.parametrize("params", [dict(max_tokens=40), dict(max_tokens=40, temperature=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_evicted_and_resumed_generations_equal_uninterrupted_ones(make_engine, params):
    # One slot, a batch of one, a slice of 3 tokens: the three generations take turns, and each turn evicts the
    # previous one to RAM and restores the next -- a dozen times each.  The seeded case shows that the sampler
    # chain, with its RNG state, survives eviction.
    eng, sink = make_engine(n_seq_max=1, max_active=1, scheduler="rr", rr_slice=3, session_cache=False)
    alone = solo(eng, sink, PROMPTS, "solo", **params)
    before = eng.stats()
    together = run(eng, sink, PROMPTS, "rr", **params)
    after = eng.stats()
    assert together == alone
    assert len(set(alone)) == len(alone)
    assert after["restores"] - before["restores"] >= 3 * 10, after  # really interrupted, many times
    assert after["text_evictions"] == before["text_evictions"]
    assert after["swap_ram_bytes"] == 0  # every snapshot was consumed or discarded


def test_snapshots_spill_to_disk_past_the_ram_budget(make_engine, tmp_path):
    eng, sink = make_engine(n_seq_max=1, max_active=1, scheduler="rr", rr_slice=4, swap_ram_mb=0,
                            swap_dir=str(tmp_path / "swap"), session_cache=False)
    alone = solo(eng, sink, PROMPTS[:2], "solo", max_tokens=32)
    before = eng.stats()
    assert run(eng, sink, PROMPTS[:2], "rr", max_tokens=32) == alone
    after = eng.stats()
    assert after["snapshots_disk"] - before["snapshots_disk"] >= 10 and after["snapshots_ram"] == 0
    assert after["swap_disk_bytes"] == 0 and os.listdir(tmp_path / "swap") == []  # files removed on restore


def test_without_snapshots_resumed_sequences_are_recomputed(make_engine):
    # The text fallback prefills the tokens again in one batch: equal to the uninterrupted run only while the
    # model's choices are clear (kernel/llm/engine.py's docstring), hence prompts whose continuations are certain.
    # (Not "one, two, three, four,": recomputed in one batch, "..., nine, ten," continues " twelve".)
    eng, sink = make_engine(n_seq_max=1, max_active=1, scheduler="rr", rr_slice=6, snapshots=False,
                            session_cache=False)
    prompts = ["January, February, March,", "A, B, C, D, E,", "Monday, Tuesday, Wednesday,"]
    alone = solo(eng, sink, prompts, "solo", max_tokens=16)
    before = eng.stats()
    assert run(eng, sink, prompts, "rr", max_tokens=16) == alone
    after = eng.stats()
    assert after["text_evictions"] - before["text_evictions"] >= 4 and after["restores"] == 0


def test_preempted_sequences_keep_their_cells(make_engine):
    # Enough slots: round robin leaves sequences out of the batch without evicting them.  Their cells now sit
    # among other sequences' cells, so this too relies on clear choices.
    eng, sink = make_engine(n_seq_max=4, max_active=1, scheduler="rr", rr_slice=3, session_cache=False)
    prompts = CONFIDENT_PROMPTS[:3]
    alone = solo(eng, sink, prompts, "solo", max_tokens=16)
    before = eng.stats()
    assert run(eng, sink, prompts, "rr", max_tokens=16) == alone
    assert eng.stats()["evictions"] == before["evictions"]


def test_cancelling_an_evicted_request_discards_its_snapshot(make_engine):
    eng, sink = make_engine(n_seq_max=1, max_active=1, scheduler="rr", rr_slice=2, session_cache=False)
    a = eng.submit(PROMPTS[0], SamplingParams(max_tokens=400), owner="a", stream=True)
    b = eng.submit(PROMPTS[1], SamplingParams(max_tokens=400), owner="b", stream=True)
    until(lambda: eng.stats()["restores"] >= 4)
    assert eng.cancel(a) and eng.cancel(b)
    assert wait(sink.outcome(a)).error.code == "ECANCELED" and wait(sink.outcome(b)).error.code == "ECANCELED"
    stats = eng.stats()
    assert stats["swap_ram_bytes"] == 0 and stats["resident"] == 0


# ---- prefix reuse ---------------------------------------------------------------------------------------------


SYSTEM = ("You are a helpful assistant. Answer in one short sentence, and never use more words than needed. "
          "Here is the question: ")


def test_a_prefix_is_reused_within_an_owner_only(make_engine):
    eng, sink = make_engine(n_seq_max=4, max_active=2)
    first = eng.submit(SYSTEM + "What is the capital of France?", SamplingParams(max_tokens=8), owner="alice")
    assert wait(sink.outcome(first)).done["usage"]["cached_tokens"] == 0
    n_system = len(eng.tokenize(SYSTEM.rstrip()))
    mine = eng.submit(SYSTEM + "What is the capital of Spain?", SamplingParams(max_tokens=8), owner="alice")
    theirs = eng.submit(SYSTEM + "What is the capital of Italy?", SamplingParams(max_tokens=8), owner="bob")
    assert wait(sink.outcome(mine)).done["usage"]["cached_tokens"] >= n_system - 1
    assert wait(sink.outcome(theirs)).done["usage"]["cached_tokens"] == 0  # not alice's KV: a side channel
    # A repeated prompt reuses all of it but the last token, whose logits are needed.
    again = eng.submit(SYSTEM + "What is the capital of Spain?", SamplingParams(max_tokens=8), owner="alice")
    out = wait(sink.outcome(again)).done
    assert out["usage"]["cached_tokens"] == out["usage"]["prompt_tokens"] - 1


def test_share_prefix_reuses_across_owners(make_engine):
    eng, sink = make_engine(n_seq_max=4, max_active=2, share_prefix=True)
    wait(sink.outcome(eng.submit(SYSTEM + "Name a colour.", SamplingParams(max_tokens=4), owner="alice")))
    other = eng.submit(SYSTEM + "Name a fruit.", SamplingParams(max_tokens=4), owner="bob")
    assert wait(sink.outcome(other)).done["usage"]["cached_tokens"] > 10


def test_a_scope_shares_prefixes_among_its_owners_only(make_engine):
    """Owners of one scope (a fleet, a group) reuse each other's KV; owners of another scope, or of none, never."""
    eng, sink = make_engine(n_seq_max=4, max_active=2)
    ask = lambda q, owner, scope: wait(sink.outcome(eng.submit(  # noqa: E731
        SYSTEM + q, SamplingParams(max_tokens=4), owner=owner, scope=scope))).done["usage"]["cached_tokens"]
    assert ask("Name a colour.", "alice", "fleet-a") == 0
    assert ask("Name a fruit.", "bob", "fleet-a") > 10      # same fleet
    assert ask("Name a tree.", "carol", "fleet-b") == 0      # another fleet
    assert ask("Name a bird.", "dave", None) == 0            # no scope: its own KV only
    assert ask("Name a fish.", "erin", "fleet-b") > 10       # carol's


def test_an_evicted_session_is_restored_for_its_owners_next_turn(make_engine):
    # One slot: bob's request evicts alice's idle session to RAM; alice's next turn restores it.
    eng, sink = make_engine(n_seq_max=1, max_active=1)
    turn1 = SYSTEM + "What is two plus two?"
    out1 = wait(sink.outcome(eng.submit(turn1, SamplingParams(max_tokens=6), owner="alice"))).done
    wait(sink.outcome(eng.submit("Unrelated text from someone else", SamplingParams(max_tokens=4), owner="bob")))
    restores = eng.stats()["restores"]
    turn2 = turn1 + " And what is three plus three?"
    out2 = wait(sink.outcome(eng.submit(turn2, SamplingParams(max_tokens=6), owner="alice"))).done
    assert out2["usage"]["cached_tokens"] >= out1["usage"]["prompt_tokens"] - 1  # (the last may merge)
    assert eng.stats()["restores"] == restores + 1


def test_a_restored_session_is_reused_only_above_its_sliding_window_floor(make_engine):
    # A snapshot omits the sliding-window cells its sequence can no longer see (kernel/llm/swap.py), so a session
    # of ~610 tokens restored from RAM can be continued from its end, but not cut back to a prefix 230 tokens
    # long: the new tokens there would need cells that were left out.
    eng, sink = make_engine(n_seq_max=1, max_active=1, n_ctx_seq=1024, n_batch=512)
    long = ("The history of the city goes back two thousand years, to a fishing village on the river. " * 32).strip()

    def ask(prompt, owner):
        return wait(sink.outcome(eng.submit(prompt, SamplingParams(max_tokens=2), owner=owner))).done["usage"]

    first = ask(long, "alice")
    assert first["prompt_tokens"] > 600
    for prompt, reusable in ((long[: len(long) * 3 // 8] + " Something else.", False), (long + " And then?", True)):
        ask("Unrelated text from someone else", "bob")  # evicts alice's session to RAM
        restores = eng.stats()["restores"]
        usage = ask(prompt, "alice")
        if reusable:
            assert usage["cached_tokens"] >= first["prompt_tokens"] and eng.stats()["restores"] == restores + 1
        else:
            assert usage["cached_tokens"] == 0 and eng.stats()["restores"] == restores


def test_a_concurrent_request_shares_a_running_sequences_prefix(make_engine):
    eng, sink = make_engine(n_seq_max=4, max_active=4)
    long = eng.submit(SYSTEM + "Tell me a long story.", SamplingParams(max_tokens=200), owner="alice", stream=True)
    until(lambda: sink.outcome(long).chunks)
    short = eng.submit(SYSTEM + "Say yes.", SamplingParams(max_tokens=4), owner="alice")
    assert wait(sink.outcome(short)).done["usage"]["cached_tokens"] > 10  # copied from the busy sequence
    eng.cancel(long)
    assert wait(sink.outcome(long)).error.code == "ECANCELED"


# ---- through the kernel ---------------------------------------------------------------------------------------


def test_a_chats_second_turn_reuses_the_first_turns_kv(kernel):
    rec, out = kernel.run("""
        from agentproc import llm
        history = [{"role": "system", "content": "You are a terse assistant."},
                   {"role": "user", "content": "Name a large city in France."}]
        first = llm.chat(history, max_tokens=12)
        history += [{"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And one in Spain?"}]
        second = llm.chat(history, max_tokens=12)
        print("FIRST", first.usage["prompt_tokens"], first.usage["cached_tokens"])
        print("SECOND", second.usage["prompt_tokens"], second.usage["cached_tokens"])
    """)
    assert rec["exit_status"] == 0, out
    p1, c1 = map(int, out.split("FIRST ")[1].split()[:2])
    p2, c2 = map(int, out.split("SECOND ")[1].split()[:2])
    assert c1 == 0
    # The first turn's prompt (and usually its answer) was not recomputed; its last token, "\n" after "model",
    # may tokenize together with the answer's first character when the conversation is rendered again.
    assert c2 >= p1 - 1 and p2 > p1
    assert rec["usage"]["prompt_tokens"] == p1 + p2  # usage still counts every prompt token

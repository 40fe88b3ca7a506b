"""Prometheus metrics of one kernel (docs/operating.md, "Metrics"), in the text exposition format.

Read at scrape time from the kernel's own state (``KernelCollector``: nothing is counted twice and nothing
costs the hot path), except the syscall latency histogram, which the router observes per call.  Served by
the ``sys.metrics`` syscall (``aiosctl metrics``) and, opt-in (``[kernel] metrics_port``), an HTTP listener on
loopback for a Prometheus scraper, which serves the text the event loop last rendered (at most a second old):
the listener's thread never reads kernel state.  ``prometheus-client`` is the reference implementation of the
format and its histograms; writing our own would be worse.
"""
from __future__ import annotations

import http.server
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("aiosd.metrics")

RENDER_EVERY_S = 1.0
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60)


class KernelCollector:
    """Families built from the kernel's state when collected (on the event loop's thread)."""

    def __init__(self, kernel):
        self.k = kernel

    def collect(self):
        k = self.k
        stats = k.engine.stats() if k.engine is not None else {}
        llm = {
            "prompt_tokens": ("aiosd_llm_prompt_tokens", "Prompt tokens computed", CounterMetricFamily),
            "cached_tokens": ("aiosd_llm_cached_tokens", "Prompt tokens reused from cached KV", CounterMetricFamily),
            "tokens_generated": ("aiosd_llm_generated_tokens", "Tokens generated", CounterMetricFamily),
            "steps": ("aiosd_llm_steps", "Batched decode steps", CounterMetricFamily),
            "evictions": ("aiosd_llm_evictions", "Sequences evicted from the KV cache", CounterMetricFamily),
            "restores": ("aiosd_llm_restores", "Evicted sequences restored from snapshots", CounterMetricFamily),
            "active": ("aiosd_llm_batch_active", "Sequences decoded in the last step (batch occupancy)",
                       GaugeMetricFamily),
            "waiting": ("aiosd_llm_requests_waiting", "Requests waiting for the engine (queue depth)",
                        GaugeMetricFamily),
            "kv_cells_used": ("aiosd_llm_kv_cells_used", "KV cells in use", GaugeMetricFamily),
        }
        for key, (name, doc, kind) in llm.items():
            fam = kind(name, doc, labels=["model"])
            for model, st in stats.items():
                fam.add_metric([model], float(st.get(key, 0)))
            yield fam
        yield from _profile(stats)
        main = CounterMetricFamily("aiosd_main_thread_seconds", "Main thread busy time, by part (the profile)",
                                   labels=["part"])
        for key, value in sorted(k.loop_times.items()):
            if key.endswith("_s"):
                main.add_metric([key[:-2]], value)
        yield main
        size = GaugeMetricFamily("aiosd_llm_kv_cells", "KV cells of the context", labels=["model"])
        for model, st in stats.items():
            size.add_metric([model], float(k.engine.get(model).kv_size))
        yield size
        live = k.procs.live()
        states = GaugeMetricFamily("aiosd_processes", "Processes in the table by state", labels=["state"])
        counts: dict[str, int] = {}
        for proc in k.procs.all():
            counts[proc.state.value] = counts.get(proc.state.value, 0) + 1
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states
        tokens = CounterMetricFamily("aiosd_agent_tokens", "LLM tokens of each live agent (prompt + completion)",
                                     labels=["agent", "name", "group"])
        for proc in live:
            tokens.add_metric([str(proc.id), proc.name, proc.group], float(proc.prompt_tokens + proc.completion_tokens))
        yield tokens
        kills = CounterMetricFamily("aiosd_limit_kills", "Agents killed over a limit, by reason", labels=["reason"])
        for reason, n in sorted(k.limit_kills.items()):
            kills.add_metric([reason], n)
        yield kills
        tools = CounterMetricFamily("aiosd_tool_calls", "Tool calls answered, by tool pool", labels=["pool"])
        for pool, st in sorted(k.tools.stats().items()):
            tools.add_metric([pool], st["calls"])
        yield tools
        queued = GaugeMetricFamily("aiosd_tool_calls_queued", "Tool calls waiting, by tool pool", labels=["pool"])
        for pool, st in sorted(k.tools.stats().items()):
            queued.add_metric([pool], st["queued"])
        yield queued


def _profile(stats: dict):
    """The engines' profile (docs/engine.md, "Profile"): engine-thread time by part, llama_decode time and
    tokens by kind of batch, batch rows, time queued."""
    parts = CounterMetricFamily("aiosd_llm_engine_seconds", "Engine thread time, by part", labels=["model", "part"])
    decode = CounterMetricFamily("aiosd_llm_decode_seconds", "Time in llama_decode, by kind of batch",
                                 labels=["model", "batch"])
    steps = CounterMetricFamily("aiosd_llm_decode_steps", "llama_decode calls, by kind of batch",
                                labels=["model", "batch"])
    tokens = CounterMetricFamily("aiosd_llm_batch_tokens", "Batch tokens, by kind", labels=["model", "kind"])
    rows = CounterMetricFamily("aiosd_llm_batch_rows", "Sequences in batches, summed over steps (occupancy)",
                               labels=["model"])
    queued = CounterMetricFamily("aiosd_llm_queued_seconds", "Time requests waited before they first ran, summed",
                                 labels=["model"])
    for model, st in stats.items():
        for part in ("plan", "sample", "step", "idle"):
            parts.add_metric([model, part], float(st.get(f"{part}_s", 0)))
        for kind in ("decode", "prefill", "mixed"):
            decode.add_metric([model, kind], float(st.get(f"decode_s_{kind}", 0)))
            steps.add_metric([model, kind], float(st.get(f"decode_steps_{kind}", 0)))
        tokens.add_metric([model, "decode"], float(st.get("tokens_decode", 0)))
        tokens.add_metric([model, "prefill"], float(st.get("tokens_prefill", 0)))
        rows.add_metric([model], float(st.get("batch_rows", 0)))
        queued.add_metric([model], float(st.get("queued_s", 0)))
    yield from (parts, decode, steps, tokens, rows, queued)


class Metrics:
    """The kernel's registry: the collector above and the syscall latency histogram."""

    def __init__(self, kernel):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KernelCollector(kernel))
        self.syscall_seconds = Histogram("aiosd_syscall_seconds", "Syscall latency from frame to answer, by call",
                                         ["call"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self._observers: dict[str, object] = {}
        self._text = b""
        self._rendered_at = 0.0
        self._server = None

    def observe(self, call: str, seconds: float) -> None:
        """One answered syscall (calls not in the ABI table never get here: no unbounded label values)."""
        child = self._observers.get(call)
        if child is None:
            child = self._observers[call] = self.syscall_seconds.labels(call)
        child.observe(seconds)

    def render(self) -> bytes:
        """The text exposition format, now (event loop thread)."""
        self._text = generate_latest(self.registry)
        self._rendered_at = time.monotonic()
        return self._text

    def tick(self) -> None:
        """From the event loop: keep the HTTP listener's copy fresh."""
        if self._server is not None and time.monotonic() - self._rendered_at >= RENDER_EVERY_S:
            self.render()

    def listen(self, port: int) -> None:
        """Serve ``/metrics`` on 127.0.0.1:``port`` from a daemon thread (the last rendered text only)."""
        metrics = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's name
                body = metrics._text
                self.send_response(200 if self.path.split("?")[0] in ("/metrics", "/") else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.render()
        threading.Thread(target=self._server.serve_forever, name="aiosd-metrics", daemon=True).start()
        log.info("metrics on http://127.0.0.1:%d/metrics", self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

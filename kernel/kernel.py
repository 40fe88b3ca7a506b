"""The kernel process: one event loop that owns the sockets, the process table and the LLM engine.

The main thread runs ``Kernel.serve()``: it polls the router socket, the engine's wake-up pipe, the signal
wake-up socket and every agent's output pipes, and reacts.  The LLM engine runs in its own thread and talks
back only through ``_on_engine_events`` (a deque plus one one-byte wake-up a step), so every socket is touched by the
main thread alone.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil
import secrets
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import msgspec
import zmq

from kernel.config import Config, ConfigError, load as load_config
from kernel.llm import EngineError, Engines, SamplingParams
from kernel.access import Audit, Grants, Pending
from kernel.memory import MemoryManager
from kernel import toolcalls
from kernel.tools import BUILTIN_POOLS, BUILTIN_TOOLS, TOOL_GROUP, ToolManager, mcp_profile
from kernel.storage import MB, Backend, StorageUnavailable, open_storage
from kernel.metrics import Metrics
from kernel.sdnotify import Notifier
from kernel.worker import PREP_STACK_BYTES, Worker
from kernel.proc import Proc, ProcTable, State
from kernel.procdb import ProcDB, ProcDBError
from kernel import restart
from kernel.router import Call, Router
from kernel.trace import Traces
from kernel.resources import RateBucket, ResourceManager, check_tokens, effective_limits
from sandbox.host import Host
from sandbox.linux import become_subreaper
from syscalls import codec
from syscalls.schemas import STOP_SIGNALS, Spawn
from syscalls.address import OPERATOR_KEY_NAME
from syscalls.errors import EAGAIN, EINVAL, ENOENT, EPERM, SyscallError, error_for

log = logging.getLogger("aiosd")

SHUTDOWN_GRACE_S = 3.0
LOG_CHUNK = 64 << 10  # characters in one proc.logs chunk


class KernelError(Exception):
    """The kernel cannot start; the message says what to do."""


class _Owner:
    """Who launched a process, as its record keeps it: the kernel itself (tool workers), or the launcher of a
    restart chain's first run (for its relaunches)."""

    def __init__(self, name: str):
        self.name = name

    def describe(self) -> str:
        return self.name


_KERNEL = _Owner("kernel")


class Kernel:
    def __init__(self, runtime_dir: str | os.PathLike, state_dir: str | os.PathLike, config: Config,
                 model_path: str):
        self.runtime_dir = Path(runtime_dir).absolute()
        self.state_dir = Path(state_dir).absolute()
        self.config = config
        self.model_path = model_path
        self.endpoint = codec.endpoint(str(self.runtime_dir))
        self.pidfile = self.runtime_dir / "aiosd.pid"
        self.procs = ProcTable(self.runtime_dir, self.endpoint, config.kernel.max_procs)
        self.procdb: ProcDB | None = None  # the table on disk (kernel/procdb.py), opened by start()
        self._relaunches: dict[int, Proc] = {}  # ended runs of restart chains waiting for their relaunch, by id
        self.engine: Engines | None = None
        self.preparer: Worker | None = None
        self._preparing: dict[Call, tuple[bool, int]] = {}  # LLM calls being prepared -> (stream, priority)
        self.storage: Backend | None = None
        self.storage_worker: Worker | None = None  # the storage manager's one writer
        self.memory: MemoryManager | None = None
        self.memory_worker: Worker | None = None  # memory calls: embedding, search, writes
        self.grants: Grants | None = None
        self.audit: Audit | None = None
        self.pending = Pending(config.access.confirm_timeout_s)
        self.tools = ToolManager(BUILTIN_TOOLS, BUILTIN_POOLS, self._spawn_tool_worker,
                                 lambda proc, why: self.kill(proc, why), servers=config.mcp.values())
        self._offloaded: set[Call] = set()  # calls whose job a worker has queued or is running
        self.tool_chats: dict[Call, dict] = {}  # llm.chat calls with tools -> the tools offered (toolcalls.shape)
        self.router: Router | None = None
        self._events: collections.deque = collections.deque()
        # Where the main thread's time goes (always on; sys.status "loop", sys.metrics): the periodic sweep
        # (limits, tools, audit, metrics...), syscalls, engine event delivery, signals, agents' output.
        self.loop_times = {"sweep_s": 0.0, "router_s": 0.0, "events_s": 0.0, "signals_s": 0.0, "output_s": 0.0,
                           "wakeups": 0}
        self._followers: dict[int, list[Call]] = {}
        self._pipe_owner: dict[int, Proc] = {}
        self._stop_reason: str | None = None
        self.started_at = time.time()
        self.notifier = Notifier()  # systemd's NOTIFY_SOCKET, if any (kernel/sdnotify.py)
        self.metrics = Metrics(self)  # kernel/metrics.py
        self.limit_kills: dict[str, int] = {}  # agents killed over a limit, by reason word (OOMKilled, ...)
        self._draining_since: float | None = None  # SIGTERM: when the drain began (request_shutdown)
        self.config_file: str | None = None  # what SIGHUP re-reads (kernel/main.py sets it)
        self._reload_requested = False
        self._drain_reason = ""
        self._status_mark = (time.monotonic(), 0)
        self.resources = ResourceManager()
        self.traces = Traces(config.kernel.trace_kb << 10, config.kernel.trace_total_mb << 20)  # kernel/trace.py
        sb = config.sandbox
        self.host = Host(self.runtime_dir, [str(self.state_dir), str(Path(model_path).absolute().parent)],
                         uid_base=sb.uid_base, uid_count=sb.uid_count, cpu_quota=sb.cpu_quota or None,
                         extra_read=list(sb.extra_read), use_uids=sb.uids, use_cgroups=sb.cgroups,
                         use_tmpfs=sb.scratch_tmpfs, cgroup_dir=sb.cgroup_dir or None)

    # --- start-up ------------------------------------------------------------------------------------
    def _prepare_runtime_dir(self) -> None:
        """Create the runtime dir 0700 (refusing one owned by someone else) and claim it with a pidfile."""
        self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.runtime_dir.stat()
        if st.st_uid != os.getuid():
            raise KernelError(f"{self.runtime_dir} belongs to uid {st.st_uid}; pick another --runtime-dir")
        os.chmod(self.runtime_dir, 0o700)
        try:
            other = int(self.pidfile.read_text())
        except (OSError, ValueError):
            other = None
        if other and other != os.getpid() and _pid_alive(other):
            raise KernelError(f"a kernel (pid {other}) already serves {self.runtime_dir}; "
                              f"stop it with `aiosctl --runtime-dir {self.runtime_dir} shutdown`")
        for path in self.host.remove_stale_mounts():  # a killed kernel's agents' scratch filesystems
            log.info("detached the stale scratch mount %s", path)
        for sub in ("scratch", "logs"):  # a previous kernel's agents are gone: so is their state
            shutil.rmtree(self.runtime_dir / sub, ignore_errors=True)
            (self.runtime_dir / sub).mkdir(mode=0o700)
        sock_path = self.runtime_dir / codec.SOCKET_NAME
        if sock_path.exists():
            sock_path.unlink()

    def start(self) -> None:
        """Everything up to serving: runtime dir, model, socket, pidfile.  Raises KernelError."""
        self._prepare_runtime_dir()
        self._open_procdb()
        become_subreaper()
        try:
            self.engine = Engines.from_config(self.config.llm, self.config.models, self.model_path,
                                              self._on_engine_events, swap_dir=str(self.runtime_dir / "swap"))
            self.engine.start()
            self.preparer = Worker(self._on_prepared, name="aiosd-prep", stack_bytes=PREP_STACK_BYTES)
        except EngineError as exc:
            raise KernelError(f"cannot load the model {self.model_path}: {exc}") from None
        self._open_storage()
        self.ctx = zmq.Context()
        self.router = Router(self, self.ctx, self.endpoint, self.config.kernel.max_frame, self._operator_key())
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r, self._sig_w = socket.socketpair()
        for s in (self._sig_r, self._sig_w):
            s.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, lambda *_: self.request_shutdown("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.request_shutdown("SIGINT"))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))  # served by the loop
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up fd does the work
        self.poller = zmq.Poller()
        self.poller.register(self.router.sock, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)
        self.poller.register(self._sig_r.fileno(), zmq.POLLIN)
        self.pidfile.write_text(str(os.getpid()))
        for layer, status in self.host.capabilities().items():
            log.info("sandbox layer %s: %s", layer, status)
        if self.config.kernel.metrics_port:
            try:
                self.metrics.listen(self.config.kernel.metrics_port)
            except OSError as exc:
                raise KernelError(f"cannot serve metrics on 127.0.0.1:{self.config.kernel.metrics_port}: "
                                  f"{exc.strerror or exc} ([kernel] metrics_port)") from None
        log.info("serving %s with model %s (pid %d)", self.endpoint, self.engine.model_name, os.getpid())
        self.notifier.ready(f"serving {self.endpoint}, model {self.engine.model_name}")

    def _open_procdb(self) -> None:
        """The process table on disk: bring back the earlier kernel's records (those it left alive are LOST now)
        and plan the relaunch of the restart chains among them.  Raises KernelError."""
        try:
            self.procdb = ProcDB(self.state_dir / "procs.db")
            rows, meta = self.procdb.load()
        except (ProcDBError, sqlite3.Error) as exc:
            raise KernelError(str(exc)) from None
        before = meta.get("kernel_pid", "?")
        lost = self.procs.restore(rows, int(meta.get("next_id", 1)),
                                  f"kernel pid {before} ended without stopping its agents (killed or crashed); "
                                  "found at the next start")
        if rows:
            log.info("process table: %d records from the previous kernel, %d of them LOST", len(rows), len(lost))
        now = time.time()
        for proc in self.procs.all():
            if proc.next is None and proc.restart_at is not None:  # it was waiting for its relaunch
                self._relaunches[proc.id] = proc
        for proc in lost:
            self._plan_relaunch(proc, now)
        self._save(lost, meta={"kernel_pid": os.getpid(), "next_id": self.procs.next_id})

    def _save(self, procs, new: bool = False, meta: dict | None = None) -> None:
        """Write these records to the table on disk (``new``: with their relaunch specs and the next id).  An
        error is logged, never raised: the kernel goes on serving with the table in memory."""
        if self.procdb is None:
            return
        procs = list(procs)
        try:
            self.procdb.save([p.stored() for p in procs],
                             {p.id: p.spec for p in procs if p.spec is not None} if new else None,
                             dict(meta or {}, **({"next_id": self.procs.next_id} if new else {})))
        except sqlite3.Error as exc:
            log.error("cannot write the process table %s: %s; records since are kept in memory only",
                      self.procdb.path, exc)
        for p in procs:
            p.saved_mark = p.usage_mark()

    def _operator_key(self) -> bytes:
        """A fresh operator credential in ``<runtime-dir>/operator.key`` (0600 in the 0700 dir): operators present
        it in their routing id (syscalls.address.operator_routing_id; docs/design.md, "Identity")."""
        key = secrets.token_bytes(16)
        path = self.runtime_dir / OPERATOR_KEY_NAME
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    # --- the loop ------------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until SIGTERM/SIGINT or sys.shutdown, then shut down in order."""
        router_sock, wake_r, sig_r = self.router.sock, self._wake_r, self._sig_r.fileno()
        poll = self.poller.poll
        resources = self.resources
        busy, clock = self.loop_times, time.perf_counter
        while self._stop_reason is None:
            events = poll(int(resources.period * 1000))
            t0 = clock()
            if not events:
                self._reap()  # belt and braces: a SIGCHLD can coalesce with another signal
            if resources.due():
                self._enforce_limits()
                self._expire_confirmations()
                self.tools.tick()
                self.audit.flush()
                self.notifier.tick(self._status_line)
                self.metrics.tick()
                self._check_drain()
                self._relaunch_due()
                if resources.slow_swept:
                    self._save(p for p in self.procs.live() if p.usage_mark() != p.saved_mark)
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            t1 = clock()
            busy["sweep_s"] += t1 - t0
            for what, _ in events:
                if what is router_sock:
                    self.router.serve_ready()
                    part = "router_s"
                elif what == wake_r:
                    self._drain_engine_events()
                    part = "events_s"
                elif what == sig_r:
                    self._drain_signals()
                    self._reap()
                    part = "signals_s"
                else:
                    self._read_output(what)
                    part = "output_s"
                t2 = clock()
                busy[part] += t2 - t1
                t1 = t2
            busy["wakeups"] += 1
        self.shutdown()

    def status(self) -> dict:
        """sys.status: what this kernel is and has (docs/abi.md 4)."""
        live = self.procs.live()
        return {
            "pid": os.getpid(), "uptime_s": time.time() - self.started_at, "runtime_dir": str(self.runtime_dir),
            "procs": {"live": len(live), "total": len(self.procs.all())},
            "sandbox": self.host.capabilities(), "llm": self.engine.stats(), "loop": dict(self.loop_times),
            "audit_log": self.audit.path if self.audit else None, "traces": self.traces.status(),
        }

    def request_shutdown(self, reason: str) -> None:
        """Stop serving: first drain -- no new work is admitted (``DRAIN_REFUSED``: ECANCELED), generations and
        tool calls under way get ``[kernel] drain_s`` to finish -- then shut down.  A second request (a second
        SIGTERM), or ``drain_s = 0``, skips the drain."""
        if self._stop_reason is not None:
            return
        if self._draining_since is None and self.config.kernel.drain_s > 0:
            self._draining_since = time.monotonic()
            log.info("draining (%s): no new work; what is under way has %g s to finish", reason,
                     self.config.kernel.drain_s)
            self.notifier.stopping(f"draining: {reason}")
            self._drain_reason = reason
            return
        log.info("shutting down: %s", reason)
        self._stop_reason = reason
        self.notifier.stopping(f"stopping: {reason}")

    # Sections a reload applies at once; the others (the engine's, storage's, the sandbox's, MCP servers) are
    # built at start, and a change to them is reported as needing a restart.
    RELOADED = ("groups", "access", "kernel")

    def reload(self) -> None:
        """SIGHUP (``aiosctl reload``): re-read the config file and apply its groups (privileges, limits,
        priority, tools, fork), ``[access]`` confirmations and ``[kernel]`` limits, dropping no request and no
        agent: agents keep the limits they were started with, callers are re-identified under the new groups.
        A file that does not validate is refused, and the running config stays (log and ``STATUS=``)."""
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=int(time.monotonic() * 1e6))
        try:
            new = load_config(self.config_file)
            if new.kernel.max_frame != self.config.kernel.max_frame or new.access.path != self.config.access.path:
                raise ConfigError(f"{self.config_file}: [kernel] max_frame and [access] path take a restart")
        except ConfigError as exc:
            log.error("reload refused; the running config stays: %s", exc)
            self.notifier.send(READY=1, STATUS=f"reload refused: {exc}"[:500])
            return
        later = [name for name in ("llm", "models", "sandbox", "storage", "memory", "mcp")
                 if getattr(new, name) != getattr(self.config, name)]
        for name in self.RELOADED:
            setattr(self.config, name, getattr(new, name))
        self.procs.max_procs = new.kernel.max_procs
        # traces started from now on; those running keep the budget they reserved (Trace.budget)
        self.traces.per_trace, self.traces.total = new.kernel.trace_kb << 10, new.kernel.trace_total_mb << 20
        self.pending.timeout_s = new.access.confirm_timeout_s
        self.router.forget_all()  # every caller is identified again, under the new groups
        log.info("reloaded %s: groups, [access] and [kernel] applied%s", self.config_file or "the defaults",
                 f"; changed sections that take a restart: {', '.join(later)}" if later else "")
        self.notifier.send(READY=1, STATUS="reloaded" + (f"; restart to apply {', '.join(later)}" if later else ""))

    def draining(self) -> bool:
        return self._draining_since is not None

    def _drained(self) -> bool:
        """Nothing left under way: no LLM request pending (agents' or operators'), none being prepared, no tool
        call queued or running."""
        stats = self.engine.stats()
        llm = sum(s.get("active", 0) + s.get("waiting", 0) for s in stats.values())
        return not (llm or self._preparing or any(p.pending for p in self.procs.live()) or self.tools.busy())

    def _check_drain(self) -> None:
        if self._draining_since is None or self._stop_reason is not None:
            return
        late = time.monotonic() - self._draining_since > self.config.kernel.drain_s
        if late or self._drained():
            log.info("shutting down: %s (%s)", self._drain_reason,
                     "drain deadline passed" if late else "drained: nothing left under way")
            self._stop_reason = self._drain_reason

    def _status_line(self) -> str:
        """systemd's STATUS=: agents, requests waiting for the engine, tokens generated a second lately."""
        stats = self.engine.stats()
        generated = sum(s.get("tokens_generated", 0) for s in stats.values())
        waiting = sum(s.get("waiting", 0) for s in stats.values())
        now = time.monotonic()
        last_t, last_n = self._status_mark
        self._status_mark = (now, generated)
        rate = (generated - last_n) / (now - last_t) if now > last_t else 0.0
        return f"{len(self.procs.live())} agents, {waiting} requests waiting, {rate:.1f} tokens/s"

    def shutdown(self) -> None:
        """Kill every agent, wait (bounded) to reap them, stop the engine, release the socket."""
        lost = f"kernel shutdown ({self._stop_reason or 'stopped'})"
        for proc in self.procs.live():
            proc.lost_reason = lost  # it ends LOST; a restart policy relaunches it at the next start
            self.kill(proc, "kernel shutdown")
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.procs.live() and time.monotonic() < deadline:
            time.sleep(0.01)
            self._reap()
        stuck = self.procs.live()
        for proc in stuck:  # not reaped in time: the table on disk says LOST all the same
            proc.state, proc.reason, proc.ended_at = State.LOST, lost, time.time()
        self._save(stuck)
        if self.procdb is not None:
            self.procdb.close()
        self.metrics.close()
        self.host.close()
        self.resources.disk.close()  # finishes removing the scratch dirs of the agents reaped above
        if self.preparer is not None:
            self.preparer.close()  # before the engine: a running preparation uses its model
        if self.storage_worker is not None:
            self.storage_worker.close()  # queued writes were never acknowledged; the running one commits
            self.storage.close()
        if self.memory_worker is not None:
            self.memory_worker.close()
            self.memory.close()
        if self.audit is not None:
            for waiting in list(self.pending.waiting.values()):
                self.pending.take(waiting.id).fail("ECANCELED", "the kernel is shutting down")
            self.audit.close()
            self.grants.close()
        if self.engine is not None:
            self.engine.close()
            self._drain_engine_events()
        signal.set_wakeup_fd(-1)
        self.router.close()
        self.ctx.term()
        for path in (self.runtime_dir / codec.SOCKET_NAME, self.pidfile, self.runtime_dir / OPERATOR_KEY_NAME):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        log.info("stopped")

    def _drain_signals(self) -> None:
        try:
            while self._sig_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # --- processes -----------------------------------------------------------------------------------
    def spawn(self, args, owner, profile: dict | None = None, chain: Proc | None = None) -> Proc:
        """proc.spawn: start an agent under its group's limits (overridden by ``args.limits``).  ``profile``:
        the kernel's own workers' extra sandbox settings (``Host.prepare`` keywords), never an agent's.
        ``chain``: the ended run this one relaunches (its limits, policy and usage carry over)."""
        group = self.config.groups.get(args.group)
        if group is None:
            raise ENOENT(f"no privilege group {args.group!r}; configured: {sorted(self.config.groups)}")
        name = args.name or Path(args.filename).stem
        if chain is not None:
            limits = dict(chain.limits)
        else:
            limits = effective_limits(group.limits, msgspec.structs.asdict(args.limits) if args.limits else None)
        packages = self._packages(args, group, owner) if profile is None else ()
        traced = profile is None and (args.trace or self.config.kernel.trace_all)
        if traced:
            self.traces.make_room()  # before it starts: a traced agent starts traced or not at all
        if args.filename in args.files:
            raise EINVAL(f"files: {args.filename!r} is the program itself; ship it as source")
        next_id = self.procs.next_id
        try:
            proc = self.procs.spawn(args.source, args.filename, name, args.group, list(args.argv),
                                    owner.describe(), limits,
                                    lambda scratch: self.host.prepare(next_id, scratch, limits,
                                                                      **{"allow_fork": group.allow_fork,
                                                                         "packages": packages,
                                                                         **(profile or {})}),
                                    files=dict(args.files))
        except BaseException as exc:
            if self.procs.next_id != next_id:  # it got as far as its scratch dir: undo that
                mount = self.host.release(next_id)
                self.resources.disk.forget(next_id, self.runtime_dir / "scratch" / str(next_id), bool(mount))
            if isinstance(exc, OSError):  # e.g. a full disk under the runtime dir
                raise EAGAIN(f"cannot start the agent: {exc.strerror or exc} (in {self.runtime_dir}); "
                             "free space there and retry") from None
            raise
        proc.fleet = args.fleet
        if traced:
            self.traces.start(proc)
        if chain is not None:
            proc.continue_chain(chain)
            self._save([chain])
        elif args.restart != "no":
            proc.restart = args.restart
            proc.spec = {"source": args.source, "filename": args.filename, "name": name, "group": args.group,
                         "argv": list(args.argv), "fleet": args.fleet, "files": dict(args.files),
                         "venv": args.venv, "trace": args.trace}
        self._save([proc], new=True)
        self.resources.disk.track(proc.id, proc.scratch, limits, self.host.scratch_mounted(proc.id))
        if limits["syscall_rate"]:
            proc.rate_bucket = RateBucket(limits["syscall_rate"])
        for fd in proc.pipes:
            self._pipe_owner[fd] = proc
            self.poller.register(fd, zmq.POLLIN)
        log.info("spawned agent %d (%s) pid %d group %s", proc.id, name, proc.pid, args.group)
        return proc

    @staticmethod
    def _packages(args, group, owner) -> tuple[str, ...]:
        """The site-packages directory an agent imports from: ``proc.spawn venv`` (operators only: an agent,
        even an admin one, may not point the sandbox's read set at a path of its choosing) or its group's
        ``venv``.  EPERM / EINVAL (naming what to fix) otherwise."""
        if args.venv is not None and getattr(owner, "proc", None) is not None:  # _Owner: a relaunch
            raise EPERM("only an operator may give proc.spawn a venv (an agent may not widen what another agent "
                        "reads); use a group's venv in the config")
        venv = args.venv or group.venv
        return (venv_site_packages(venv),) if venv else ()

    def attest(self, caller, layers: dict) -> None:
        """proc.ready: the bootstrap reports the sandbox layers it applied, once, before the program runs."""
        proc = caller.proc
        if proc is None or proc.state is not State.STARTING:
            raise EPERM("proc.ready is the bootstrap's first report and is accepted once, before the program runs")
        proc.layers = layers
        proc.state = State.RUNNING
        self._save([proc])

    def kill(self, proc: Proc, reason: str) -> None:
        """proc.kill: SIGKILL everything the agent started now; its LLM requests end with ECANCELED."""
        if proc.alive:
            proc.kill_reason = proc.kill_reason or reason
            self.host.kill(proc.id, proc.pid)
        self._cancel_llm(proc)

    def signal(self, proc: Proc, sig: str, by: str) -> None:
        """proc.kill with ``sig`` (docs/abi.md 4): SIGKILL kills everything the agent started; other signals go to
        its process group.  A stop signal (``STOP_SIGNALS``) also stops its restart chain: no relaunch, and a
        relaunch waiting for its delay is cancelled."""
        if sig in STOP_SIGNALS and proc.restart != "no" and not proc.stopped:
            proc.stopped = True
            if self._relaunches.pop(proc.id, None) is not None:
                proc.restart_at = None
                proc.reason = _joined(proc.reason, f"not relaunched: stopped by {by}")
            self._save([proc])
        if sig == "SIGKILL":
            self.kill(proc, f"killed by {by}")
        elif proc.alive:
            try:
                os.killpg(proc.pid, getattr(signal, sig))
            except (ProcessLookupError, PermissionError):
                pass

    def _plan_relaunch(self, proc: Proc, now: float) -> None:
        """An ended run: schedule its chain's relaunch, or record why there is none (kernel/restart.py)."""
        delay, why = restart.plan(proc, self.procs.lookup, self.config.kernel, now)
        if why:
            proc.reason = _joined(proc.reason, why)
            log.warning("agent %d (%s) %s", proc.id, proc.name, why)
        if delay is not None:
            proc.restart_at = now + delay
            self._relaunches[proc.id] = proc

    def _relaunch_due(self) -> None:
        """Relaunch the chains whose delay has passed (not while draining).  A full table retries later; a group
        that no longer exists ends the chain."""
        if not self._relaunches or self.draining():
            return
        now = time.time()
        for proc in [p for p in self._relaunches.values() if p.restart_at <= now]:
            self._relaunch(proc, now)

    def _relaunch(self, proc: Proc, now: float) -> None:
        spec = proc.spec or {}
        try:
            args = msgspec.convert(dict(spec, restart=proc.restart), Spawn)
            new = self.spawn(args, owner=_Owner(proc.owner), chain=proc)
        except EAGAIN as exc:
            proc.restart_at = now + max(self.config.kernel.restart_delay_s, 1.0)
            log.warning("agent %d (%s): relaunch postponed: %s", proc.id, proc.name, exc.message)
            return
        except (SyscallError, msgspec.ValidationError) as exc:
            del self._relaunches[proc.id]
            proc.restart_at = None
            proc.reason = _joined(proc.reason, f"not relaunched: {getattr(exc, 'message', exc)}")
            log.warning("agent %d (%s): %s", proc.id, proc.name, proc.reason)
            self._save([proc])
            return
        del self._relaunches[proc.id]
        log.info("agent %d (%s) relaunched as %d (relaunch %d of its chain)", proc.id, proc.name, new.id,
                 new.restarts)

    def _enforce_limits(self) -> None:
        """Kill every agent over a limit (its whole group), recording why; others are untouched.  Once a
        second, also kill orphans: processes an agent left behind, adopted by the kernel as subreaper."""
        live = self.procs.live()
        for proc, reason in self.resources.sweep(live):
            log.warning("agent %d (%s): %s", proc.id, proc.name, reason)
            word = reason.split(":", 1)[0]
            self.limit_kills[word] = self.limit_kills.get(word, 0) + 1
            self.kill(proc, reason)
        if self.resources.slow_swept:
            for pid in self.host.kill_orphans({p.pid for p in live}):
                log.warning("killed orphan pid %d left behind by an agent", pid)

    def _read_output(self, fd: int) -> None:
        proc = self._pipe_owner.get(fd)
        if proc is None:
            return
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if data:
            self._publish(proc, proc.pipes[fd], data)
        else:
            self._close_pipe(proc, fd)

    def _publish(self, proc: Proc, fd_no: int, data: bytes, final: bool = False) -> None:
        was_truncated = proc.output.truncated
        text = proc.output.add(fd_no, data, final)
        if proc.output.truncated and not was_truncated and proc.limits.get("disk_mb"):
            # The log alone is over disk_mb now: kill at once, not at the next sample, which an agent that
            # floods and exits within a sampling period would never meet (docs/sandbox.md, "Disk").
            self.kill(proc, f"DiskQuota: {proc.output.log_bytes / MB:.0f} MB in captured output "
                            f"> limit {proc.limits['disk_mb']}")
        if text:
            for call in self._followers.get(proc.id, ()):
                call.chunk({"fd": fd_no, "data": text})

    def _close_pipe(self, proc: Proc, fd: int) -> None:
        fd_no = proc.pipes.pop(fd)
        self._publish(proc, fd_no, b"", final=True)
        self.poller.unregister(fd)
        self._pipe_owner.pop(fd, None)
        os.close(fd)

    def _reap(self) -> None:
        for proc in self.procs.reap():
            for fd in list(proc.pipes):  # what it wrote before exiting is in the pipe already
                while True:
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        break
                    self._publish(proc, proc.pipes[fd], data)
                self._close_pipe(proc, fd)
            proc.output.close()
            if proc.state is State.KILLED and proc.kill_reason is None:  # e.g. the cgroup OOM killer
                proc.reason = self.host.death_reason(proc.id) or proc.reason
            mount = self.host.release(proc.id)
            self.resources.disk.forget(proc.id, proc.scratch, unmount=bool(mount))  # removed off the loop
            self._cancel_llm(proc)
            self._cancel_offloaded(proc)
            self.tools.cancel_caller(proc.id)
            lines = proc.output.text()[-2000:].strip().splitlines()
            self.tools.ended(proc, f"{proc.state.value} {proc.reason or f'status {proc.exit_status}'}",
                             lines[-1] if lines else "")
            self.router.forget(proc)
            log.info("agent %d (%s) ended: %s %s", proc.id, proc.name, proc.state.value,
                     proc.reason or f"status {proc.exit_status}")
            if self._stop_reason is None:  # at shutdown the next kernel relaunches what it finds LOST
                self._plan_relaunch(proc, time.time())
            self._save([proc])
            self._end_follows(proc)

    def follow_logs(self, proc: Proc, call: Call, follow: bool) -> None:
        """proc.logs with stream: captured output as chunks (runs of one fd merged, at most ``LOG_CHUNK``
        characters each), then (when following) new output until exit.  An agent holds at most ``[kernel]
        max_followers`` follow streams (EAGAIN beyond): every printed line costs the kernel a send per follower."""
        follower = call.caller.proc
        if follow and proc.alive and follower is not None and follower.followers >= self.config.kernel.max_followers:
            raise EAGAIN(f"agent {follower.id} already follows {follower.followers} logs "
                         f"([kernel] max_followers); close one first")
        run_fd, run = None, []
        for fd_no, text in list(proc.output.pieces) + [(None, "")]:
            if run and (fd_no != run_fd or sum(map(len, run)) + len(text) > LOG_CHUNK):
                data = "".join(run)
                for i in range(0, len(data), LOG_CHUNK):
                    call.chunk({"fd": run_fd, "data": data[i:i + LOG_CHUNK]})
                run = []
            run_fd = fd_no
            run.append(text)
        if follow and proc.alive:
            self._followers.setdefault(proc.id, []).append(call)
            if follower is not None:
                follower.followers += 1
        else:
            call.reply(proc.record())

    def _end_follows(self, proc: Proc) -> None:
        """An agent ended: its own follow streams are dropped, and the streams following it get its record."""
        for calls in self._followers.values():
            calls[:] = [c for c in calls if c.caller.proc is not proc]
        proc.followers = 0
        for call in self._followers.pop(proc.id, ()):
            if call.caller.proc is not None:
                call.caller.proc.followers -= 1
            call.reply(proc.record())

    # --- storage and other work off the event loop ---------------------------------------------------
    def _open_storage(self) -> None:
        """The storage manager on ``<state-dir>/storage.db`` and its worker thread.  Raises KernelError."""
        st, kc = self.config.storage, self.config.kernel
        path = Path(st.path) if st.path else self.state_dir / "storage.db"
        try:
            self.storage = open_storage(st.backend, path, max_value_bytes=st.max_value_mb * MB,
                                        max_read=max(512, kc.max_frame // 2), keep_versions=st.keep_versions,
                                        keep_bytes=st.keep_mb * MB, upload_ttl_s=st.upload_ttl_s)
        except StorageUnavailable as exc:
            raise KernelError(str(exc)) from None
        self.storage_worker = Worker(self._on_offloaded, name="aiosd-storage", group=self.storage.group)
        mem = self.config.memory
        path = Path(mem.path) if mem.path else self.state_dir / "memory.db"
        try:
            from kernel.embed import default_embedder
            self.memory = MemoryManager(path, embedder=default_embedder(), ram_budget_bytes=mem.ram_mb * MB,
                                        evict_threshold=mem.evict_threshold, evict_target=mem.evict_target)
        except SyscallError as exc:
            raise KernelError(f"cannot open the memory database {path}: {exc.message}") from None
        self.memory_worker = Worker(self._on_offloaded, name="aiosd-memory")
        self.memory_worker.submit(None, "warm-up", self.memory.warm)  # its outcome is nobody's call: ignored
        where = Path(self.config.access.path) if self.config.access.path else self.state_dir
        try:
            self.grants = Grants(where / "access.db")
            self.audit = Audit(where / "audit.log")
        except (sqlite3.Error, OSError) as exc:
            raise KernelError(f"cannot open the access manager's files in {where}: {exc}") from None

    def offload(self, call: Call, job, worker: Worker | None = None) -> None:
        """Run ``job()`` on ``worker`` (default: the storage worker), round robin across agents, and answer
        ``call`` with its result -- or its ``StorageError``/``SyscallError`` as that ABI error -- when it is done.
        An agent has at most ``[kernel] max_pending`` such calls queued or running (EAGAIN beyond)."""
        proc = call.caller.proc
        if proc is not None:
            if proc.offloaded >= self.config.kernel.max_pending:
                raise EAGAIN(f"agent {proc.id} has {proc.offloaded} storage and memory calls in flight ([kernel] "
                             "max_pending); wait for their answers")
            proc.offloaded += 1
        self._offloaded.add(call)
        (worker or self.storage_worker).submit(proc.id if proc else None, call, job)

    def _on_offloaded(self, call: Call, result, error: BaseException | None) -> None:
        """A worker thread: hand the outcome to the main thread, as engine events are."""
        self._on_engine_events([(call, "offloaded", (result, error))])

    def _offload_done(self, call: Call, result, error: BaseException | None) -> None:
        """Main thread: answer an offloaded call (unless it was answered already: its agent ended)."""
        if call not in self._offloaded:
            return
        self._offloaded.discard(call)
        proc = call.caller.proc
        if proc is not None:
            proc.offloaded -= 1
        if error is None:
            call.reply(result)
        elif isinstance(error, SyscallError):
            call.fail(error.code, error.message)
        else:
            log.error("a %s job failed inside the kernel", call.caller.describe(), exc_info=error)
            call.fail("EIO", "internal kernel error; see the kernel log")

    def _share_scope(self, proc: Proc | None):
        """Whose cached KV ``proc``'s requests may reuse beyond its own ([llm] share_prefix): its privilege group,
        or the fleet it was launched in (``proc.spawn`` ``fleet``); None: its own only (or every agent's, for
        "all", which the engine applies itself)."""
        mode = self.config.llm.share_prefix
        if proc is None or mode in ("agent", "all"):
            return None
        if mode == "group":
            return ("group", proc.group)
        return ("fleet", proc.fleet) if proc.fleet else None

    # --- tools (kernel/tools.py) ----------------------------------------------------------------------
    def _spawn_tool_worker(self, pool, discover: bool = False) -> Proc:
        """A worker process for ``pool``: an agent of the internal group ``tool`` under the pool's memory and CPU
        limits, running agentproc/toolworker.py (a built-in tool) or agentproc/mcpworker.py (an MCP server's
        bridge: it starts the server as its child, in the same sandbox, and is its MCP client; ``discover``:
        list the server's tools with ``tool.register`` and exit)."""
        limits = {"memory_mb": pool.memory_mb, "cpu_seconds": pool.cpu_seconds}
        if pool.server is None:
            source = f"from agentproc.toolworker import serve\nserve({pool.name!r}, once={pool.once!r})\n"
            name, profile = f"tool-{pool.name}", None
        else:
            spec, profile = mcp_profile(pool.server, pool.profile)
            source = f"from agentproc.mcpworker import serve\nserve({spec!r}, discover={discover!r})\n"
            name = f"mcp-{pool.name}"
        args = msgspec.convert({"source": source, "name": name, "group": TOOL_GROUP, "limits": limits}, Spawn)
        return self.spawn(args, owner=_KERNEL, profile=profile)

    # --- confirmations (kernel/access.py) ----------------------------------------------------------
    def confirm(self, call: Call, what: str, why: str, run) -> None:
        """Hold ``call`` until an operator approves it (then ``run()``) or denies it, or the timeout passes
        (then EACCES).  The waiting agent holds nothing but this record meanwhile."""
        who, proc = call.caller.describe(), call.caller.proc
        waiting = self.pending.add(who, what, why, run, call.fail, proc.id if proc else None)
        self.audit.append(who, what, "waiting", id=waiting.id, why=why)
        log.info("request %d of %s waits for an operator: %s (%s)", waiting.id, who, what, why)

    def decide(self, wait_id: int, approve: bool, by: str) -> dict:
        """An operator's decision on a waiting request (ENOENT if none waits under ``wait_id``)."""
        waiting = self.pending.take(wait_id)
        self.audit.append(by, waiting.what, "approved" if approve else "denied", id=wait_id, requester=waiting.who)
        if approve:
            try:
                waiting.run()
            except SyscallError as exc:  # e.g. its agent's cap on calls in flight: the call gets that answer
                waiting.fail(exc.code, exc.message)
        else:
            waiting.fail("EACCES", f"{by} denied it")
        return waiting.record()

    def _expire_confirmations(self) -> None:
        for waiting in self.pending.expired():
            self.audit.append("kernel", waiting.what, "timed out", id=waiting.id, requester=waiting.who)
            waiting.fail("EACCES", f"no operator approved it within {self.pending.timeout_s} s ([access] "
                                   "confirm_timeout_s)")

    def _cancel_offloaded(self, proc: Proc) -> None:
        """Drop the queued jobs of an ended agent (never acknowledged, never run)."""
        for waiting in self.pending.of_owner(proc.id):
            self.audit.append("kernel", waiting.what, "dropped", id=waiting.id, requester=waiting.who)
        for call in self.storage_worker.drop_owner(proc.id) + self.memory_worker.drop_owner(proc.id):
            self._offloaded.discard(call)
            proc.offloaded -= 1
            call.fail("ECANCELED", "the agent ended")

    # --- LLM -----------------------------------------------------------------------------------------
    def llm_submit(self, call: Call, prompt: str | None, args, messages: list | None = None) -> None:
        """Start a generation of ``prompt`` (or of ``messages`` rendered with the model's chat template) for
        ``call``: checked here, prepared (rendered, tokenized, grammar built) by the preparer's worker, queued
        on the engine by ``_prepared``; its chunks and reply come back through the engine's events.

        An agent has at most ``[kernel] max_pending`` requests unanswered, preparing or queued (EAGAIN beyond).
        Its token quota is checked here and again, with the prompt's tokens, before queueing (EDQUOT); max_tokens
        is clamped to what is left.  Engine errors become the ABI error of the same code (a NUL in a message is
        EINVAL, an oversized schema EINVAL, an unknown model ENOENT, ...).
        """
        proc = call.caller.proc
        if proc is not None and proc.pending >= self.config.kernel.max_pending:
            raise EAGAIN(f"agent {proc.id} has {proc.pending} LLM requests pending ([kernel] max_pending); "
                         "wait for one to finish")
        if proc is not None:
            check_tokens(proc, 0, args.max_tokens)
        group = self.config.groups.get(call.caller.group)
        try:
            engine = self.engine.get(args.model)
        except EngineError as exc:
            raise error_for(exc.code, str(exc)) from None
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=list(args.stop), json_schema=args.json_schema)
        self._preparing[call] = (bool(args.stream), group.priority if group else 0)
        self.preparer.submit(proc.id if proc else None, call,
                             lambda: engine.prepare(prompt, params, messages=messages))
        if proc is not None:
            proc.pending += 1

    def llm_cancel(self, call: Call, rid: int) -> bool:
        """llm.cancel: end the caller's own request ``rid`` (on the same connection) with ECANCELED, whether it
        is still being prepared or queued on the engine.  False when there is no such request."""
        key = (call.routing_id, rid)
        for pending in list(self._preparing):
            if pending.key == key and not pending.done:
                if self.preparer.cancel(pending):
                    del self._preparing[pending]
                self._end_llm_call(pending)
                pending.fail("ECANCELED", "the request was cancelled")
                return True
        return self.engine.cancel_key(key)

    def _cancel_llm(self, proc: Proc) -> None:
        """End every LLM request of ``proc``: queued preparations dropped, engine requests cancelled."""
        for call in self.preparer.drop_owner(proc.id):
            self._preparing.pop(call, None)
            self._end_llm_call(call)
            call.fail("ECANCELED", "the agent ended")
        self.engine.cancel_owner(proc.id)

    def _end_llm_call(self, call: Call) -> None:
        """``call`` no longer counts against its caller's pending cap and token reservation (idempotent)."""
        proc = call.caller.proc
        if proc is not None and not call.ended:
            proc.reserved_tokens -= call.reserved
            proc.pending -= 1
        call.reserved, call.ended = 0, True
        self.tool_chats.pop(call, None)

    def _on_prepared(self, call: Call, prep, error: BaseException | None) -> None:
        """Preparer worker: hand the outcome to the main thread, as engine events are."""
        self._on_engine_events([(call, "prepared", (prep, error))])

    def _prepared(self, call: Call, prep, error: BaseException | None) -> None:
        """Main thread: queue a prepared request on its engine, or answer why it cannot run."""
        entry = self._preparing.pop(call, None)
        proc = call.caller.proc
        if entry is None or call.done or (proc is not None and not proc.alive):  # cancelled, or its agent ended
            if prep is not None:
                prep.free()
            self._end_llm_call(call)
            return
        if error is not None:
            self._end_llm_call(call)
            if not isinstance(error, EngineError):
                log.error("preparing an LLM request failed", exc_info=error)
                error = EngineError("EIO", f"the kernel could not prepare this request ({type(error).__name__})")
            call.fail(error.code, error.message)
            return
        stream, priority = entry
        try:
            max_tokens = check_tokens(proc, len(prep.tokens), prep.params.max_tokens) if proc else None
            self.engine.enqueue(prep, max_tokens=max_tokens, owner=proc.id if proc else None, tag=call,
                                stream=stream, priority=priority, key=call.key, scope=self._share_scope(proc))
        except (EngineError, SyscallError) as exc:
            prep.free()
            self._end_llm_call(call)
            call.fail(exc.code, exc.message)
            return
        if proc is not None:
            call.reserved = len(prep.tokens) + prep.params.max_tokens
            proc.reserved_tokens += call.reserved

    def _on_engine_events(self, events: list) -> None:
        """Engine (or worker) thread: hand a step's events, ``[(request, kind, payload)]``, to the main thread --
        one wake-up for all of them."""
        self._events.extend(events)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full, so the main thread is already due to wake
            pass

    def _drain_engine_events(self) -> None:
        try:
            while os.read(self._wake_r, 65536):
                pass
        except BlockingIOError:
            pass
        events, charged = self._events, set()
        while events:
            request, kind, payload = events.popleft()
            if kind == "prepared":
                self._prepared(request, *payload)
                continue
            if kind == "offloaded":
                self._offload_done(request, *payload)
                continue
            call: Call = request.tag
            if kind == "chunk":
                call.chunk(payload)
                continue
            proc = call.caller.proc
            usage = payload["usage"] if kind == "done" else getattr(payload, "usage", None)
            specs = self.tool_chats.get(call)
            self._end_llm_call(call)
            if kind == "done" and specs is not None:
                payload = toolcalls.shape(payload, specs, f"call_{call.rid}")
            if proc is not None and usage:  # cancelled, failed and killed requests are charged what they computed
                proc.prompt_tokens += usage["prompt_tokens"]
                proc.completion_tokens += usage["completion_tokens"]
                charged.add(proc)
            if kind == "done":
                call.reply(payload)
            else:
                call.fail(payload.code, str(payload))
        if charged:  # on disk at once: a kernel crash must not wipe tokens off a quota (docs/operating.md)
            self._save(charged)


def venv_site_packages(venv: str) -> str:
    """The real path of ``venv``'s site-packages for the kernel's Python (``lib/pythonX.Y/site-packages``);
    EINVAL, naming what is missing, when ``venv`` is not such a virtual environment."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = os.path.realpath(os.path.join(venv, "lib", version, "site-packages"))
    if not os.path.isfile(os.path.join(venv, "pyvenv.cfg")) or not os.path.isdir(site):
        raise EINVAL(f"{venv} is not a virtual environment of {version} (no pyvenv.cfg and lib/{version}/"
                     f"site-packages): make one with `{version} -m venv {venv}`")
    return site


def _joined(reason: str | None, more: str) -> str:
    return f"{reason}; {more}" if reason else more


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

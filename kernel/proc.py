"""The process table: agent processes, their explicit state machine, and the verbs on them.

States (docs/abi.md, process record)::

    STARTING --first syscall--> RUNNING --exit--> EXITED
        |                          |
        +----------signal / kill---+-----------> KILLED (reason)
        |                          |
        +------the kernel stops----+-----------> LOST (reason)

A process with a restart policy (``restart``: on-failure, always) is relaunched as a new process of the same
chain (``previous`` / ``next``) when it ends; ``kernel.restart`` decides whether and when.

``ProcTable`` allocates ids, maps pids to processes, and spawns, kills and reaps; ``restore`` brings back the
records of an earlier kernel (kernel/procdb.py).  It knows nothing of sockets or the LLM; the kernel wires
those in.
"""
from __future__ import annotations

import codecs
import enum
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

from sandbox.paths import agent_sys_path
from sandbox.policy import ENV as POLICY_ENV
from sandbox.policy import Policy
from syscalls.errors import EAGAIN, ENOENT

log = logging.getLogger("aiosd")

# How an agent starts.  -I: isolated mode (no PYTHON* variables, no user site, no cwd on sys.path); -S: no
# `site` -- agents need none of its .pth processing (code hooks) or editable-install finders, and skipping it
# saves ~20 ms of every start, so sys.path is given explicitly; -u: unbuffered output, so that
# `aiosctl logs --follow` sees lines as they are printed.  argv after the code: [filename, *args].
_BOOT = f"import sys; sys.path[:0] = {agent_sys_path()!r}; from agentproc.bootstrap import main; main()"

MAX_OUTPUT_KEPT = 4 << 20  # characters of captured output kept in memory per process (the latest)
# Bytes of captured output written to an agent's log file when it has no disk_mb limit; with one, the log
# stops at disk_mb (its bytes count against disk_mb too: kernel.resources).  docs/sandbox.md, "Disk".
MAX_LOG_BYTES = 64 << 20
MB = 1 << 20


class State(enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    EXITED = "EXITED"
    KILLED = "KILLED"
    LOST = "LOST"        # alive when its kernel stopped (docs/abi.md, process record)


class Output:
    """Captured stdout (fd 1) and stderr (fd 2) of one process: the latest pieces in memory, and the first
    ``cap`` bytes in a log file.

    At the cap the log gets one marker line (``TRUNCATED``) and no more; ``log_bytes`` (marker included) is
    what the process has had written to disk for it.  An error writing the log (a full disk: ENOSPC, EFBIG,
    EIO) stops the log with one warning in the kernel's log; it never reaches the caller, and the pieces in
    memory (``proc.logs``) go on."""

    TRUNCATED = "\n[aiosd: output truncated: the log reached its cap of {cap} bytes]\n"

    def __init__(self, log_path: Path | None, cap: int = MAX_LOG_BYTES):
        """``log_path`` None: no log file (a record restored from an earlier kernel: its output is gone)."""
        self.log_path = log_path
        self.cap = cap
        self.log_bytes = 0
        self.truncated = False
        self.pieces: list[tuple[int, str]] = []
        self._kept = 0
        self._decoders = {1: codecs.getincrementaldecoder("utf-8")("replace"),
                          2: codecs.getincrementaldecoder("utf-8")("replace")}
        self._log = None
        if log_path is None:
            return
        try:
            self._log = open(log_path, "wb", buffering=0)
        except OSError as exc:
            self._stop_log(exc)

    def add(self, fd: int, data: bytes, final: bool = False) -> str:
        """Record ``data`` read from ``fd``; return the text it completes (may be empty)."""
        text = self._decoders[fd].decode(data, final)
        if text:
            self._append(fd, text)
            if self._log is not None:
                self._write_log(text)
        return text

    def text(self) -> str:
        return "".join(t for _, t in self.pieces)

    def close(self) -> None:
        if self._log is not None:
            try:
                self._log.close()
            except OSError:
                pass
            self._log = None

    def _append(self, fd: int, text: str) -> None:
        self.pieces.append((fd, text))
        self._kept += len(text)
        while self._kept > MAX_OUTPUT_KEPT and len(self.pieces) > 1:
            self._kept -= len(self.pieces.pop(0)[1])

    def _write_log(self, text: str) -> None:
        data = text.encode("utf-8")
        room = self.cap - self.log_bytes
        if len(data) > room:  # the whole characters that fit, then the marker
            data = data[:max(room, 0)].decode("utf-8", "ignore").encode("utf-8")
            self.truncated = True
        try:
            self._write(data)
            if self.truncated:
                marker = self.TRUNCATED.format(cap=self.cap)
                self._append(2, marker)
                self._write(marker.encode("utf-8"))
                self.close()
        except OSError as exc:
            self._stop_log(exc)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._log.write(view)  # a short write is followed by the error, if any, on the next
            if not n:
                raise OSError(f"wrote nothing of {len(view)} bytes")
            self.log_bytes += n
            view = view[n:]

    def _stop_log(self, exc: OSError) -> None:
        log.warning("cannot write the log %s (%s); no longer writing it, its output stays in memory",
                    self.log_path, exc.strerror or exc)
        self.close()


@dataclass(eq=False)
class Proc:
    """One agent process.  ``token`` is the ZeroMQ routing id the kernel gave it (a secret)."""

    id: int
    name: str
    group: str
    pid: int
    token: bytes
    owner: str
    scratch: Path
    output: Output
    popen: subprocess.Popen | None = None
    state: State = State.STARTING
    started_at: float = field(default_factory=time.time)
    first_syscall_at: float | None = None
    ended_at: float | None = None
    exit_status: int | None = None
    reason: str | None = None
    kill_reason: str | None = None
    pipes: dict[int, int] = field(default_factory=dict)  # fd number in the kernel -> 1 or 2
    syscalls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reserved_tokens: int = 0          # prompt + max_tokens of generations in flight (token quota)
    pending: int = 0                  # its LLM requests not yet answered ([kernel] max_pending)
    followers: int = 0                # proc.logs follow streams it holds open ([kernel] max_followers)
    offloaded: int = 0                # its storage/memory calls queued or running on a worker ([kernel] max_pending)
    limits: dict = field(default_factory=dict)
    fleet: str | None = None  # the fleet it was launched in (proc.spawn ``fleet``): a prefix-sharing scope
    layers: dict | None = None        # sandbox layers as attested by the bootstrap (proc.ready)
    rate_bucket: object = None        # kernel.resources.RateBucket when syscall_rate is limited
    usage_sample: object = None       # the resource manager's latest kernel.resources.Usage
    restart: str = "no"               # restart policy: no | on-failure | always
    restarts: int = 0                 # relaunches of its chain before this run
    previous: int | None = None       # the run this one relaunches
    next: int | None = None           # its relaunch, once started
    restart_at: float | None = None   # when its relaunch is due (unix time), while it waits for it
    stopped: bool = False             # proc.kill stopped it: never relaunched
    lost_reason: str | None = None    # set when the kernel stops it at shutdown: it ends LOST
    cpu_before: float = 0.0           # CPU seconds of the earlier runs of its chain (the cpu_seconds quota)
    wall_before: float = 0.0          # seconds alive of the earlier runs of its chain (wall_seconds)
    cpu_seconds: float = 0.0          # CPU seconds of its chain as last measured (kept after it ends)
    spec: dict | None = None          # what a relaunch needs (kernel/procdb.py), for a restart policy
    saved_mark: tuple = ()            # usage_mark() when its record was last written to disk
    trace: object = None              # its kernel.trace.Trace while it is traced (proc.spawn ``trace``)

    def continue_chain(self, prev: "Proc") -> None:
        """This process relaunches ``prev``: it inherits the chain's policy, launch spec and usage -- tokens, CPU
        and wall time count the whole chain against the lifetime quotas (docs/abi.md, "Restart chains")."""
        self.restart, self.spec, self.previous, self.restarts = prev.restart, prev.spec, prev.id, prev.restarts + 1
        self.prompt_tokens, self.completion_tokens = prev.prompt_tokens, prev.completion_tokens
        self.cpu_before = self.cpu_seconds = prev.cpu_seconds
        self.wall_before = prev.wall_seconds()
        prev.next, prev.restart_at = self.id, None

    @property
    def alive(self) -> bool:
        return self.state in (State.STARTING, State.RUNNING)

    def record(self) -> dict:
        """The process record of docs/abi.md section 4."""
        return {
            "id": self.id, "name": self.name, "group": self.group, "pid": self.pid,
            "state": self.state.value, "started_at": self.started_at,
            "first_syscall_at": self.first_syscall_at, "ended_at": self.ended_at,
            "exit_status": self.exit_status, "reason": self.reason, "limits": self.limits, "fleet": self.fleet,
            "layers": self.layers or {},
            "usage": {"syscalls": self.syscalls, "prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens,
                      "llm_tokens": self.prompt_tokens + self.completion_tokens,
                      "cpu_seconds": round(self.cpu_seconds, 2), **self._sampled()},
            "restart": self.restart, "restarts": self.restarts, "previous": self.previous, "next": self.next,
            "restart_at": self.restart_at,
        }

    def usage_mark(self) -> tuple:
        """What changes in its record as it runs (written to disk about once a second when it does)."""
        return (self.state, self.syscalls, self.prompt_tokens, self.completion_tokens, round(self.cpu_seconds, 1))

    def wall_seconds(self) -> float:
        """Seconds alive of its chain: the earlier runs' and this one's so far."""
        return self.wall_before + ((self.ended_at or time.time()) - self.started_at)

    def stored(self) -> dict:
        """The record as kernel/procdb.py keeps it: the ABI record and the private fields a restart needs."""
        rec = self.record()
        for key in ("rss_mb", "disk_mb", "procs", "open_files"):
            rec["usage"].pop(key, None)
        rec.update(_owner=self.owner, _stopped=self.stopped, _cpu_before=self.cpu_before,
                   _wall_before=self.wall_before)
        return rec

    @classmethod
    def restored(cls, rec: dict, spec: dict | None) -> "Proc":
        """A record from an earlier kernel (ended, or to be marked LOST by the caller)."""
        u = rec.get("usage", {})
        return cls(id=rec["id"], name=rec["name"], group=rec["group"], pid=rec["pid"], token=b"",
                   owner=rec.get("_owner", "?"), scratch=Path("/nonexistent"), output=Output(None),
                   state=State(rec["state"]), started_at=rec["started_at"],
                   first_syscall_at=rec.get("first_syscall_at"), ended_at=rec.get("ended_at"),
                   exit_status=rec.get("exit_status"), reason=rec.get("reason"),
                   syscalls=u.get("syscalls", 0), prompt_tokens=u.get("prompt_tokens", 0),
                   completion_tokens=u.get("completion_tokens", 0), limits=rec.get("limits", {}),
                   fleet=rec.get("fleet"), layers=rec.get("layers"), restart=rec.get("restart", "no"),
                   restarts=rec.get("restarts", 0), previous=rec.get("previous"), next=rec.get("next"),
                   restart_at=rec.get("restart_at"), stopped=rec.get("_stopped", False),
                   cpu_before=rec.get("_cpu_before", 0.0), wall_before=rec.get("_wall_before", 0.0),
                   cpu_seconds=u.get("cpu_seconds", 0.0), spec=spec)

    def _sampled(self) -> dict:
        """The resource manager's latest sample of a live agent (RSS, CPU, disk), rounded."""
        u = self.usage_sample
        if u is None or not self.alive:
            return {}
        return {"rss_mb": round(u.rss_mb, 1), "disk_mb": round(u.disk_mb, 2), "procs": u.procs,
                "open_files": u.open_files}


class ProcTable:
    """All agent processes of this kernel, by id and by pid.  Ended processes stay listed (like zombies)
    so their status can be read; the table holds ``max_procs`` live processes at most."""

    def __init__(self, runtime_dir: Path, kernel_socket: str, max_procs: int):
        self.runtime_dir = runtime_dir
        self.kernel_socket = kernel_socket
        self.max_procs = max_procs
        self._by_id: dict[int, Proc] = {}
        self._by_pid: dict[int, Proc] = {}
        self._by_token: dict[bytes, Proc] = {}  # every agent ever started: a token names one agent for good
        self._next_id = 1

    def restore(self, rows: list[tuple[dict, dict | None]], next_id: int, lost_reason: str) -> list[Proc]:
        """Bring back an earlier kernel's records (kernel/procdb.py ``load``); those still STARTING or RUNNING
        become LOST with ``lost_reason``.  Returns the processes made LOST.  Ids continue after every earlier one."""
        lost = []
        for rec, spec in rows:
            proc = Proc.restored(rec, spec)
            if proc.alive:
                proc.state, proc.reason, proc.ended_at = State.LOST, lost_reason, time.time()
                lost.append(proc)
            self._by_id[proc.id] = proc
            self._next_id = max(self._next_id, proc.id + 1)
        self._next_id = max(self._next_id, next_id)
        return lost

    # --- lookups -------------------------------------------------------------------------------------
    def get(self, pid_: int) -> Proc:
        """The process with id ``pid_``; ENOENT when there is none."""
        proc = self._by_id.get(pid_)
        if proc is None:
            raise ENOENT(f"no process with id {pid_}; `aiosctl ps` lists them")
        return proc

    def lookup(self, pid_: int) -> Proc | None:
        """The process with id ``pid_``, or None."""
        return self._by_id.get(pid_)

    def by_token(self, token: bytes) -> Proc | None:
        """The process (live or ended) that was given routing id ``token`` at launch."""
        return self._by_token.get(token)

    def by_pid(self, pid: int) -> Proc | None:
        """The live process whose OS pid is ``pid``."""
        return self._by_pid.get(pid)

    @property
    def next_id(self) -> int:
        """The id the next spawned process will get."""
        return self._next_id

    def all(self) -> list[Proc]:
        return list(self._by_id.values())

    def live(self) -> list[Proc]:
        return [p for p in self._by_id.values() if p.alive]

    # --- verbs ---------------------------------------------------------------------------------------
    def spawn(self, source: str, filename: str, name: str, group: str, argv: list[str], owner: str,
              limits: dict, make_policy: Callable[[Path], Policy], files: dict[str, str] | None = None) -> Proc:
        """Start ``source`` as a new agent process (bootstrap first, then the program as ``__main__``).

        The child gets a scrubbed environment, its own session and process group, a private 0700 scratch
        directory as cwd, pipes for stdout and stderr (it inherits no other descriptor) and the sandbox policy
        ``make_policy(scratch)``, which its bootstrap applies.  Raises EAGAIN when ``max_procs`` processes
        are alive.  ``files`` (relative path -> text): more files of a multi-file agent, written into the
        scratch dir beside the program.
        """
        if len(self.live()) >= self.max_procs:
            raise EAGAIN(f"the process table is full ({self.max_procs} live processes); wait or kill one")
        pid_ = self._next_id
        self._next_id += 1
        scratch = self.runtime_dir / "scratch" / str(pid_)
        scratch.mkdir(mode=0o700, parents=True)
        policy = make_policy(scratch)  # first: it may mount the scratch dir's own filesystem
        program = scratch / filename
        program.write_text(source, encoding="utf-8")
        written = [program]
        for rel, text in (files or {}).items():  # paths checked by the schema: relative, no "..", no dot files
            path = scratch / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written += [path, *[p for p in path.parents if scratch in p.parents]]
        if policy.uid is not None:
            for path in written:
                os.chown(path, policy.uid, policy.gid)
        token = b"A" + secrets.token_bytes(15)  # user-set routing ids must not start with a zero byte
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "LANG": "C.UTF-8",
            "AIOSD_SOCKET": self.kernel_socket, "AIOSD_TOKEN": token.hex(),
            "AIOSD_KERNEL_PID": str(os.getpid()), "AIOSD_PROGRAM": str(program),
            POLICY_ENV: policy.to_env(),
        }
        output = Output(self.runtime_dir / "logs" / f"{pid_}.log",
                        limits["disk_mb"] * MB if limits.get("disk_mb") else MAX_LOG_BYTES)
        cmd = [sys.executable, "-I", "-S", "-u", "-c", _BOOT, filename, *argv]
        # The output pipes are plain descriptors the kernel owns and closes exactly once (kernel.py
        # _close_pipe), not Popen's file objects: those would close the same number again when dropped,
        # by then possibly a descriptor ZeroMQ's I/O thread had been given (libzmq then aborts: EBADF in
        # epoll_ctl, seen under the churn of short-lived tool workers).
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen(
                cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                stderr=err_w, close_fds=True, start_new_session=True,
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            output.close()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        proc = Proc(id=pid_, name=name, group=group, pid=popen.pid, token=token, owner=owner,
                    scratch=scratch, output=output, popen=popen, limits=limits)
        for fd_no, fd in ((1, out_r), (2, err_r)):
            os.set_blocking(fd, False)
            proc.pipes[fd] = fd_no
        self._by_id[pid_] = proc
        self._by_pid[proc.pid] = proc
        self._by_token[token] = proc
        return proc

    def reap(self) -> list[Proc]:
        """Collect every exited child without blocking; return the table's processes that ended.

        Orphans the kernel adopted as subreaper are collected too and ignored.
        """
        ended = []
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            proc = self._by_pid.pop(pid, None)
            if proc is not None:
                # Its CPU: the last sample or, if more, what the OS counted for it and the children it waited for
                proc.cpu_seconds = max(proc.cpu_seconds, proc.cpu_before + rusage.ru_utime + rusage.ru_stime)
                self._finish(proc, status)
                ended.append(proc)
        return ended

    def _finish(self, proc: Proc, status: int) -> None:
        proc.ended_at = time.time()
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            proc.exit_status = -sig
            proc.state = State.KILLED
            proc.reason = proc.kill_reason or f"signal {signal.Signals(sig).name}"
        else:
            proc.exit_status = os.WEXITSTATUS(status)
            proc.state = State.EXITED
            proc.reason = proc.kill_reason  # e.g. killed while already exiting
        if proc.lost_reason is not None:  # stopped by the kernel's own shutdown
            proc.state, proc.reason = State.LOST, proc.lost_reason
        if proc.popen is not None:
            proc.popen.returncode = proc.exit_status  # we reaped it; keep subprocess from trying again

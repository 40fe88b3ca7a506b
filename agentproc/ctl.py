"""``aiosctl``: control a running kernel (run, ps, kill, logs, status, shutdown, reload, metrics, top, storage,
access, pending, approve, deny, audit).  ``--json`` (before or after the command) makes every command print
JSON: one document, or one object a line for what streams (``logs -f``, ``run --wait``, ``top``).

Exit status (docs/operating.md, "aiosctl"): 0 success; 1 the kernel refused (the ABI error is printed) or a file
could not be read, or ``audit --verify`` found the chain broken; 2 usage; 3 no kernel is running at the runtime
dir (or it does not answer); 130 interrupted.  ``run --wait`` exits with the agent's own status (128 + signal
when it was killed, 1 when it has none: LOST).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import time

from agentproc import storage
from agentproc.client import Client
from syscalls import address as codec
from syscalls.errors import ETIMEDOUT, SyscallError
from syscalls.schemas import KILL_SIGNALS

REFUSED, USAGE, NO_KERNEL, INTERRUPTED = 1, 2, 3, 130  # exit statuses (module docstring)
RECHECK_S = 2.0  # a follow stream quiet this long: is the kernel still there?


class NoKernel(Exception):
    pass


def _client(runtime_dir: str, timeout: float) -> Client:
    sock = os.path.join(runtime_dir, codec.SOCKET_NAME)
    if not os.path.exists(sock):
        raise NoKernel(f"no kernel is running at {runtime_dir} (no {codec.SOCKET_NAME}); "
                       f"start one with `aiosd --runtime-dir {runtime_dir}`")
    client = Client(codec.endpoint(runtime_dir), timeout=timeout)
    try:
        client.call("sys.ping")
    except ETIMEDOUT:
        client.close()
        raise NoKernel(f"the kernel at {runtime_dir} does not answer; is it stopped? "
                       f"(remove {sock} if it is stale)") from None
    return client


def _emit(a, value) -> None:
    """Print ``value`` as one JSON document (``--json``)."""
    print(json.dumps(value, indent=2))


def _line(value) -> None:
    """One JSON object on one line (streams under ``--json``)."""
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def _plain(obj) -> dict:
    """A storage Version as a JSON-ready dict (its ``data``, for a Value: ``data`` as UTF-8 text, or
    ``data_base64`` when it is not text)."""
    d = {k: getattr(obj, k) for k in ("key", "version", "size", "sha256", "content_type", "mtime", "deleted",
                                      "versions") if getattr(obj, k, None) is not None}
    data = getattr(obj, "data", None)
    if data is not None:
        try:
            d["data"] = data.decode("utf-8")
        except UnicodeDecodeError:
            d["data_base64"] = base64.b64encode(data).decode()
    return d


def _age(record: dict) -> str:
    end = record.get("ended_at") or time.time()
    s = int(end - record["started_at"])
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


LIMIT_FLAGS = {  # aiosctl run flag -> ABI limit key (docs/abi.md, proc.spawn)
    "memory_mb": "memory (MB, resident, whole process tree)", "cpu_seconds": "CPU seconds",
    "wall_seconds": "wall-clock seconds", "procs": "processes + threads", "open_files": "open files",
    "disk_mb": "MB in its scratch dir plus its captured output",
    "disk_inodes": "files + directories in its scratch dir", "llm_tokens": "LLM tokens (prompt + completion)",
    "syscall_rate": "syscalls per second",
    "storage_mb": "MB its storage and memory namespace keeps", "storage_keys": "keys + memory entries it keeps",
}
_LIMIT_SHORT = {"memory_mb": ("mem", "M"), "cpu_seconds": ("cpu", "s"), "wall_seconds": ("wall", "s"),
                "procs": ("procs", ""), "open_files": ("fds", ""), "disk_mb": ("disk", "M"),
                "disk_inodes": ("inodes", ""), "llm_tokens": ("tokens", ""), "syscall_rate": ("rate", "/s"),
                "storage_mb": ("store", "M"), "storage_keys": ("keys", "")}


def _limits(record: dict) -> str:
    parts = [f"{_LIMIT_SHORT[k][0]}={v}{_LIMIT_SHORT[k][1]}" for k, v in record.get("limits", {}).items()
             if v is not None and k in _LIMIT_SHORT]
    return " ".join(parts) or "-"


def _layers(record: dict) -> str:
    """Layers that are on, by name; the off ones (with reasons) are in `ps --json`."""
    layers = record.get("layers") or {}
    on = [name for name, status in layers.items() if status.startswith("on")]
    return ",".join(on) if layers else "-"


def cmd_ps(c: Client, a) -> int:
    procs = c.call("proc.list")["procs"]
    if a.json:
        print(json.dumps(procs, indent=2))
        return 0
    rows = [("ID", "NAME", "GROUP", "PID", "STATE", "TIME", "TOKENS", "LAYERS", "LIMITS", "STATUS")]
    for p in procs:
        status = "" if p["exit_status"] is None else str(p["exit_status"])
        if p["reason"]:
            status = f"{status} ({p['reason']})".strip()
        rows.append((str(p["id"]), p["name"], p["group"], str(p["pid"]), p["state"], _age(p),
                     str(p["usage"]["llm_tokens"]), _layers(p), _limits(p), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _exit_status(record: dict) -> int:
    st = record.get("exit_status")
    if st is None:
        return 1
    return 128 - st if st < 0 else st


class KernelGone(Exception):
    """The kernel stopped answering in the middle of a follow."""


def _stream_logs(c: Client, pid: int, a) -> dict:
    """Print ``pid``'s captured output, then what it prints until it ends; its final record.  Raises KernelGone
    when the stream has been quiet ``RECHECK_S`` and the kernel does not answer a ping."""
    s = c.stream("proc.logs", {"id": pid, "follow": True}, timeout=RECHECK_S)
    while True:
        try:
            piece = next(s)
        except StopIteration:
            return s.result
        except ETIMEDOUT:
            try:
                c.call("sys.ping", timeout=RECHECK_S)
            except (ETIMEDOUT, SyscallError):  # gone, or a new kernel that no longer knows our credential
                raise KernelGone() from None
            continue
        if a.json:
            _line({"id": pid, **piece})
        else:
            out = sys.stdout if piece["fd"] == 1 else sys.stderr
            out.write(piece["data"])
            out.flush()


def _reconnect(a) -> Client:
    """A client of the kernel at the runtime dir, once one answers again (a restart takes a while)."""
    print(f"aiosctl: the kernel at {a.runtime_dir} went away; waiting for it to come back", file=sys.stderr)
    while True:
        try:
            return _client(a.runtime_dir, RECHECK_S)
        except NoKernel:
            time.sleep(0.5)


def _record(c: Client, pid: int) -> dict:
    for p in c.call("proc.list")["procs"]:
        if p["id"] == pid:
            return p
    raise SyscallError(f"no process with id {pid}", "ENOENT")


def _follow(holder: list, pid: int, a) -> dict:
    """Follow ``pid``'s output to the end of its restart chain: from run to run as it is relaunched, and across
    restarts of the kernel (reconnecting; the run that was alive is LOST, and its relaunch is followed).
    ``holder[0]`` is the client, replaced on reconnection.  Returns the chain's last record."""
    while True:
        try:
            rec = _stream_logs(holder[0], pid, a)
            while rec["next"] is None and rec["restart_at"] is not None:  # waiting for its relaunch
                time.sleep(min(0.5, max(0.05, rec["restart_at"] - time.time())))
                rec = _record(holder[0], pid)
        except (KernelGone, ETIMEDOUT):
            holder[0].close()
            holder[0] = _reconnect(a)
            continue
        if rec["next"] is None:
            return rec
        print(f"aiosctl: agent {pid} ended ({rec['state']} {rec['reason'] or rec['exit_status']}); following its "
              f"relaunch {rec['next']}", file=sys.stderr)
        pid = rec["next"]


def cmd_run(c: Client, a) -> int:
    with open(a.file, encoding="utf-8") as f:
        source = f.read()
    args = {"source": source, "filename": os.path.basename(a.file), "group": a.group, "argv": a.args}
    if a.name:
        args["name"] = a.name
    if a.fleet:
        args["fleet"] = a.fleet
    if a.trace:
        args["trace"] = True
    if a.venv:
        args["venv"] = os.path.abspath(a.venv)
    if a.restart != "no":
        args["restart"] = a.restart
    limits = {k: getattr(a, k) for k in LIMIT_FLAGS if getattr(a, k) is not None}
    if limits:
        args["limits"] = limits
    rec = c.call("proc.spawn", args)
    if not a.wait:
        if a.json:
            _emit(a, rec)
        else:
            print(rec["id"])
        return 0
    end = _follow(a.holder, rec["id"], a)
    if a.json:
        _line(end)
    return _exit_status(end)


def signal_name(text: str) -> str:
    """``TERM``, ``SIGTERM``, ``sigterm`` or ``15`` -> ``"SIGTERM"`` (argparse type of ``kill -s``)."""
    name = text.upper()
    if text.isdigit():
        try:
            name = signal.Signals(int(text)).name
        except ValueError:
            raise argparse.ArgumentTypeError(f"no signal number {text}") from None
    name = name if name.startswith("SIG") else "SIG" + name
    if name not in KILL_SIGNALS:
        raise argparse.ArgumentTypeError(f"{text}: the kernel sends {', '.join(KILL_SIGNALS)}")
    return name


def cmd_trace(c: Client, a) -> int:
    """An agent's syscall trace (docs/abi.md, "Syscall traces"): one line a call, or the JSON that
    ``kernel.testing.Trace.load`` reads (``--save FILE``)."""
    entries, after = [], 0
    while True:
        page = c.call("proc.trace", {"id": a.id, "after": after})
        entries += page["entries"]
        if not page["more"] or not page["entries"]:
            break
        after = page["entries"][-1]["seq"]
    doc = {"name": page["name"], "dropped": page["dropped"], "entries": entries}
    if a.save:
        with open(a.save, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"saved {len(entries)} calls of agent {a.id} ({page['name']}) to {a.save}")
        return 0
    if page["dropped"]:
        print(f"({page['dropped']} older calls dropped: [kernel] trace_kb)")
    for e in entries:
        outcome = json.dumps(e.get("result"))[:120] if e["ok"] else e["error"]
        print(f"{e['seq']:>5} {e['t']:9.3f}s {e['ms']:8.1f}ms {e['call']} {json.dumps(e['args'])[:160]} -> {outcome}")
    return 0


def cmd_kill(c: Client, a) -> int:
    rec = c.call("proc.kill", {"id": a.id, "signal": a.signal})
    if a.json:
        _emit(a, rec)
    elif a.signal == "SIGKILL":
        print(f"killed {rec['id']} ({rec['name']})")
    else:
        print(f"sent {a.signal} to {rec['id']} ({rec['name']})")
    return 0


def cmd_logs(c: Client, a) -> int:
    if a.follow:
        end = _follow(a.holder, a.id, a)
        if a.json:
            _line(end)
    elif a.json:
        _emit(a, c.call("proc.logs", {"id": a.id}))
    else:
        sys.stdout.write(c.call("proc.logs", {"id": a.id})["output"])
    return 0


def cmd_status(c: Client, a) -> int:
    st = c.call("sys.status")
    if a.json:
        print(json.dumps(st, indent=2))
        return 0
    up = int(st["uptime_s"])
    print(f"aiosd (pid {st['pid']}) running at {a.runtime_dir} for {up // 3600}:{up // 60 % 60:02d}:{up % 60:02d}; "
          f"{st['procs']['live']} live agents, {st['procs']['total']} in the table")
    for name, eng in st["llm"].items():
        print(f"  model {name}: scheduler {eng.get('scheduler', '?')}, {eng.get('active', 0)} active, "
              f"{eng.get('waiting', 0)} waiting, {eng.get('tokens_generated', 0)} tokens generated")
    for layer, state in st["sandbox"].items():
        print(f"  sandbox {layer}: {state}")
    return 0


def top_frame(st: dict, procs: list[dict], prev: dict, dt: float) -> str:
    """One screen of ``aiosctl top``: the kernel, each engine, each live agent (CPU % and tokens/s from the
    previous frame's figures in ``prev``, updated in place)."""
    up = int(st["uptime_s"])
    live = [p for p in procs if p["state"] in ("STARTING", "RUNNING")]
    lines = [f"aiosd pid {st['pid']}  up {up // 3600}:{up // 60 % 60:02d}:{up % 60:02d}  "
             f"{len(live)} live agents, {st['procs']['total']} in the table"]
    for name, eng in st["llm"].items():
        gen = eng.get("tokens_generated", 0)
        rate = (gen - prev.get(("engine", name), gen)) / dt if dt else 0.0
        prev[("engine", name)] = gen
        lines.append(f"engine {name}: batch {eng.get('active', 0)}, waiting {eng.get('waiting', 0)}, KV cells "
                     f"{eng.get('kv_cells_used', 0)}, {rate:.1f} tokens/s, evictions {eng.get('evictions', 0)}")
    lines.append(f"{'ID':>5} {'NAME':<20} {'GROUP':<10} {'STATE':<8} {'CPU%':>6} {'RSS MB':>8} {'TOK/S':>7} "
                 f"{'TOKENS':>8}")
    for p in live:
        u = p["usage"]
        cpu, tokens = u.get("cpu_seconds", 0.0), u.get("llm_tokens", 0)
        pcpu = 100 * (cpu - prev.get(("cpu", p["id"]), cpu)) / dt if dt else 0.0
        ptok = (tokens - prev.get(("tok", p["id"]), tokens)) / dt if dt else 0.0
        prev[("cpu", p["id"])], prev[("tok", p["id"])] = cpu, tokens
        lines.append(f"{p['id']:>5} {p['name'][:20]:<20} {p['group'][:10]:<10} {p['state']:<8} {pcpu:>6.1f} "
                     f"{u.get('rss_mb', 0.0):>8.1f} {ptok:>7.1f} {tokens:>8}")
    return "\n".join(lines) + "\n"


def cmd_top(c: Client, a) -> int:
    """A live view of agents and engines; plain frames one after another when stdout is not a terminal."""
    tty = sys.stdout.isatty() and not a.once
    prev: dict = {}
    last = None
    n = 0
    while True:
        now = time.monotonic()
        st, procs = c.call("sys.status"), c.call("proc.list")["procs"]
        if a.json:
            _line({"time": time.time(), "status": st, "procs": procs})
        else:
            frame = top_frame(st, procs, prev, now - last if last else 0.0)
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + frame + ("" if tty else "\n"))
            sys.stdout.flush()
        last = now
        n += 1
        if a.once or (a.count and n >= a.count):
            return 0
        time.sleep(a.interval)


def cmd_metrics(c: Client, a) -> int:
    """The kernel's Prometheus metrics (text exposition format), as a scraper would read them."""
    got = c.call("sys.metrics")
    if a.json:
        _emit(a, got)
    else:
        sys.stdout.write(got["text"])
    return 0


def cmd_reload(c: Client, a) -> int:
    """SIGHUP to the kernel (its pid from sys.status): it re-reads its config file (docs/operating.md)."""
    pid = c.call("sys.status")["pid"]
    os.kill(pid, signal.SIGHUP)
    if a.json:
        _emit(a, {"pid": pid, "signal": "SIGHUP"})
    else:
        print(f"asked aiosd (pid {pid}) to reload its config; its log says what it applied or refused")
    return 0


def cmd_shutdown(c: Client, a) -> int:
    got = c.call("sys.shutdown")
    if a.json:
        _emit(a, got)
    else:
        print("kernel shutting down")
    return 0


def cmd_storage(c: Client, a) -> int:
    """``storage ls|get|put|versions|rollback NAMESPACE [KEY]``: an operator's view of any namespace."""
    ns = a.namespace
    if a.json:
        return _storage_json(c, a)
    if a.action == "ls":
        for e in storage.list(a.key or "", namespace=ns, client=c):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime))
            print(f"{e.key}\tv{e.version}\t{e.size}\t{e.content_type}\t{when}")
        return 0
    if not a.key:
        raise SystemExit(f"aiosctl storage {a.action} needs a KEY after the namespace")
    if a.action == "get":
        value = storage.get(a.key, version=a.version, namespace=ns, client=c)
        sys.stdout.buffer.write(value.data)
        sys.stdout.flush()
    elif a.action == "put":
        data = sys.stdin.buffer.read() if a.file in (None, "-") else open(a.file, "rb").read()
        v = storage.put(a.key, data, content_type=a.content_type, if_version=a.if_version, namespace=ns, client=c)
        print(f"{v.key} v{v.version} {v.size} bytes sha256 {v.sha256}")
    elif a.action == "versions":
        for v in storage.versions(a.key, namespace=ns, client=c):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.mtime))
            print(f"v{v.version}\t{'deleted' if v.deleted else v.size}\t{v.sha256[:16]}\t{when}")
    elif a.action == "rollback":
        if a.version is None:
            raise SystemExit("aiosctl storage rollback needs --version N (see `aiosctl storage versions`)")
        v = storage.rollback(a.key, a.version, namespace=ns, client=c)
        print(f"{v.key} is now v{v.version} (the content of v{a.version})")
    return 0


def _storage_json(c: Client, a) -> int:
    """``storage`` under ``--json``: entries, versions and values as objects (a value's data as text, or
    ``data_base64``)."""
    ns = a.namespace
    if a.action == "ls":
        _emit(a, [_plain(e) for e in storage.list(a.key or "", namespace=ns, client=c)])
        return 0
    if not a.key:
        raise SystemExit(f"aiosctl storage {a.action} needs a KEY after the namespace")
    if a.action == "get":
        _emit(a, _plain(storage.get(a.key, version=a.version, namespace=ns, client=c)))
    elif a.action == "put":
        data = sys.stdin.buffer.read() if a.file in (None, "-") else open(a.file, "rb").read()
        _emit(a, _plain(storage.put(a.key, data, content_type=a.content_type, if_version=a.if_version,
                                    namespace=ns, client=c)))
    elif a.action == "versions":
        _emit(a, [_plain(v) for v in storage.versions(a.key, namespace=ns, client=c)])
    elif a.action == "rollback":
        if a.version is None:
            raise SystemExit("aiosctl storage rollback needs --version N (see `aiosctl storage versions`)")
        _emit(a, _plain(storage.rollback(a.key, a.version, namespace=ns, client=c)))
    return 0


def cmd_access(c: Client, a) -> int:
    """``access ls|grant|revoke``: the grants of any namespace."""
    if a.action == "ls":
        got = c.call("access.list", {"namespace": a.namespace})
        if a.json:
            _emit(a, got)
            return 0
        for g in got["granted"]:
            print(f"{g['id']}\t{g['namespace']}/{g['prefix']}*\t-> {g['to']}\t{g['mode']}\tby {g['by']}")
        for g in got["received"]:
            print(f"{g['id']}\t{g['namespace']}/{g['prefix']}*\t<- granted to {g['to']}\t{g['mode']}")
    elif a.action == "grant":
        if not a.to:
            raise SystemExit("aiosctl access grant NAMESPACE --to AGENT|group:NAME [--mode read-write] [--prefix P]")
        g = c.call("access.grant", {"namespace": a.namespace, "to": a.to, "mode": a.mode, "prefix": a.prefix})
        if a.json:
            _emit(a, g)
            return 0
        print(f"grant {g['id']}: {g['to']} may {g['mode']} {g['namespace']}/{g['prefix']}*")
    else:
        got = c.call("access.revoke", {"id": int(a.namespace)})
        if a.json:
            _emit(a, got)
        else:
            print(f"revoked grant {a.namespace}")
    return 0


def cmd_pending(c: Client, a) -> int:
    got = c.call("access.pending")
    if a.json:
        _emit(a, got)
        return 0
    for w in got["pending"]:
        print(f"{w['id']}\t{w['who']}\t{w['what']}\t({w['why']}; expires in {w['expires_in']:.0f} s)")
    return 0


def cmd_decide(c: Client, a) -> int:
    w = c.call("access.decide", {"id": a.id, "approve": a.cmd == "approve"})
    if a.json:
        _emit(a, w)
        return 0
    print(f"{'approved' if a.cmd == 'approve' else 'denied'} {w['id']}: {w['who']}: {w['what']}")
    return 0


def cmd_audit(c: Client, a) -> int:
    """Print (``--json``: as stored), follow, or ``--verify`` the hash chain of the audit log.  The file is read
    directly (its path from sys.status, or ``--file``), so a kernel cannot vouch for its own log."""
    from kernel.access import verify
    path = a.file or c.call("sys.status")["audit_log"]
    if a.verify:
        with open(path, encoding="utf-8") as f:
            n, problem = verify(f)
        if a.json:
            _emit(a, {"path": path, "records": n, "intact": problem is None, "problem": problem})
            return 0 if problem is None else 1
        print(f"{path}: {n} records, chain intact" if problem is None else f"{path}: {problem} (after {n} good)")
        return 0 if problem is None else 1
    with open(path, encoding="utf-8") as f:
        while True:
            line = f.readline()
            if not line:
                if not a.follow:
                    return 0
                time.sleep(0.2)
                continue
            if a.json:
                sys.stdout.write(line)
            else:
                r = json.loads(line)
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"]))
                detail = " ".join(f"{k}={v}" for k, v in r["detail"].items() if v is not None)
                print(f"{r['seq']}\t{when}\t{r['who']}\t{r['what']}\t{r['decision']}\t{detail}")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiosctl", description="Control a running aiosd kernel.")
    ap.add_argument("--runtime-dir", default=codec.default_runtime_dir(),
                    help="the kernel's runtime dir (default: $AIOSD_RUNTIME_DIR, $XDG_RUNTIME_DIR/aiosd or /tmp/aiosd-UID)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the kernel (default 10)")
    ap.add_argument("--json", action="store_true", help="print JSON (also accepted after the command)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="start an agent program")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--group", default="default")
    p.add_argument("--fleet", help="launch it in this fleet: with [llm] share_prefix = \"fleet\", agents of one "
                                   "fleet reuse each other's cached prompts (docs/engine.md)")
    p.add_argument("--trace", action="store_true", help="record its syscalls (read them with `aiosctl trace ID`)")
    p.add_argument("--venv", metavar="PATH", help="a virtual environment (python -m venv) whose site-packages the "
                                                  "agent imports from, read-only (docs/abi.md, proc.spawn)")
    p.add_argument("--wait", action="store_true", help="stream its output (across relaunches and kernel restarts) "
                                                       "and exit with its status")
    p.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                   help="relaunch it when it fails (on-failure) or whenever it ends (always), with backoff and a "
                        "crash-loop limit; also after a kernel restart (docs/operating.md, \"Restarts\")")
    for key, what in LIMIT_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, metavar="N",
                       help=f"limit: {what} (default: the group's)")
    p.add_argument("args", nargs="*", help="arguments for the program (after --)")
    p.set_defaults(fn=cmd_run)
    sub.add_parser("ps", help="list processes").set_defaults(fn=cmd_ps)
    p = sub.add_parser("kill", help="kill an agent, or send it a signal (a stop also ends its restart chain)")
    p.add_argument("id", type=int)
    p.add_argument("-s", "--signal", type=signal_name, default="SIGKILL", metavar="SIGNAL",
                   help=f"TERM, SIGTERM or 15 ... (default KILL; one of {', '.join(KILL_SIGNALS)})")
    p.set_defaults(fn=cmd_kill)
    p = sub.add_parser("trace", help="the syscalls of an agent run with --trace")
    p.add_argument("id", type=int)
    p.add_argument("--save", metavar="FILE", help="write them as JSON (kernel.testing.Trace.load reads it)")
    p.set_defaults(fn=cmd_trace)
    p = sub.add_parser("logs", help="an agent's captured output")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true",
                   help="then what it prints until it ends, across relaunches and kernel restarts")
    p.set_defaults(fn=cmd_logs)
    sub.add_parser("status", help="is a kernel running, with what? (exit 3 if not)").set_defaults(fn=cmd_status)
    sub.add_parser("shutdown", help="stop the kernel and its agents").set_defaults(fn=cmd_shutdown)
    sub.add_parser("metrics", help="the kernel's Prometheus metrics").set_defaults(fn=cmd_metrics)
    p = sub.add_parser("top", help="a live view of agents (CPU, RSS, tokens/s) and engines")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    p.add_argument("--once", action="store_true", help="one frame, then exit")
    p.add_argument("-n", "--count", type=int, default=0, help="exit after N frames")
    p.set_defaults(fn=cmd_top)
    sub.add_parser("reload", help="re-read the kernel's config (groups, access, kernel limits)").set_defaults(
        fn=cmd_reload)
    p = sub.add_parser("storage", help="read and write any agent's storage (its launch name is its namespace)")
    p.add_argument("action", choices=("ls", "get", "put", "versions", "rollback"))
    p.add_argument("namespace")
    p.add_argument("key", nargs="?", help="the key (for ls: a prefix)")
    p.add_argument("--version", type=int, help="get: that version; rollback: the version to restore")
    p.add_argument("--file", help="put: read the value from FILE (default: standard input)")
    p.add_argument("--content-type", help="put: the value's content type")
    p.add_argument("--if-version", type=int, help="put: only if the key is at this version (0: absent)")
    p.set_defaults(fn=cmd_storage)
    p = sub.add_parser("access", help="grants: who may read or write which namespace")
    p.add_argument("action", choices=("ls", "grant", "revoke"))
    p.add_argument("namespace", help="ls, grant: the namespace; revoke: the grant's id")
    p.add_argument("--to", help="grant: an agent name or group:NAME")
    p.add_argument("--mode", default="read", choices=("read", "read-write"))
    p.add_argument("--prefix", default="", help="grant: only storage keys starting with this")
    p.set_defaults(fn=cmd_access)
    sub.add_parser("pending", help="requests waiting for an operator's approval").set_defaults(fn=cmd_pending)
    for verb in ("approve", "deny"):
        p = sub.add_parser(verb, help=f"{verb} a waiting request")
        p.add_argument("id", type=int)
        p.set_defaults(fn=cmd_decide)
    p = sub.add_parser("audit", help="the audit log of access decisions, grants and confirmations")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--verify", action="store_true", help="check the hash chain (exit 1 if a record was altered)")
    p.add_argument("--file", help="the log to read (default: the kernel's, from sys.status)")
    p.set_defaults(fn=cmd_audit)
    for p in sub.choices.values():  # --json after the command too, without overriding one given before it
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    a = ap.parse_args(argv)
    try:
        client = _client(a.runtime_dir, a.timeout)
    except NoKernel as exc:
        return _fail(a, "ENOKERNEL", str(exc), NO_KERNEL)
    a.holder = [client]  # the client, replaced when a follow reconnects to a restarted kernel
    try:
        return a.fn(client, a)
    except SyscallError as exc:
        return _fail(a, exc.code, exc.message, REFUSED)
    except OSError as exc:
        return _fail(a, "EIO", str(exc), REFUSED)
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        a.holder[0].close()


def _fail(a, code: str, message: str, status: int) -> int:
    """Report an error: ``aiosctl: message`` on stderr, or with ``--json`` ``{"error": {"code", "message"}}`` on
    stdout; return the exit status."""
    if a.json:
        print(json.dumps({"error": {"code": code, "message": message}}))
    else:
        print(f"aiosctl: {message if code in ('ENOKERNEL', 'EIO') else f'{code}: {message}'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

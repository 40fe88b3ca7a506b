"""``aiosctl``: control a running kernel (run, ps, kill, logs, status, shutdown, storage, access, pending,
approve, deny, audit).

Exit status: 0 success; 1 the kernel refused (the ABI error is printed); 2 usage; 3 no kernel is running at
the runtime dir.  ``run --wait`` exits with the agent's own status (128 + signal when it was killed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from agentproc import storage
from agentproc.client import Client
from syscalls import address as codec
from syscalls.errors import ETIMEDOUT, SyscallError

NO_KERNEL = 3


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


def _follow(c: Client, pid: int, follow: bool) -> dict:
    s = c.stream("proc.logs", {"id": pid, "follow": follow}, timeout=None)
    for piece in s:
        out = sys.stdout if piece["fd"] == 1 else sys.stderr
        out.write(piece["data"])
        out.flush()
    return s.result


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
    limits = {k: getattr(a, k) for k in LIMIT_FLAGS if getattr(a, k) is not None}
    if limits:
        args["limits"] = limits
    rec = c.call("proc.spawn", args)
    if not a.wait:
        print(rec["id"])
        return 0
    return _exit_status(_follow(c, rec["id"], follow=True))


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
    rec = c.call("proc.kill", {"id": a.id})
    print(f"killed {rec['id']} ({rec['name']})")
    return 0


def cmd_logs(c: Client, a) -> int:
    if a.follow:
        _follow(c, a.id, follow=True)
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
        frame = top_frame(c.call("sys.status"), c.call("proc.list")["procs"], prev, now - last if last else 0.0)
        last = now
        sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + frame + ("" if tty else "\n"))
        sys.stdout.flush()
        n += 1
        if a.once or (a.count and n >= a.count):
            return 0
        time.sleep(a.interval)


def cmd_metrics(c: Client, a) -> int:
    """The kernel's Prometheus metrics (text exposition format), as a scraper would read them."""
    sys.stdout.write(c.call("sys.metrics")["text"])
    return 0


def cmd_reload(c: Client, a) -> int:
    """SIGHUP to the kernel (its pid from sys.status): it re-reads its config file (docs/operating.md)."""
    pid = c.call("sys.status")["pid"]
    os.kill(pid, signal.SIGHUP)
    print(f"asked aiosd (pid {pid}) to reload its config; its log says what it applied or refused")
    return 0


def cmd_shutdown(c: Client, a) -> int:
    c.call("sys.shutdown")
    print("kernel shutting down")
    return 0


def cmd_storage(c: Client, a) -> int:
    """``storage ls|get|put|versions|rollback NAMESPACE [KEY]``: an operator's view of any namespace."""
    ns = a.namespace
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


def cmd_access(c: Client, a) -> int:
    """``access ls|grant|revoke``: the grants of any namespace."""
    if a.action == "ls":
        got = c.call("access.list", {"namespace": a.namespace})
        for g in got["granted"]:
            print(f"{g['id']}\t{g['namespace']}/{g['prefix']}*\t-> {g['to']}\t{g['mode']}\tby {g['by']}")
        for g in got["received"]:
            print(f"{g['id']}\t{g['namespace']}/{g['prefix']}*\t<- granted to {g['to']}\t{g['mode']}")
    elif a.action == "grant":
        if not a.to:
            raise SystemExit("aiosctl access grant NAMESPACE --to AGENT|group:NAME [--mode read-write] [--prefix P]")
        g = c.call("access.grant", {"namespace": a.namespace, "to": a.to, "mode": a.mode, "prefix": a.prefix})
        print(f"grant {g['id']}: {g['to']} may {g['mode']} {g['namespace']}/{g['prefix']}*")
    else:
        c.call("access.revoke", {"id": int(a.namespace)})
        print(f"revoked grant {a.namespace}")
    return 0


def cmd_pending(c: Client, a) -> int:
    for w in c.call("access.pending")["pending"]:
        print(f"{w['id']}\t{w['who']}\t{w['what']}\t({w['why']}; expires in {w['expires_in']:.0f} s)")
    return 0


def cmd_decide(c: Client, a) -> int:
    w = c.call("access.decide", {"id": a.id, "approve": a.cmd == "approve"})
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
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="start an agent program")
    p.add_argument("file")
    p.add_argument("--name")
    p.add_argument("--group", default="default")
    p.add_argument("--fleet", help="launch it in this fleet: with [llm] share_prefix = \"fleet\", agents of one "
                                   "fleet reuse each other's cached prompts (docs/engine.md)")
    p.add_argument("--wait", action="store_true", help="stream its output and exit with its status")
    p.add_argument("--trace", action="store_true", help="record its syscalls (read them with `aiosctl trace ID`)")
    for key, what in LIMIT_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, metavar="N",
                       help=f"limit: {what} (default: the group's)")
    p.add_argument("args", nargs="*", help="arguments for the program (after --)")
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("ps", help="list processes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ps)
    p = sub.add_parser("kill", help="kill an agent")
    p.add_argument("id", type=int)
    p.set_defaults(fn=cmd_kill)
    p = sub.add_parser("trace", help="the syscalls of an agent run with --trace")
    p.add_argument("id", type=int)
    p.add_argument("--save", metavar="FILE", help="write them as JSON (kernel.testing.Trace.load reads it)")
    p.set_defaults(fn=cmd_trace)
    p = sub.add_parser("logs", help="an agent's captured output")
    p.add_argument("id", type=int)
    p.add_argument("-f", "--follow", action="store_true")
    p.set_defaults(fn=cmd_logs)
    p = sub.add_parser("status", help="is a kernel running, with what? (exit 3 if not)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
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
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="check the hash chain (exit 1 if a record was altered)")
    p.add_argument("--file", help="the log to read (default: the kernel's, from sys.status)")
    p.set_defaults(fn=cmd_audit)
    a = ap.parse_args(argv)
    try:
        client = _client(a.runtime_dir, a.timeout)
    except NoKernel as exc:
        print(f"aiosctl: {exc}", file=sys.stderr)
        return NO_KERNEL
    try:
        return a.fn(client, a)
    except SyscallError as exc:
        print(f"aiosctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"aiosctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())

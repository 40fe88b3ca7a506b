"""The sandbox layers one by one (sandbox/*, docs/sandbox.md), without a kernel.

Each test runs a small Python child that builds a policy with ``sandbox.policy.build`` and applies it with
``sandbox.policy.apply`` -- as the bootstrap does -- with a stand-in ``connect()`` that starts ZeroMQ threads
over ``ipc://`` in the scratch dir, then runs the test's probe code and prints what happened.  A layer this
machine cannot have makes the test that needs it skip, with the layer's own reason.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import cgroups, identity, landlock, seccomp
from sandbox.host import Host, SandboxError
from kernel.testing import pid_gone
from tests.conftest import STATE_DIR

REPO = Path(__file__).resolve().parent.parent

HARNESS = r'''
import json, os, sys
scratch, args = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = args["sys_path"]
from sandbox import policy as P
pol = P.build(scratch, args["limits"], allow_fork=args["allow_fork"], cgroup_procs=args["cgroup_procs"],
              off=args["off"], uid=args["uid"], gid=args["uid"])
if args["seccomp"] is False:
    pol.seccomp = False
os.chdir(scratch)
import zmq
ctx = zmq.Context()
a = ctx.socket(zmq.PAIR); a.bind(f"ipc://{args['sock']}")  # the "kernel" end, made before the sandbox
def connect():  # like the bootstrap's: ZeroMQ threads exist before the uid switch and seccomp
    global b
    b = ctx.socket(zmq.PAIR); b.connect(f"ipc://{args['sock']}")
    b.send(b"before"); assert a.recv() == b"before"
report = P.apply(pol, connect)
print("REPORT " + json.dumps(report), flush=True)
b.send(b"after"); print("zmq", a.recv().decode(), flush=True)
def attempt(name, fn):
    try:
        print(name, "OK", fn(), flush=True)
    except OSError as e:
        print(name, "DENIED", e.errno, flush=True)
    except Exception as e:
        print(name, "DENIED", type(e).__name__, flush=True)
import ctypes
_libc = ctypes.CDLL(None, use_errno=True)
def raw(nr, *args):
    """A raw syscall: (return value, errno)."""
    ctypes.set_errno(0)
    return _libc.syscall(nr, *args), ctypes.get_errno()
'''


def sandboxed(tmp_path: Path, probe: str, *, allow_fork: bool = False, limits: dict | None = None,
              cgroup_procs: list[str] = (), off: dict | None = None, seccomp_on: bool = True,
              timeout: float = 30, wait: bool = True, uid: int | None = None, python: str = sys.executable,
              sys_path: list[str] = ()):
    """Run ``probe`` in a sandboxed child; return (report, {name: "OK ..."|"DENIED errno"}, raw output).
    ``sys_path``: where the child imports ``sandbox`` from (default: this checkout)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700, exist_ok=True)
    if uid is not None:
        os.chown(scratch, uid, uid)
    script = tmp_path / "child.py"
    script.write_text(HARNESS + textwrap.dedent(probe))
    args = json.dumps({"limits": limits or {}, "allow_fork": allow_fork, "cgroup_procs": list(cgroup_procs),
                       "off": off or {}, "seccomp": seccomp_on, "uid": uid, "sys_path": list(sys_path) or [str(REPO)],
                       "sock": str(tmp_path / "pair.sock")})
    cmd = [python, "-I", str(script), str(scratch), args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return parse(r.stdout + r.stderr)


def parse(out: str):
    report, results = {}, {}
    for line in out.splitlines():
        if line.startswith("REPORT "):
            report = json.loads(line[7:])
        elif " OK" in line or " DENIED" in line:
            name, _, rest = line.partition(" ")
            results[name] = rest
    return report, results, out


def need(report: dict, *layers: str) -> None:
    for layer in layers:
        status = report.get(layer, "off: not reported")
        if not status.startswith("on"):
            pytest.skip(f"layer {layer} is {status}")


def denied(results: dict, name: str, errno_: int | None = None) -> bool:
    got = results.get(name, "missing")
    return got.startswith("DENIED") and (errno_ is None or got == f"DENIED {errno_}")


ROOT = os.geteuid() == 0


# --- the whole stack ---------------------------------------------------------------------------------

def test_report_names_every_layer_and_zmq_still_works(tmp_path):
    report, _, out = sandboxed(tmp_path, "")
    assert set(report) == {"cgroup", "netns", "rlimits", "landlock", "caps", "uid", "prctl", "seccomp"}, out
    assert "zmq after" in out, out  # ipc:// across the sandbox: ZeroMQ threads made it through every layer
    for status in report.values():
        assert status.startswith("on") or status.startswith("off: ") and len(status) > 6
    need(report, "seccomp", "landlock")
    assert report["rlimits"].startswith("on: CORE=0")


def test_network_sockets_denied_unix_allowed(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        import socket
        attempt("tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        attempt("tcp6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
        attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
        attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
        attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
        attempt("socketpair", lambda: [s.close() for s in socket.socketpair()])
    """)
    need(report, "seccomp")
    for name in ("tcp", "udp", "tcp6", "netlink", "packet"):
        assert denied(res, name, 13), out
    assert res["unix"].startswith("OK") and res["socketpair"].startswith("OK"), out


def test_no_new_connections_after_boot(tmp_path):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "host.sock")
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(0.5)
    report, res, out = sandboxed(tmp_path, f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        attempt("connect", lambda: s.connect({path!r}))
        d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        attempt("sendto", lambda: d.sendto(b"x", {path!r}))
        attempt("abstract", lambda: socket.socket(socket.AF_UNIX).connect("\\0aiosd-test"))
    """)
    need(report, "seccomp")
    assert denied(res, "connect", 1) and denied(res, "sendto", 1) and denied(res, "abstract"), out
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()


def test_exec_denied_and_nothing_runs(tmp_path):
    marker = tmp_path / "scratch" / "ran"
    report, res, out = sandboxed(tmp_path, f"""
        import ctypes, os, subprocess
        attempt("execv", lambda: os.execv("/bin/sh", ["sh", "-c", "touch {marker}"]))
        attempt("system", lambda: os.system("touch {marker}"))
        attempt("subprocess", lambda: subprocess.run(["touch", "{marker}"]))
        argv = (ctypes.c_char_p * 2)(b"/bin/true", None)
        attempt("raw_execve", lambda: raw(59, b"/bin/true", argv, None))
    """)
    need(report, "seccomp")
    assert denied(res, "execv", 1) and denied(res, "subprocess", 1), out
    assert res["raw_execve"] == "OK (-1, 1)", out
    assert not marker.exists()


def test_fork_denied_threads_work(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        import os, threading
        attempt("fork", os.fork)
        box = []
        t = threading.Thread(target=lambda: box.append(os.getpid())); t.start(); t.join()
        attempt("thread", lambda: box == [os.getpid()])
        attempt("kill_parent", lambda: os.kill(os.getppid(), 0))
        attempt("kill_self", lambda: os.kill(os.getpid(), 0))
    """)
    need(report, "seccomp")
    assert denied(res, "fork", 1) and res["thread"] == "OK True", out
    assert denied(res, "kill_parent", 1) and res["kill_self"] == "OK None", out


def test_fork_allowed_but_not_exec_or_namespaces(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        import ctypes, os
        def forked():
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv("/bin/true", ["true"])
                except OSError:
                    os._exit(42)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        attempt("fork", forked)
        attempt("clone_newuser", lambda: raw(56, 0x10000000 | 17, 0, 0, 0, 0))
    """, allow_fork=True)
    need(report, "seccomp")
    assert res["fork"] == "OK 42", out          # the child ran, and its exec was denied
    assert res["clone_newuser"] == "OK (-1, 1)", out  # EPERM: no namespaces, even with fork


def test_dangerous_syscalls_denied(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        import ctypes, os
        params = ctypes.create_string_buffer(120)
        for name, nr, args in [("ptrace", 101, (16, os.getppid(), 0, 0)), ("unshare", 272, (0x10000000,)),
                               ("io_uring_setup", 425, (8, params)), ("bpf", 321, (0, 0, 0)),
                               ("userfaultfd", 323, (0,)), ("personality", 135, (0x0040000,)),
                               ("mount", 165, (b"none", b"/tmp", b"tmpfs", 0, 0)),
                               ("keyctl", 250, (0, 0)), ("clone3", 435, (0, 0)), ("x32_read", 0x40000000, (0,))]:
            attempt(name, lambda: raw(nr, *args))
        attempt("personality_query", lambda: raw(135, 0xffffffff)[0] >= 0)
    """)
    need(report, "seccomp")
    for name in ("ptrace", "unshare", "io_uring_setup", "bpf", "userfaultfd", "personality", "mount", "keyctl"):
        assert res[name] == "OK (-1, 1)", (name, out)
    assert res["clone3"] == "OK (-1, 38)" and res["x32_read"] == "OK (-1, 38)", out  # ENOSYS
    assert res["personality_query"] == "OK True", out


def test_filesystem_confined_to_scratch(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    outside = tmp_path / "written-by-agent"
    models = sorted((STATE_DIR / "models").glob("*.gguf"))
    model = str(models[0]) if models else "/nonexistent"
    report, res, out = sandboxed(tmp_path, f"""
        import os
        attempt("read_secret", lambda: open({str(secret)!r}).read())
        attempt("write_outside", lambda: open({str(outside)!r}, "w").write("x"))
        attempt("write_scratch", lambda: open("file", "w").write("x"))
        attempt("mkdir_scratch", lambda: os.makedirs("a/b/c"))
        attempt("symlink_out", lambda: (os.symlink({str(secret)!r}, "link"), open("link").read()))
        attempt("hardlink_in", lambda: os.link({str(secret)!r}, "hard"))
        attempt("rename_out", lambda: os.rename("file", {str(outside)!r}))
        attempt("read_model", lambda: open({model!r}, "rb").read(4))
        attempt("read_usr", lambda: len(open("/usr/share/zoneinfo/UTC", "rb").read()) > 0)
        attempt("read_shadow", lambda: open("/etc/shadow").read(4))
        attempt("proc_parent", lambda: open(f"/proc/{{os.getppid()}}/environ", "rb").read(4))
        attempt("devnull", lambda: open("/dev/null", "w").write("x"))
        attempt("stdlib_import", lambda: __import__("email.mime.text").__name__)
        import glob, sysconfig
        base_pkgs = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "site-packages", "*", "__init__.py"))
        attempt("base_site_packages", lambda: open(base_pkgs[0]).read(1) if base_pkgs else "none installed")
        attempt("venv_engine", lambda: __import__("llama_cpp"))
        attempt("tempfile", lambda: __import__("tempfile").mkstemp(dir=".")[1].startswith(os.getcwd()))
    """)
    need(report, "landlock")
    for name in ("read_secret", "write_outside", "symlink_out", "rename_out", "read_shadow", "proc_parent",
                 "venv_engine"):
        assert denied(res, name), (name, out)
    assert denied(res, "hardlink_in"), out
    assert denied(res, "base_site_packages") or res["base_site_packages"] == "OK none installed", out
    if models:
        assert denied(res, "read_model"), out
    for name in ("write_scratch", "mkdir_scratch", "read_usr", "devnull", "stdlib_import", "tempfile"):
        assert res[name].startswith("OK"), (name, out)
    assert not outside.exists() and secret.read_text() == "secret"


def test_landlock_alone_denies_tcp_and_signals(tmp_path):
    """With seccomp off, Landlock by itself denies TCP connect (ABI >= 4) and signals out of the domain (>= 6)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    report, res, out = sandboxed(tmp_path, f"""
        import os, socket
        attempt("tcp_connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2))
        attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
    """, seccomp_on=False, off={"netns": "test: off so that loopback is reachable"})
    need(report, "landlock")
    if landlock.abi_version() < 4:
        pytest.skip("Landlock ABI < 4 has no TCP rules")
    assert denied(res, "tcp_connect", 13), out
    with pytest.raises(socket.timeout):
        srv.accept()
    srv.close()
    if landlock.abi_version() >= 6:
        assert denied(res, "signal_parent", 1), out


def test_rlimits_and_prctl(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        import resource, os
        attempt("nofile", lambda: resource.getrlimit(resource.RLIMIT_NOFILE))
        attempt("fsize", lambda: resource.getrlimit(resource.RLIMIT_FSIZE))
        def efbig():
            with open("big", "wb") as f:
                f.write(b"x" * (3 << 20))
        attempt("efbig", efbig)
        attempt("raise_limit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096)))
    """, limits={"open_files": 48, "disk_mb": 2})
    assert res["nofile"] == "OK (48, 48)" and res["fsize"] == f"OK ({2 << 20}, {2 << 20})", out
    assert denied(res, "efbig", 27), out  # EFBIG (Python ignores SIGXFSZ)
    assert denied(res, "raise_limit"), out
    assert report["prctl"] == "on: no_new_privs, not dumpable"


@pytest.mark.skipif(not ROOT, reason="capabilities to drop only when root")
def test_root_agent_drops_every_capability(tmp_path):
    report, res, out = sandboxed(tmp_path, """
        from sandbox import caps
        _, data = caps._capget()
        attempt("caps", lambda: [(d.effective, d.permitted, d.inheritable) for d in data])
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        attempt("bounding_setuid", lambda: libc.prctl(23, 7, 0, 0, 0))  # PR_CAPBSET_READ CAP_SETUID
        attempt("chown_root_file", lambda: __import__("os").chown(".", 1, 1))
    """)
    need(report, "caps")
    assert report["caps"] == "on: all dropped", out
    assert res["caps"] == "OK [(0, 0, 0), (0, 0, 0)]" and res["bounding_setuid"] == "OK 0", out
    assert denied(res, "chown_root_file", 1), out


# --- the kernel's side -------------------------------------------------------------------------------

def test_host_refuses_readable_protected_paths(tmp_path):
    with pytest.raises(SandboxError, match="protected"):
        Host(tmp_path, ["/usr/share"], use_cgroups=False)
    h = Host(tmp_path, [str(STATE_DIR)], use_cgroups=False)
    pol = h.prepare(1, tmp_path, {})
    assert not any(str(STATE_DIR).startswith(p.rstrip("/") + "/") or p.startswith(str(STATE_DIR))
                   for p in pol.landlock_read + pol.landlock_list + pol.landlock_write)
    repo = Path(__file__).resolve().parent.parent
    assert str(repo) not in pol.landlock_read and str(repo / ".venv") not in pol.landlock_read
    assert not any("gemma" in p or "llama_cpp" in p for p in pol.landlock_read)
    h.release(1)


def test_uid_switch_needs_an_interpreter_other_uids_can_run(tmp_path):
    private = tmp_path / "private"
    (private / "py").mkdir(parents=True)
    os.chmod(private, 0o700)
    assert "not searchable" in identity.switch_blocker([str(private / "py")])
    assert identity.switch_blocker(["/usr/lib"]) is None


def test_uid_switch(tmp_path):
    """With an interpreter other uids can run (the system's, when it matches), the agent becomes its own uid."""
    python = "/usr/bin/python3"
    repo = Path(__file__).resolve().parent.parent
    site = [p for p in sys.path if p.startswith(sys.prefix) and p.endswith("site-packages")]
    if not ROOT:
        pytest.skip("switching uids needs root")
    if not os.path.exists(python):
        pytest.skip(f"no {python} to run as another uid")
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"{python} is Python {version}, the venv's packages are for {sys.version_info[:2]}")
    blocker = identity.switch_blocker([python, str(repo / "sandbox"), *site])
    if blocker:
        pytest.skip(f"another uid cannot run {python} with the SDK: {blocker}")
    os.chmod(tmp_path, 0o711)
    report, res, out = sandboxed(tmp_path, """
        attempt("ids", lambda: (os.getuid(), os.getgid(), os.getgroups()))
        attempt("write_scratch", lambda: open("mine", "w").write("x"))
        attempt("setuid_back", lambda: os.setuid(0))
    """, uid=200_123, python=python, sys_path=[str(repo), *site])
    need(report, "uid")
    assert report["uid"] == "on: uid 200123 gid 200123", out
    assert report["caps"].startswith("on: all but setuid/setgid dropped"), out
    assert res["ids"] == "OK (200123, 200123, [])" and res["write_scratch"] == "OK 1", out
    assert denied(res, "setuid_back", 1), out
    assert "zmq after" in out, out


def test_capabilities_say_why_not(tmp_path):
    caps = Host(tmp_path, [str(STATE_DIR)], use_cgroups=False).capabilities()
    assert set(caps) == {"cgroup", "netns", "rlimits", "landlock", "caps", "uid", "prctl", "seccomp", "disk"}
    assert caps["cgroup"] == "unavailable: disabled by configuration"
    assert Host(tmp_path, [str(STATE_DIR)], use_tmpfs=False).capabilities()["disk"].startswith(
        "unavailable: disabled by configuration")
    assert all(v.startswith("available") or v.startswith("unavailable: ") for v in caps.values())
    assert caps["seccomp"].startswith("unavailable") == (seccomp.available() is not None)


def _cgroup_host(tmp_path) -> Host:
    h = Host(tmp_path, [str(STATE_DIR)])
    if h.layout is None:
        pytest.skip(f"cgroups: {h.cgroup_off}")
    return h


def test_cgroup_limits_kill_and_release(tmp_path):
    h = _cgroup_host(tmp_path)
    try:
        pol = h.prepare(7, tmp_path, {"memory_mb": 64, "procs": 12}, allow_fork=True)
        dirs = cgroups.agent_dirs(h.layout, 7)
        assert all(os.path.isdir(d) for d in dirs) and pol.cgroup_procs
        if h.layout.version == 1:
            mem = [d for d in dirs if "/memory/" in d][0]
            assert int(Path(mem, "memory.limit_in_bytes").read_text()) == 64 << 20
            pids = [d for d in dirs if "/pids/" in d][0]
            assert Path(pids, "pids.max").read_text().strip() == "12"
        # a child in the group forks until the pids limit stops it, then a grandchild escapes with setsid
        p = sandboxed(tmp_path, """
            import os, time
            n = 0
            for _ in range(40):
                try:
                    if os.fork() == 0:
                        os.setsid(); time.sleep(60); os._exit(0)
                    n += 1
                except BlockingIOError:
                    break
            print("forks", n, flush=True)
            time.sleep(60)
        """, allow_fork=True, cgroup_procs=pol.cgroup_procs, wait=False)
        line = ""
        deadline = time.monotonic() + 20
        while "forks" not in line and time.monotonic() < deadline:
            line = p.stdout.readline()
        assert line.startswith("forks"), line
        forks = int(line.split()[1])
        assert forks < 12  # main + ZeroMQ threads + children <= pids.max
        members = cgroups.pids_in(dirs[0])
        assert p.pid in members and len(members) == forks + 1
        h.kill(7, p.pid)  # the children left the process group (setsid): only the cgroup finds them
        p.wait(10)
        assert all(pid_gone(pid) for pid in members)
        h.release(7)
        deadline = time.monotonic() + 5
        while any(os.path.isdir(d) for d in dirs) and time.monotonic() < deadline:
            h.release(7)  # retries groups that were still busy
            time.sleep(0.05)
        assert not any(os.path.isdir(d) for d in dirs)
    finally:
        h.close()
    assert not any(os.path.isdir(p) for p in h.layout.parents.values())


def test_cgroup_oom_kill_is_named(tmp_path):
    h = _cgroup_host(tmp_path)
    try:
        pol = h.prepare(8, tmp_path, {"memory_mb": 48})
        report, res, out = sandboxed(tmp_path, """
            chunks = []
            for i in range(64):
                chunks.append(bytearray(8 << 20))
            print("survived", flush=True)
        """, cgroup_procs=pol.cgroup_procs)  # no memory_mb here: no RLIMIT_AS, the cgroup stops it
        assert "survived" not in out
        assert h.death_reason(8) == "OOMKilled: cgroup memory limit 48 MB"
    finally:
        h.release(8)
        h.close()


def test_kill_orphans_spares_the_known_and_the_watchdog(tmp_path):
    """In a child process acting as the kernel: its orphan-like children die, a known one survives."""
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from sandbox.host import Host
        h = Host({str(tmp_path)!r}, [{str(STATE_DIR)!r}])
        known = subprocess.Popen(["sleep", "30"])
        stray = subprocess.Popen(["sleep", "30"])
        killed = h.kill_orphans({{known.pid}})
        print("killed", killed == [stray.pid], stray.wait(5) == -9, known.poll() is None, flush=True)
        known.kill(); known.wait()
        h.close()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert "killed True True True" in r.stdout, r.stdout + r.stderr


def test_watchdog_cleans_up_when_the_kernel_dies(tmp_path):
    """A process that owns a Host (a kernel) is SIGKILLed: its agents' descendants and cgroups go too."""
    h_probe = Host(tmp_path, [str(STATE_DIR)])
    if h_probe.layout is None:
        pytest.skip(f"cgroups: {h_probe.cgroup_off}")
    code = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from sandbox.host import Host
        h = Host({str(tmp_path)!r}, [{str(STATE_DIR)!r}])
        pol = h.prepare(1, {str(tmp_path)!r}, {{"procs": 8}})
        p = subprocess.Popen(["sh", "-c", "echo $$ > " + pol.cgroup_procs[0] + " && exec setsid sleep 60"])
        time.sleep(0.3)
        print("pid", p.pid, " ".join(h.layout.parents.values()), flush=True)
        time.sleep(60)
    """)
    k = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        line = k.stdout.readline().split()
        assert line and line[0] == "pid", line
        victim, parents = int(line[1]), line[2:]
        os.kill(k.pid, signal.SIGKILL)
        k.wait(5)
        assert pid_gone(victim, timeout=10)
        deadline = time.monotonic() + 10
        while any(os.path.isdir(p) for p in parents) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(os.path.isdir(p) for p in parents)
    finally:
        if k.poll() is None:
            k.kill()


def test_every_layer_has_the_same_entry_points_and_its_edges_run_one_way():
    """As nsjail's: the orchestrator (policy.py) imports the layers, no layer imports it or the kernel side."""
    import ast
    import importlib

    from sandbox.policy import _layers
    for name, module in _layers():
        if module is None:
            continue  # the bootstrap's connect()
        assert callable(module.available) and callable(module.apply), name
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
            {f"sandbox.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "sandbox"
             for a in n.names}
        assert imported & {"sandbox.policy", "sandbox.host", "sandbox.paths"} == set(), (name, imported)
        assert {m for m in imported if m.startswith("sandbox.")} <= {"sandbox.layer", "sandbox.linux"}, name
    assert importlib.import_module("sandbox.layer").LayerUnavailable

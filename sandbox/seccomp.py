"""The seccomp syscall filter: a classic-BPF program built here in pure Python, installed with TSYNC.

What it does (x86_64 only; other architectures report the layer off):

- a syscall from any other ABI (i386 ``int 0x80``) kills the process; the x32 range (nr >= 0x40000000) fails
  with ``ENOSYS``;
- ``socket()`` and ``socketpair()`` only for ``AF_UNIX`` (ZeroMQ ``ipc://`` keeps working); any other family --
  TCP, UDP, raw, netlink, packet, vsock, AF_ALG -- fails with ``EACCES``;
- process creation: ``clone`` with any ``CLONE_NEW*`` flag fails with ``EPERM``; ``clone3`` fails with
  ``ENOSYS`` (its flags sit behind a pointer BPF cannot read; glibc then falls back to ``clone``); unless
  ``allow_fork``, ``fork``, ``vfork`` and ``clone`` without ``CLONE_THREAD`` fail with ``EPERM`` (threads
  still work), and signals may only go to the agent itself (``kill``, ``tgkill``, ``rt_*sigqueueinfo``);
- unless ``allow_connect``, no new connection or addressed datagram after boot: ``connect``, ``sendmsg``,
  ``sendmmsg`` and ``sendto`` with an address fail with ``EPERM``.  The SDK's connection to the kernel is made
  before the filter; this is what keeps an agent that shares the kernel's uid away from every other unix
  socket on the host (another kernel's, D-Bus, ``/dev/log``), which Landlock mediates only from ABI 9;
- knobs on other processes that need only the same uid -- ``prlimit64`` (lower the kernel's descriptor
  limit!), ``setpriority``, ``sched_setaffinity``, ``sched_setattr``, ``ioprio_set`` -- may only target the
  caller (pid 0, or the agent's own pid); the agent shares the kernel's uid when there is no uid pool.
  ``sched_setscheduler`` may also set ``SCHED_OTHER`` on any thread (libzmq does so on each of its threads,
  by thread id, and aborts if refused); ``sched_setparam`` is left alone (for ``SCHED_OTHER`` its only
  priority is 0);
- ``EPERM`` for ``DENIED`` below: program execution (the bootstrap never execs after the filter), debugging
  and cross-process memory access, kernel attack surface (bpf, perf, io_uring, userfaultfd, keyrings,
  ``modify_ldt``), namespaces and mounts, modules and kexec, host administration (clock, swap, reboot,
  hostname, quotas, accounting, kernel log), file handles (``open_by_handle_at``), ``personality`` other than
  the default (no ``ADDR_NO_RANDOMIZE``), and the terminal-injection ioctls ``TIOCSTI``/``TIOCLINUX``.

Denials return an errno rather than killing, so Python raises a clean ``PermissionError``/``OSError``.  The
filter needs ``no_new_privs`` (set by the layers before it) and is synchronised onto every thread (TSYNC):
ZeroMQ's I/O threads exist by the time it is installed.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

from sandbox import linux
from sandbox.layer import LayerUnavailable

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# classic BPF opcodes
LD_W_ABS = 0x20      # BPF_LD | BPF_W | BPF_ABS
JEQ = 0x15           # BPF_JMP | BPF_JEQ | BPF_K
JGE = 0x35           # BPF_JMP | BPF_JGE | BPF_K
JSET = 0x45          # BPF_JMP | BPF_JSET | BPF_K
RET = 0x06           # BPF_RET | BPF_K

# struct seccomp_data offsets (little endian: the low 32 bits of args[i] are at 16 + 8 i)
OFF_NR, OFF_ARCH = 0, 4


def _arg(i: int) -> int:
    return 16 + 8 * i


AF_UNIX = 1
CLONE_THREAD = 0x00010000
CLONE_NEW_ANY = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                 | 0x40000000)  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

# x86_64 syscall numbers
NR = {
    "socket": 41, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "clone3": 435,
    "personality": 135, "ioctl": 16,
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_send_signal": 424, "prlimit64": 302, "sched_setaffinity": 203, "sched_setscheduler": 144,
    "sched_setattr": 314, "setpriority": 141, "ioprio_set": 251, "connect": 42, "sendto": 44, "sendmsg": 46, "sendmmsg": 307,
}
DENIED = {
    # running programs: the agent is its bootstrap's Python process, for life
    "execve": 59, "execveat": 322, "uselib": 134,
    # other processes' memory and descriptors
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "process_madvise": 440, "move_pages": 279, "migrate_pages": 256,
    # kernel attack surface
    "bpf": 321, "perf_event_open": 298, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "modify_ldt": 154, "fanotify_init": 300, "lookup_dcookie": 212, "syslog": 103, "_sysctl": 156,
    # namespaces and mounts
    "unshare": 272, "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "move_mount": 429, "open_tree": 428,
    "mount_setattr": 442, "open_tree_attr": 467,
    # modules, kexec, host administration
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "sethostname": 170, "setdomainname": 171,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "iopl": 172,
    "ioperm": 173, "quotactl": 179, "quotactl_fd": 443, "vhangup": 153, "nfsservctl": 180,
    # file handles bypass path checks (the "shocker" escape)
    "name_to_handle_at": 303, "open_by_handle_at": 304,
}
NO_FORK = {"fork": 57, "vfork": 58}
EXEC = ("execve", "execveat")


class _Prog:
    """A BPF program with symbolic forward jumps, resolved at the end (classic BPF jumps are 8-bit)."""

    def __init__(self) -> None:
        self.ins: list[list] = []   # [code, jt, jf, k], jt/jf ints or label names
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int, jt=0, jf=0) -> None:
        self.ins.append([code, jt, jf, k & 0xFFFFFFFF])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.ins):
            jt, jf = (self._rel(i, j) for j in (jt, jf))
            out += struct.pack("=HBBI", code, jt, jf, k)
        return bytes(out)

    def _rel(self, i: int, target) -> int:
        if isinstance(target, int):
            return target
        off = self.labels[target] - i - 1
        if not 0 <= off <= 255:
            raise ValueError(f"BPF jump to {target} out of range ({off})")
        return off


def build(allow_fork: bool, pid: int, allow_connect: bool | None = None, *, allow_exec: bool = False,
          network: bool = False) -> bytes:
    """The filter program for this process (``pid``: the only target of signals when not ``allow_fork``).
    ``allow_connect`` defaults to ``allow_fork``.  ``allow_exec`` leaves ``execve`` alone (Landlock still
    decides what may run); ``network`` lets ``socket()`` make any family (with ``allow_connect``).  Both are
    for the MCP servers an operator configures (kernel/tools.py), never for agents."""
    if allow_connect is None:
        allow_connect = allow_fork
    p = _Prog()
    p.op(LD_W_ABS, OFF_ARCH)
    p.op(JEQ, AUDIT_ARCH_X86_64, 1, 0)
    p.op(RET, RET_KILL_PROCESS)
    p.op(LD_W_ABS, OFF_NR)
    p.op(JGE, X32_SYSCALL_BIT, "enosys", 0)
    special = {NR["clone"]: "clone",
               NR["clone3"]: "enosys", NR["personality"]: "personality", NR["ioctl"]: "ioctl",
               NR["setpriority"]: "setpriority", NR["ioprio_set"]: "ioprio_set",
               NR["sched_setscheduler"]: "sched_setscheduler"}
    special.update({NR[n]: "self" for n in ("prlimit64", "sched_setaffinity", "sched_setattr")})
    if not network:
        special.update({NR["socket"]: "family", NR["socketpair"]: "family"})
    if not allow_fork:
        special.update({NR[n]: "signal" for n in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")})
        special.update({NR["tkill"]: "eperm", NR["pidfd_send_signal"]: "eperm"})
    if not allow_connect:
        special.update({NR["connect"]: "eperm", NR["sendmsg"]: "eperm", NR["sendmmsg"]: "eperm",
                        NR["sendto"]: "sendto"})
    for nr, target in special.items():
        p.op(JEQ, nr, target, 0)
    denied = dict(DENIED, **({} if allow_fork else NO_FORK))
    if allow_exec:
        for name in EXEC:
            denied.pop(name)
    for nr in sorted(set(denied.values())):
        p.op(JEQ, nr, "eperm", 0)
    p.op(RET, RET_ALLOW)

    p.label("family")            # socket(domain, ...), socketpair(domain, ...)
    p.op(LD_W_ABS, _arg(0))
    p.op(JEQ, AF_UNIX, "allow", "eacces")

    p.label("clone")             # x86_64 clone(flags, stack, parent_tid, child_tid, tls)
    p.op(LD_W_ABS, _arg(0))
    p.op(JSET, CLONE_NEW_ANY, "eperm", 0)
    if allow_fork:
        p.op(RET, RET_ALLOW)
    else:
        p.op(JSET, CLONE_THREAD, "allow", "eperm")

    p.label("personality")       # only PER_LINUX and the 0xffffffff query
    p.op(LD_W_ABS, _arg(0))
    p.op(JEQ, 0, "allow", 0)
    p.op(JEQ, 0xFFFFFFFF, "allow", "eperm")

    p.label("ioctl")
    p.op(LD_W_ABS, _arg(1))
    p.op(JEQ, TIOCSTI, "eperm", 0)
    p.op(JEQ, TIOCLINUX, "eperm", "allow")

    p.label("sched_setscheduler")  # (pid, policy, param): SCHED_OTHER for anyone, anything for ourselves
    p.op(LD_W_ABS, _arg(1))
    p.op(JEQ, 0, "allow", 0)
    p.label("self")              # prlimit64(pid, ...), sched_set*(pid, ...): ourselves only
    p.op(LD_W_ABS, _arg(0))
    p.op(JEQ, 0, "allow", 0)
    p.op(JEQ, pid, "allow", "eperm")

    p.label("setpriority")       # setpriority(which, who, prio): PRIO_PROCESS of ourselves only
    p.op(LD_W_ABS, _arg(0))
    p.op(JEQ, 0, "who", "eperm")

    p.label("ioprio_set")        # ioprio_set(which, who, ioprio): IOPRIO_WHO_PROCESS of ourselves only
    p.op(LD_W_ABS, _arg(0))
    p.op(JEQ, 1, "who", "eperm")
    p.label("who")
    p.op(LD_W_ABS, _arg(1))
    p.op(JEQ, 0, "allow", 0)
    p.op(JEQ, pid, "allow", "eperm")

    if not allow_connect:
        p.label("sendto")        # sendto(fd, buf, len, flags, addr, addrlen): only without an address
        p.op(LD_W_ABS, _arg(4))
        p.op(JEQ, 0, 0, "eperm")
        p.op(LD_W_ABS, _arg(4) + 4)
        p.op(JEQ, 0, "allow", "eperm")

    if not allow_fork:
        p.label("signal")        # kill(pid) / tgkill(tgid) / rt_*sigqueueinfo(tgid): only ourselves
        p.op(LD_W_ABS, _arg(0))
        p.op(JEQ, pid, "allow", 0)
        p.op(JEQ, 0, "allow", 0)            # our own process group (we lead it)
        p.op(JEQ, -pid, "allow", "eperm")   # killpg(pid)

    p.label("allow")
    p.op(RET, RET_ALLOW)
    p.label("eperm")
    p.op(RET, RET_ERRNO | errno.EPERM)
    p.label("eacces")
    p.op(RET, RET_ERRNO | errno.EACCES)
    p.label("enosys")
    p.op(RET, RET_ERRNO | errno.ENOSYS)
    return p.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def available() -> str | None:
    """None if this machine can have the filter, else why not."""
    if not linux.X86_64:
        return f"unsupported architecture {linux.MACHINE} (the filter is written for x86_64)"
    return None


def apply(policy) -> str:
    """The filter for the policy's ``allow_fork``, ``allow_connect``, ``allow_exec`` and ``network``; off when
    the policy says ``seccomp = False`` (tests of the other layers)."""
    if not policy.seccomp:
        raise LayerUnavailable("not requested")
    return install(policy.allow_fork, policy.allow_connect, allow_exec=policy.allow_exec, network=policy.network)


def install(allow_fork: bool = False, allow_connect: bool | None = None, *, allow_exec: bool = False,
            network: bool = False) -> str:
    """Install the filter on every thread of this process (needs no_new_privs or CAP_SYS_ADMIN)."""
    why = available()
    if why:
        raise LayerUnavailable(why)
    if allow_connect is None:
        allow_connect = allow_fork
    code = build(allow_fork, os.getpid(), allow_connect, allow_exec=allow_exec, network=network)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.addressof(buf))
    ret = linux.syscall(linux.NR_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC,
                        ctypes.byref(prog))
    if ret != 0:  # TSYNC failed: ret is the thread that could not be synchronised
        raise OSError(errno.ESRCH, f"seccomp TSYNC failed on thread {ret}")
    return (f"{len(code) // 8} BPF instructions, {'fork' if allow_fork else 'no fork'}, "
            f"{'connect' if allow_connect else 'no connect'}{', exec' if allow_exec else ''}"
            f"{', network' if network else ''}, TSYNC")

"""The first code an agent process runs: sandbox itself, connect to the kernel, then run the agent program.

The kernel starts ``python -I -S -u -c <import this, main()> FILENAME [ARGS...]`` (kernel/proc.py) with the
connection details and the sandbox policy in ``AIOSD_*`` environment variables, which are removed before the
program runs.  The
bootstrap applies the policy (``sandbox.policy.apply``), attests the resulting layers to the kernel with
``proc.ready`` -- its first syscall, accepted once, before any agent code runs -- and runs the program as
``__main__``.
"""
from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    env = os.environ
    kernel_pid = int(env.pop("AIOSD_KERNEL_PID"))
    from sandbox.linux import die_with_parent
    die_with_parent(kernel_pid)

    from agentproc import client
    from sandbox.policy import ENV, Policy, apply

    endpoint, token = env.pop("AIOSD_SOCKET"), bytes.fromhex(env.pop("AIOSD_TOKEN"))
    policy = Policy.from_env(env.pop(ENV))
    program = env.pop("AIOSD_PROGRAM")
    if policy.uid is not None and os.path.dirname(program) == os.getcwd():
        program = os.path.basename(program)  # after the uid switch only the cwd (scratch) is reachable
    env.setdefault("TMPDIR", policy.scratch)  # the only writable place (Landlock)

    def connect() -> None:
        c = client.Client(endpoint, routing_id=token)
        c.call("sys.ping")  # a round trip: the connection exists before the bootstrap gives up its uid
        client.install_default(c)

    layers = apply(policy, connect)  # cgroup, namespaces, rlimits, Landlock, caps, connect, uid, prctl, seccomp
    client.default().call("proc.ready", {"layers": layers})
    from agentproc import openai_hook
    openai_hook.install()  # `from openai import OpenAI` reaches the kernel over this connection (imports nothing)
    sys.path.extend(policy.sys_path)  # an operator's venv (proc.spawn venv): after the SDK, which it cannot shadow
    sys.argv = sys.argv[1:]  # [filename, *args], as if the program had been run directly
    try:
        runpy.run_path(program, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # report like `python program.py` would: no bootstrap frames
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != program:
            tb = tb.tb_next
        import traceback
        traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
        sys.exit(1)


if __name__ == "__main__":
    main()

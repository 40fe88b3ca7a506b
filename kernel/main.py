"""``aiosd``: run the kernel in the foreground (a systemd ``Type=notify`` service: packaging/aiosd.service,
docs/operating.md).  ``aiosd --check-config [FILE]`` checks a config file and exits.

Under systemd the directories come from ``RUNTIME_DIRECTORY`` and ``STATE_DIRECTORY`` (``RuntimeDirectory=``,
``StateDirectory=``), and when ``JOURNAL_STREAM`` names our stderr every log line starts with its syslog priority
(``<3>`` error ... ``<7>`` debug) for journald to file it under; ``--log-format json`` writes one JSON object a
line instead of text."""
from __future__ import annotations

import os

# One BLAS thread: memory search's matrix product is memory-bound, and on a busy machine OpenBLAS's threads
# only add scheduling delay (10k-entry search p99 6.6 ms with one, 51 ms with the default; docs/memory.md).
# llama.cpp has threads of its own.  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from kernel import config as config_mod  # noqa: E402
from kernel.kernel import Kernel, KernelError  # noqa: E402
from kernel.models import default_state_dir, ensure_default_model, systemd_dir  # noqa: E402
from syscalls.codec import default_runtime_dir as address_runtime_dir  # noqa: E402

# syslog priorities of the logging levels, for journald's "<N>" line prefix (sd-daemon(3))
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def default_runtime_dir() -> str:
    """``$AIOSD_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY``, else ``$XDG_RUNTIME_DIR/aiosd`` or
    ``/tmp/aiosd-UID`` (syscalls.address.default_runtime_dir, which aiosctl uses too)."""
    if os.environ.get("AIOSD_RUNTIME_DIR"):
        return os.environ["AIOSD_RUNTIME_DIR"]
    return systemd_dir("RUNTIME_DIRECTORY") or address_runtime_dir()


def config_path(given: str | None) -> str | None:
    """The config file: ``--config``, else ``$AIOSD_CONFIG``, else ``/etc/aiosd/config.toml`` or
    ``$XDG_CONFIG_HOME/aiosd/config.toml`` (``~/.config``) if one exists; None: the defaults."""
    if given:
        return given
    if os.environ.get("AIOSD_CONFIG"):
        return os.environ["AIOSD_CONFIG"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for path in ("/etc/aiosd/config.toml", os.path.join(xdg, "aiosd", "config.toml")):
        if os.path.isfile(path):
            return path
    return None


def journal_stderr(environ=os.environ, fd: int = 2) -> bool:
    """Does ``$JOURNAL_STREAM`` (``DEVICE:INODE``, set by systemd when it connects stdout/stderr to the journal)
    name the file open on ``fd``?  A child whose stderr was redirected elsewhere inherits the variable: only
    a match of the device and inode numbers counts (systemd.exec(5))."""
    try:
        dev, ino = (int(n) for n in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class LogFormatter(logging.Formatter):
    """The kernel's log lines: ``aiosd: LEVEL message`` (``text``) or one JSON object (``json``: ``time``,
    ``level``, ``message``, and ``exception`` with the traceback), each line -- every line of a multi-line
    message too -- prefixed with its syslog priority when ``journald``."""

    def __init__(self, fmt: str = "text", journald: bool = False):
        super().__init__()
        self.json, self.journald = fmt == "json", journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if self.json:
            entry = {"time": round(record.created, 3), "level": record.levelname, "message": message}
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            lines = [json.dumps(entry)]
        else:
            if record.exc_info:
                message += "\n" + self.formatException(record.exc_info)
            lines = f"aiosd: {record.levelname} {message}".splitlines() or [""]
        if self.journald:
            prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
            lines = [prefix + line for line in lines]
        return "\n".join(lines)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(fmt, journald=journal_stderr()))
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiosd", description="The aiosd kernel, in the foreground.")
    ap.add_argument("--runtime-dir", default=None, help="socket, pidfile, agent scratch and logs (default: "
                    "$AIOSD_RUNTIME_DIR, systemd's $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/aiosd or /tmp/aiosd-UID)")
    ap.add_argument("--state-dir", default=None, help="models and persistent state (default: $AIOSD_STATE_DIR, "
                    "systemd's $STATE_DIRECTORY, $XDG_STATE_HOME/aiosd or ~/.local/state/aiosd)")
    ap.add_argument("--model", default=None, help="a .gguf model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--config", default=None, help="a TOML config file (docs/config.md; default: $AIOSD_CONFIG, "
                    "/etc/aiosd/config.toml, $XDG_CONFIG_HOME/aiosd/config.toml, else built-in defaults)")
    ap.add_argument("--check-config", nargs="?", const="", default=None, metavar="FILE",
                    help="check FILE (default: the config aiosd would read) and exit: 0 valid, 1 not")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ap.add_argument("--log-format", default="text", choices=["text", "json"],
                    help="text lines (default) or one JSON object a line (time, level, message, exception)")
    args = ap.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.check_config is not None:
        path = config_path(args.check_config or args.config)
        try:
            config_mod.load(path)
        except config_mod.ConfigError as exc:
            print(f"aiosd: {exc}", file=sys.stderr)
            return 1
        print(f"aiosd: {path or 'the built-in defaults'}: valid")
        return 0
    try:
        path = config_path(args.config)
        cfg = config_mod.load(path)
        state_dir = args.state_dir or default_state_dir()
        model = args.model or cfg.llm.model or str(ensure_default_model(state_dir))
        if not os.path.isfile(model):
            raise KernelError(f"no model file at {model}; pass --model PATH or run `make install`")
        kernel = Kernel(args.runtime_dir or default_runtime_dir(), state_dir, cfg, model)
        kernel.config_file = path
        kernel.start()
    except (KernelError, config_mod.ConfigError, RuntimeError) as exc:
        print(f"aiosd: {exc}", file=sys.stderr)
        return 1
    kernel.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

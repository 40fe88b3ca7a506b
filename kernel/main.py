"""``aiosd``: run the kernel in the foreground (a systemd ``Type=notify`` service: packaging/aiosd.service,
docs/operating.md).  ``aiosd --check-config [FILE]`` checks a config file and exits."""
from __future__ import annotations

import os

# One BLAS thread: memory search's matrix product is memory-bound, and on a busy machine OpenBLAS's threads
# only add scheduling delay (10k-entry search p99 6.6 ms with one, 51 ms with the default; docs/memory.md).
# llama.cpp has threads of its own.  Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from kernel import config as config_mod  # noqa: E402
from kernel.kernel import Kernel, KernelError  # noqa: E402
from kernel.models import default_state_dir, ensure_default_model  # noqa: E402
from syscalls.codec import default_runtime_dir  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aiosd", description="The aiosd kernel, in the foreground.")
    ap.add_argument("--runtime-dir", default=None, help="socket, pidfile, agent scratch and logs "
                    "(default: $AIOSD_RUNTIME_DIR, $XDG_RUNTIME_DIR/aiosd or /tmp/aiosd-UID)")
    ap.add_argument("--state-dir", default=None, help="models and persistent state "
                    "(default: $AIOSD_STATE_DIR, $XDG_STATE_HOME/aiosd or ~/.local/state/aiosd)")
    ap.add_argument("--model", default=None, help="a .gguf model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--config", default=None, help="a TOML config file (docs/config.md; default: $AIOSD_CONFIG, "
                    "/etc/aiosd/config.toml, $XDG_CONFIG_HOME/aiosd/config.toml, else built-in defaults)")
    ap.add_argument("--check-config", nargs="?", const="", default=None, metavar="FILE",
                    help="check FILE (default: the config aiosd would read) and exit: 0 valid, 1 not")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="aiosd: %(levelname)s %(message)s")
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

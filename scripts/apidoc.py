"""Writes docs/sdk-api.md, the SDK's API reference, from the docstrings of ``agentproc``'s public modules.

    python scripts/apidoc.py            # rewrite docs/sdk-api.md
    python scripts/apidoc.py --check    # exit 1 when it is stale or a public name has no docstring

Public names: a module's ``__all__`` where it has one, else every function and class it defines whose name
does not start with ``_``; a class's public methods and properties likewise.  tests/test_sdk_docs.py runs the
check, so a public name without a contract, or a reference that lags the code, fails ``make test``.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ("llm", "memory", "storage", "tools", "access", "proc", "records", "errors", "client")
OUT = Path(__file__).resolve().parent.parent / "docs" / "sdk-api.md"
HEADER = """# SDK API reference

Generated from the docstrings by `python scripts/apidoc.py` (tests/test_sdk_docs.py fails when this file lags
the code, or when a public name has no docstring). The guide is docs/sdk.md; the syscalls underneath are in
docs/abi.md.
"""


def public_names(mod) -> list[str]:
    """The public names of module ``mod``, in source order where it has no ``__all__``."""
    if hasattr(mod, "__all__"):
        return list(mod.__all__)
    return [n for n, v in vars(mod).items() if not n.startswith("_")
            and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == mod.__name__]


def members(cls) -> list[tuple[str, object]]:
    """A class's public methods and properties defined by the class itself (not inherited from builtins)."""
    out = []
    for n, v in vars(cls).items():
        if n.startswith("_"):
            continue
        if inspect.isfunction(v) or isinstance(v, property):
            out.append((n, v))
    return out


class _Source(str):
    """An annotation kept as source text (``from __future__ import annotations``), rendered without quotes."""

    def __repr__(self) -> str:
        return str(self)


def signature(name: str, obj) -> str:
    """``name(params) -> result`` as written in the source; the bare name for a property."""
    if isinstance(obj, property):
        return name
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    src = lambda a: _Source(a) if isinstance(a, str) else a  # noqa: E731
    sig = sig.replace(parameters=[p.replace(annotation=src(p.annotation)) for p in sig.parameters.values()],
                      return_annotation=src(sig.return_annotation))
    return f"{name}{sig}"


def doc(obj) -> str:
    """The docstring of ``obj`` (a property's getter's), dedented; empty when it has none of its own."""
    target = obj.fget if isinstance(obj, property) else obj
    return inspect.cleandoc(target.__doc__) if target.__doc__ else ""


def fields(cls) -> list[str]:
    """``name: type  # comment``-free field lines from a records class's annotations."""
    return [f"{n}: {t}" for n, t in cls.__dict__.get("__annotations__", {}).items()]


def render() -> tuple[str, list[str]]:
    """(the reference text, the public names that have no docstring)."""
    lines, missing = [HEADER], []
    for short in MODULES:
        mod = importlib.import_module(f"agentproc.{short}")
        lines += [f"\n## `agentproc.{short}`\n", doc(mod).split("\n\n")[0] + "\n"]
        for name in public_names(mod):
            obj = getattr(mod, name)
            qual = f"{short}.{name}"
            if getattr(obj, "__name__", name) != name:  # an alias
                lines += [f"### `{qual}`\n", f"The same as `{short}.{obj.__name__}`.\n"]
                continue
            text = doc(obj)
            if not text:
                missing.append(qual)
            kind = "class " if inspect.isclass(obj) else ""
            lines += [f"### {kind}`{signature(qual, obj)}`\n", text + "\n"]
            if inspect.isclass(obj):
                if fields(obj):
                    lines += ["Fields: " + ", ".join(f"`{f}`" for f in fields(obj)) + "\n"]
                for mname, m in members(obj):
                    mtext = doc(m)
                    if not mtext:
                        missing.append(f"{qual}.{mname}")
                    lines += [f"- `{signature(mname, m)}`: " + " ".join(mtext.split()) + "\n"]
    return "\n".join(lines).rstrip() + "\n", missing


def main(argv: list[str]) -> int:
    text, missing = render()
    if missing:
        print("public names without a docstring: " + ", ".join(missing), file=sys.stderr)
    if "--check" in argv:
        stale = not OUT.exists() or OUT.read_text() != text
        if stale:
            print(f"{OUT} is stale: run python scripts/apidoc.py", file=sys.stderr)
        return 1 if stale or missing else 0
    OUT.write_text(text)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The SDK's API reference (docs/sdk-api.md) documents every public name with its contract, and is current;
the guide (docs/sdk.md) points at every SDK module."""
from __future__ import annotations

import subprocess
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_api_reference_is_current_and_complete():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "apidoc.py"), "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_guide_names_every_module():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import apidoc
    finally:
        sys.path.pop(0)
    guide = (REPO / "docs" / "sdk.md").read_text()
    for short in apidoc.MODULES:
        assert f"agentproc.{short}" in guide, f"docs/sdk.md does not mention agentproc.{short}"

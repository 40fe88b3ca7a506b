"""Helpers shared by the tests (as Trio's ``tutil``): what several test files need, in one place."""
from __future__ import annotations

import json


def agent_result(output: str) -> dict:
    """The JSON an agent printed on its last ``RESULT {...}`` line (the test fails, showing the output, if
    there is none)."""
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output
    return json.loads(lines[-1][len("RESULT "):])


def config_error(tmp_path, text: str, words: str):
    """Load ``text`` as a config file under ``tmp_path``: it must be refused with a ConfigError matching
    ``words`` (a regular expression), which is returned; its message names the file."""
    import pytest

    from kernel.config import ConfigError, load

    path = tmp_path / "aiosd.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=words) as err:
        load(path)
    assert str(path) in str(err.value)
    return err.value



def make_venv(root):
    """A real virtual environment at ``root/venv`` (``python -m venv --without-pip``) with a tiny pure-Python
    package ``tinypkg`` (``VALUE = 42``) in its site-packages and a ``secret.txt`` beside, outside
    site-packages; every directory on the way readable by other uids.  Returns its path."""
    import subprocess
    import sys

    path = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "tinypkg").mkdir()
    (site / "tinypkg" / "__init__.py").write_text("VALUE = 42\n")
    (path / "secret.txt").write_text("venv-secret")
    for d in (root, path, path / "lib", site.parent, site, site / "tinypkg"):
        d.chmod(0o755)
    return path

"""Running aiosd as a service: the config is checked before anything starts (ranges, `aiosd --check-config`,
the search path), and packaging/aiosd.service passes `systemd-analyze verify` where that tool exists."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.main import config_path
from tests.helpers import config_error

REPO = Path(__file__).resolve().parent.parent
AIOSD = [sys.executable, "-m", "kernel.main"]


@pytest.mark.parametrize("text, words", [
    ("[sandbox]\nuid_base = 0", "uid_base must be at least 65536"),         # agents as root
    ("[sandbox]\nuid_base = 1000", "uid_base must be at least 65536"),      # a login user
    ("[sandbox]\nuid_count = 0", "uid_count 1..1000000"),
    ("[sandbox]\nuid_base = 2147483000\nuid_count = 1000", r"below 2\^31"),
    ("[sandbox]\ncpu_quota = -1.0", "cpu_quota"),
    ("[llm]\nthreads = -2", "threads"),
    ("[kernel]\nmax_procs = 0", "max_procs"),
    ('[llm]\nkv_layout = "ring"', "kv_layout"),
])
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, text, words):
    config_error(tmp_path, text, words)
    result = subprocess.run([*AIOSD, "--check-config", str(tmp_path / "aiosd.toml")], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and words.split()[0] in result.stderr


def test_check_config_accepts_a_valid_file_and_the_search_path_finds_it(tmp_path, monkeypatch):
    path = tmp_path / "aiosd.toml"
    path.write_text('[llm]\nshare_prefix = "fleet"\n')
    result = subprocess.run([*AIOSD, "--check-config", str(path)], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == 0 and "valid" in result.stdout
    monkeypatch.setenv("AIOSD_CONFIG", str(path))
    assert config_path(None) == str(path) and config_path("/given.toml") == "/given.toml"
    monkeypatch.delenv("AIOSD_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    (tmp_path / "xdg" / "aiosd").mkdir(parents=True)
    (tmp_path / "xdg" / "aiosd" / "config.toml").write_text("")
    expected = "/etc/aiosd/config.toml" if Path("/etc/aiosd/config.toml").is_file() else \
        str(tmp_path / "xdg" / "aiosd" / "config.toml")
    assert config_path(None) == expected


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_unit_file_verifies(tmp_path):
    unit = (REPO / "packaging" / "aiosd.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Delegate=yes" in unit
    # verify checks that ExecStart exists: point it at this checkout's aiosd
    local = tmp_path / "aiosd.service"
    local.write_text(unit.replace("/opt/aiosd/.venv/bin/aiosd", str(Path(sys.executable).parent / "aiosd")))
    result = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

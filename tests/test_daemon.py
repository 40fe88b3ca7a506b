"""Running aiosd as a service: the config is checked before anything starts (ranges, `aiosd --check-config`,
the search path), packaging/aiosd.service passes `systemd-analyze verify` where that tool exists, the
directories come from systemd's variables, and log lines carry journald's priorities or are JSON."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel.main import config_path, default_runtime_dir, default_state_dir, journal_stderr
from tests.helpers import config_error

REPO = Path(__file__).resolve().parent.parent
AIOSD = [sys.executable, "-m", "kernel.main"]


@pytest.mark.parametrize("text, words", [
    ("[sandbox]\nuid_base = 0", "uid_base = 0: expected an integer from 65536"),         # agents as root
    ("[sandbox]\nuid_base = 1000", "uid_base = 1000: expected an integer from 65536"),   # a login user
    ("[sandbox]\nuid_count = 0", "uid_count = 0: expected an integer from 1 to 1000000"),
    ("[sandbox]\nuid_base = 2147483000\nuid_count = 1000", r"below 2\^31"),
    ("[sandbox]\ncpu_quota = -1.0", "cpu_quota"),
    ("[llm]\nthreads = -2", "threads"),
    ("[kernel]\nmax_procs = 0", "max_procs"),
    ('[llm]\nkv_layout = "ring"', "kv_layout"),
    ("[kernel]\nrestart_burst = 0", "restart_burst = 0: expected an integer from 1 to 1000"),
    ("[kernel]\nrestart_delay_s = 5\nrestart_delay_max_s = 2", "expected restart_delay_s <= restart_delay_max_s"),
])
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, text, words):
    config_error(tmp_path, text, words)
    result = subprocess.run([*AIOSD, "--check-config", str(tmp_path / "aiosd.toml")], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 1 and words.split()[0] in result.stderr


@pytest.mark.parametrize("text, words", [
    # a value of the wrong type: the key, the value as written, what is allowed
    ("[kernel]\nmax_procs = true", r"\[kernel\] max_procs = true: expected an integer from 1 to 100000"),
    ('[llm]\nn_ctx_seq = "big"', r'\[llm\] n_ctx_seq = "big": expected an integer from 64'),
    ('[sandbox]\nextra_read = "/data"', r'\[sandbox\] extra_read = "/data": expected a list of strings'),
    # out of range, above and below
    ("[kernel]\ndrain_s = -1", r"\[kernel\] drain_s = -1: expected a number from 0 to 86400"),
    ("[kernel]\nmetrics_port = 70000", r"\[kernel\] metrics_port = 70000: expected an integer from 0 to 65535"),
    ("[storage]\nkeep_versions = 0", r"\[storage\] keep_versions = 0: expected an integer from 1"),
    ("[memory]\nevict_threshold = 1.5", r"\[memory\] evict_threshold = 1.5: expected a number from 0 to 1"),
    ("[access]\nconfirm_timeout_s = 0", r"\[access\] confirm_timeout_s = 0: expected an integer from 1"),
    ('[mcp.x]\ncommand = ["python"]\ntimeout_s = 0', r"\[mcp.x\] timeout_s = 0: expected a number above 0"),
    ('[models.m]\npath = "/m.gguf"\nn_seq_max = -1', r"\[models.m\] n_seq_max = -1: expected an integer from 0"),
    ('[groups.g]\nprivileges = ["llm"]\npriority = 1000', r"\[groups.g\] priority = 1000: expected an integer "
                                                         "from -100 to 100"),
    ('[groups.g]\nprivileges = ["llm"]\nlimits = { procs = 0 }', r"\[groups.g\] limits.procs = 0: expected an "
                                                                 "integer from 1 to 4096"),
    # a word not in the list, in a list
    ('[llm]\nscheduler = "lottery"', r'\[llm\] scheduler = "lottery": expected one of fifo, rr, fair'),
    ('[access]\nconfirm = ["delete", "rename"]', r'\[access\] confirm\[1\] = "rename": expected one of delete, '
                                                 "overwrite, cross_write"),
    ('[groups.g]\nprivileges = ["llm", "root"]', r'\[groups.g\] privileges\[1\] = "root": expected one of basic'),
    # unknown and missing keys, unknown sections
    ("[sandbox]\nuid_bsae = 300000", r"\[sandbox\]: unknown key 'uid_bsae'; known keys: uids, uid_base"),
    ('[groups.g]\nprivileges = ["llm"]\nlimits = { memory_gb = 1 }', r"unknown key 'limits.memory_gb'; known keys: "
                                                                    "memory_mb"),
    ("[groups.g]\npriority = 1", r"\[groups.g\]: privileges is required: a list of items, each one of basic"),
    ("[kernal]\nmax_procs = 3", r"unknown section \[kernal\]; known: \[kernel\]"),
    ("kernel = 3", r"\[kernel\]: expected a table"),
    # checks across keys
    ("[memory]\nevict_target = 0.9", r"evict_target = 0.9, evict_threshold = 0.8: expected evict_target <= "),
    ('[models.m]\npath = "/m.gguf"\nn_ctx_seq = 10', r"\[models.m\] n_ctx_seq = 10: expected 0"),
])
def test_every_kind_of_invalid_value_names_file_key_value_and_what_is_allowed(tmp_path, text, words):
    config_error(tmp_path, text, words)


def test_the_docs_list_every_key_with_its_range():
    from kernel.config import ranges

    doc = (REPO / "docs" / "config.md").read_text()
    assert all(line in doc for line in ranges()), [line for line in ranges() if line not in doc]


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


def test_directories_come_from_systemd_when_it_sets_them(monkeypatch):
    for name in ("AIOSD_RUNTIME_DIR", "AIOSD_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/aiosd:/run/other")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/aiosd")
    assert default_runtime_dir() == "/run/aiosd" and default_state_dir() == "/var/lib/aiosd"
    monkeypatch.setenv("AIOSD_RUNTIME_DIR", "/given")  # ours wins: an operator's explicit choice
    assert default_runtime_dir() == "/given"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    monkeypatch.delenv("STATE_DIRECTORY")
    monkeypatch.delenv("AIOSD_RUNTIME_DIR")
    assert "aiosd" in default_runtime_dir() and default_state_dir().endswith("aiosd")


def test_journal_stream_counts_only_when_it_names_our_stderr(tmp_path):
    path = tmp_path / "err"
    with open(path, "w") as f:
        st = path.stat()
        assert journal_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not journal_stderr({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())  # inherited
        assert not journal_stderr({"JOURNAL_STREAM": "garbage"}, f.fileno())
        assert not journal_stderr({}, f.fileno())


def test_the_kernel_logs_json_lines_with_journald_priorities(tmp_path, model_path):
    from kernel.testing import KernelProc

    log = tmp_path / "aiosd.log"
    log.touch()
    st = log.stat()
    k = KernelProc(tmp_path, args=["--log-format", "json"], env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        k.run("print('hi')\n")
    finally:
        k.stop()
    ours = [line for line in log.read_text().splitlines() if line[:2] == "<6" or line[:2] == "<4"]
    entries = [json.loads(line[3:]) for line in ours]
    assert any(e["message"].startswith("serving ") and e["level"] == "INFO" for e in entries), ours
    assert any(e["message"] == "stopped" for e in entries)
    assert not [line for line in log.read_text().splitlines() if line.startswith("aiosd: INFO")]

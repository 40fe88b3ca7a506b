"""The storage manager on a real SQLite file (kernel/storage.py; docs/abi.md, "Storage").  The syscalls, agents
and kill -9 durability are in tests/test_storage_sys.py and tests/escape/test_storage.py."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest

from kernel.storage import Storage, StorageError, check_key

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def st(tmp_path):
    s = Storage(tmp_path / "storage.db", max_value_bytes=1 << 20, max_read=1000, keep_versions=4,
                keep_bytes=10_000)
    yield s
    s.close()


def code_of(fn, *a, **kw) -> str:
    with pytest.raises(StorageError) as err:
        fn(*a, **kw)
    return err.value.code


def test_round_trip_of_every_operation(st):
    v1 = st.put("a", "notes/today.md", "hello")
    assert v1["version"] == 1 and v1["content_type"].startswith("text/plain")
    assert v1["sha256"] == hashlib.sha256(b"hello").hexdigest()
    got = st.get("a", "notes/today.md")
    assert got["data"] == b"hello" and got["eof"] and got["version"] == 1
    st.put("a", "notes/today.md", b"\x00\xffbin", content_type="application/x-thing")
    assert st.stat("a", "notes/today.md")["versions"] == 2
    assert st.get("a", "notes/today.md", version=1)["data"] == b"hello"
    assert [e["key"] for e in st.list("a", "notes/")["entries"]] == ["notes/today.md"]
    assert st.rollback("a", "notes/today.md", 1)["version"] == 3
    assert st.get("a", "notes/today.md")["data"] == b"hello"
    tomb = st.delete("a", "notes/today.md")
    assert tomb["deleted"] and tomb["version"] == 4
    assert code_of(st.get, "a", "notes/today.md") == "ENOENT"
    assert code_of(st.stat, "a", "notes/today.md") == "ENOENT"
    assert st.list("a")["entries"] == []
    assert [v["version"] for v in st.versions("a", "notes/today.md")["versions"]] == [4, 3, 2, 1]
    assert st.rollback("a", "notes/today.md", 2)["version"] == 5  # undelete
    assert st.get("a", "notes/today.md")["data"] == b"\x00\xffbin"
    st.delete("a", "notes/today.md", purge=True)
    assert code_of(st.versions, "a", "notes/today.md") == "ENOENT"
    assert st.usage("a") == {"bytes": 0, "keys": 0}


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a/./b", "a//b", "a/", "", "a\x00b",
                                 "a\nb", "a\\b", "x" * 1025, "/".join(["d"] * 33), "a/" + "y" * 256,
                                 ".aiosd/memory", "\udcff", ".", ".."])
def test_bad_keys_are_refused_with_the_rule(st, key):
    with pytest.raises(StorageError) as err:
        st.put("a", key, "x")
    assert err.value.code == "EINVAL" and "key" in err.value.message


def test_good_keys_are_kept_exactly():
    for key in ("a", "notes/2026/today.md", ".hidden", "a b/c", "ü/名前", "a..b", "...", "x" * 255):
        assert check_key(key) == key


def test_namespaces_are_apart(st):
    st.put("a", "k", "mine")
    assert code_of(st.get, "b", "k") == "ENOENT"
    assert st.list("b")["entries"] == []
    assert code_of(st.delete, "b", "k") == "ENOENT"


def test_compare_and_swap_never_loses_an_update(st):
    assert st.put("a", "k", "1", if_version=0)["version"] == 1
    assert code_of(st.put, "a", "k", "other", if_version=0) == "ESTALE"
    assert st.put("a", "k", "2", if_version=1)["version"] == 2
    assert code_of(st.put, "a", "k", "lost", if_version=1) == "ESTALE"
    assert st.get("a", "k")["data"] == b"2"
    assert code_of(st.delete, "a", "k", if_version=1) == "ESTALE"
    st.delete("a", "k", if_version=2)
    assert st.put("a", "k", "3", if_version=0)["version"] == 4


def test_retention_keeps_the_newest_by_count_and_size(st):
    for i in range(10):
        st.put("a", "k", bytes([i]) * 100)
    assert [v["version"] for v in st.versions("a", "k")["versions"]] == [10, 9, 8, 7]
    assert st.usage("a")["bytes"] == 400
    st.put("a", "big", b"x" * 6000)
    st.put("a", "big", b"y" * 6000)  # two would be 12,000 > keep_bytes: the old one goes
    assert [v["version"] for v in st.versions("a", "big")["versions"]] == [2]


def test_quotas_refuse_with_nothing_written(st):
    st.put("a", "k1", b"x" * 500, quota_bytes=1000, quota_keys=2)
    assert code_of(st.put, "a", "k2", b"x" * 600, quota_bytes=1000, quota_keys=2) == "EDQUOT"
    assert code_of(st.get, "a", "k2") == "ENOENT"
    st.put("a", "k2", b"x" * 100, quota_bytes=1000, quota_keys=2)
    assert code_of(st.put, "a", "k3", b"x", quota_bytes=1000, quota_keys=2) == "EDQUOT"
    assert st.usage("a") == {"bytes": 600, "keys": 2}
    # A rewrite at the quota fits once retention prunes the old version.
    small = Storage(st.path, keep_versions=1)
    small.put("a", "k1", b"y" * 800, quota_bytes=1000)
    assert small.usage("a")["bytes"] == 900
    small.close()


def test_large_values_go_in_parts_and_come_back_in_ranges(st):
    blob = bytes(range(256)) * 10  # 2,560 bytes, read back max_read (1,000) at a time
    assert st.put("a", "f", blob[:1000], final=False) == {"key": "f", "staged": 1000}
    assert code_of(st.put, "a", "f", blob[1000:2000], offset=999, final=False) == "EINVAL"
    st.put("a", "f", blob[1000:2000], offset=1000, final=False)
    assert st.usage("a")["bytes"] == 2000  # staged parts count
    assert code_of(st.get, "a", "f") == "ENOENT"  # nothing until the final part
    v = st.put("a", "f", blob[2000:], offset=2000)
    assert v["size"] == len(blob) and v["sha256"] == hashlib.sha256(blob).hexdigest()
    assert st.usage("a")["bytes"] == len(blob)
    out, offset = b"", 0
    while True:
        got = st.get("a", "f", offset=offset)
        out += got["data"]
        offset += len(got["data"])
        if got["eof"]:
            break
    assert out == blob
    assert st.get("a", "f", offset=5, length=3)["data"] == blob[5:8]
    assert code_of(st.get, "a", "f", offset=len(blob) + 1) == "EINVAL"
    assert code_of(st.put, "a", "huge", b"x" * ((1 << 20) + 1)) == "E2BIG"


def test_an_upload_starts_over_at_offset_zero_and_expires(tmp_path):
    now = [1000.0]
    st = Storage(tmp_path / "s.db", upload_ttl_s=10, clock=lambda: now[0])
    st.put("a", "f", b"abc", final=False)
    st.put("a", "f", b"xy", final=False)  # offset 0 again: the first upload is dropped
    assert st.usage("a")["bytes"] == 2
    now[0] += 11
    assert st.expire_uploads() == 1
    assert st.usage("a")["bytes"] == 0
    st.close()


def test_everything_acknowledged_survives_a_reopen(tmp_path):
    path = tmp_path / "s.db"
    st = Storage(path)
    for i in range(20):
        st.put("ns", f"k/{i}", f"value {i}")
    st.delete("ns", "k/3")
    st.close()
    st = Storage(path)
    assert len(st.list("ns")["entries"]) == 19
    assert st.get("ns", "k/7")["data"] == b"value 7"
    assert st.usage("ns") == {"bytes": sum(len(f"value {i}") for i in range(20)), "keys": 19}
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    st.close()


def test_list_pages_and_prefixes(st):
    for key in ("a/1", "a/2", "a/3", "ab", "b/1"):
        st.put("n", key, key)
    page = st.list("n", "a/", limit=2)
    assert [e["key"] for e in page["entries"]] == ["a/1", "a/2"] and page["more"]
    page = st.list("n", "a/", after="a/2", limit=2)
    assert [e["key"] for e in page["entries"]] == ["a/3"] and not page["more"]
    assert [e["key"] for e in st.list("n", "a%")["entries"]] == []  # no pattern characters


def test_a_group_commits_once_and_a_failing_job_undoes_only_itself(st):
    st.put("a", "k", "v1")
    jobs = [lambda: st.put("a", "g1", "one"),
            lambda: st.put("a", "k", "lost", if_version=7),  # ESTALE: only this one is undone
            lambda: st.put("a", "g2", "two"),
            lambda: st.delete("a", "k")]
    out = st.group(jobs)
    assert [e.code if e else None for _, e in out] == [None, "ESTALE", None, None]
    assert out[0][0]["version"] == 1 and out[3][0]["deleted"]
    assert st.get("a", "g1")["data"] == b"one" and st.get("a", "g2")["data"] == b"two"
    assert [v["version"] for v in st.versions("a", "k")["versions"]] == [2, 1]
    assert st.usage("a") == {"bytes": 2 + 3 + 3, "keys": 2}


def test_the_sqlite_backend_implements_the_backend_interface(tmp_path):
    """Every method of ``Backend`` (what the kernel may call) exists on ``Storage`` with the same parameters,
    and ``open_storage`` hides SQLite's own errors behind ``StorageUnavailable`` (docs/scale.md)."""
    import inspect

    from kernel.storage import Backend, StorageUnavailable, open_storage

    names = [n for n, f in vars(Backend).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert "put" in names and "group" in names
    for name in names:
        want = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(Storage, name)).parameters) == want, name
    st = open_storage("sqlite", tmp_path / "s.db")
    assert st.put("ns", "k", "v")["version"] == 1
    st.close()
    with pytest.raises(StorageUnavailable, match="cannot open the storage database"):
        open_storage("sqlite", tmp_path / "no-such-dir" / "s.db")
    with pytest.raises(StorageUnavailable, match="not built"):
        open_storage("postgresql", tmp_path / "s.db")

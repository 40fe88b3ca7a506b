"""The pytest plugin of the test kit (``kernel.testing``), registered through the ``pytest11`` entry point: any
project with aiosd installed gets these fixtures (docs/testing.md).

Fixtures:

- ``model_path`` (session): the embedded default model, assembled once into the state dir.
- ``kernel_config`` (session): the config text of the shared kernel; override it in your conftest.py.
- ``shared_kernel`` (session): one ``KernelProc`` shared by the session's tests.
- ``kernel``: the shared kernel -- or, for a test marked ``@pytest.mark.fresh_kernel``, a kernel of its own,
  stopped after the test; ``@pytest.mark.fresh_kernel(config=TEXT)`` gives it its own config.
- ``fresh_kernel``: always a kernel of the test's own (the marker's config if any, else ``kernel_config``).
- ``make_kernel``: a factory ``make_kernel(config=None, **kw) -> KernelProc`` for tests that need several
  kernels or one per configuration; each in its own directory, all stopped after the test.
- ``raw_client``: a ``RawClient`` (operator credential) to ``kernel``.

The kit is imported when a fixture is first used, so a pytest run that uses none of them pays nothing.
"""
from __future__ import annotations

import pytest

MARKER = "fresh_kernel"


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(config=None): the test's `kernel` fixture is a kernel of its own (with this config "
        "text), started for it and stopped after it (aiosd)")


def _marked_config(request, default: str) -> str:
    mark = request.node.get_closest_marker(MARKER)
    if mark is None:
        return default
    config = mark.kwargs.get("config", mark.args[0] if mark.args else None)
    return default if config is None else config


@pytest.fixture(scope="session")
def model_path() -> str:
    from kernel import testing

    return testing.model_path()


@pytest.fixture(scope="session")
def kernel_config() -> str:
    from kernel import testing

    return testing.TEST_CONFIG


@pytest.fixture(scope="session")
def shared_kernel(tmp_path_factory, model_path, kernel_config):
    from kernel import testing

    k = testing.KernelProc(tmp_path_factory.mktemp("kernel"), kernel_config)
    yield k
    k.stop()


@pytest.fixture
def make_kernel(tmp_path_factory, model_path, kernel_config):
    from kernel import testing

    made = []

    def make(config: str | None = None, **kw) -> "testing.KernelProc":
        k = testing.KernelProc(tmp_path_factory.mktemp("kernel"), kernel_config if config is None else config,
                               **kw)
        made.append(k)
        return k

    yield make
    for k in made:
        k.stop()


@pytest.fixture
def fresh_kernel(request, make_kernel, kernel_config):
    return make_kernel(_marked_config(request, kernel_config))


@pytest.fixture
def kernel(request, kernel_config):
    if request.node.get_closest_marker(MARKER) is not None:
        return request.getfixturevalue("fresh_kernel")
    return request.getfixturevalue("shared_kernel")


@pytest.fixture
def raw_client(kernel):
    r = kernel.raw_client()
    yield r
    r.close()

"""Fixtures shared by several test modules, and how `make test` spreads modules over processes."""
import os

import pytest
import torch

# `make test` runs the modules in parallel processes (pytest-xdist, one per core, at most four), each
# module whole in one of them, so that its module fixtures (a prepared dataset, a reference fit, a
# Ray instance) are made once. Modules that share a session fixture are one unit: both of these
# read the one tiny demo.
SHARED_UNITS = {"tests/test_demo_output.py": "tests/test_demo.py"}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return SHARED_UNITS.get(_module(nodeid), _module(nodeid))

    config.option.loadscopereorder = False  # the order below: the longest units first
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The tiny demo's modules first, then the other modules with slow tests, so that no process is
    left alone with a long one at the end; the order within each module is kept."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(_module(item.nodeid), []).append(item)
    demo = {*SHARED_UNITS, *SHARED_UNITS.values()}
    slow = {name for name, tests in modules.items() if any(t.get_closest_marker("slow") for t in tests)}
    items.sort(key=lambda item: 0 if _module(item.nodeid) in demo else 1 if _module(item.nodeid) in slow else 2)


def pytest_configure(config):
    """In a test process beside another, one torch thread each: two processes spinning two
    threads each on two cores run the numerical tests several times slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a small shared CPU two spinning torch threads are several times slower than one
    (MiniLM and the tiny benchmark models especially)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float64():
    """float64 as the default dtype for one test: the numerical oracles compare to ~1e-12."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> dict:
    """One tiny `emf demo` for the test modules that read its output (tests/demo_run.py)."""
    from tests.demo_run import run_tiny_demo
    return run_tiny_demo(tmp_path_factory.mktemp("demo") / "demo")

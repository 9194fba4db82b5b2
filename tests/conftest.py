"""Fixtures shared by several test modules."""
import pytest
import torch


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

"""Shared test setup: make the flat top-level scripts importable, keep torch from busy-waiting, and keep the
suite on the CPU (its bit-equality checks hold on one device) unless `pytest --gpu` asks for the GPU tests."""
import os
import sys

import pytest

# Set before torch starts its thread pool: busy-waiting OpenMP threads make a second
# process on a 2-core machine 10-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="run the tests marked gpu, on the CUDA device (the rest are skipped)")


def pytest_configure(config):
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA first initialises, after this


def pytest_collection_modifyitems(config, items):
    """With --gpu only the GPU tests run: the rest would see the GPU too, and their bit-equality checks are
    CPU facts."""
    if config.getoption("--gpu"):
        skip = pytest.mark.skip(reason="--gpu runs the tests marked gpu only")
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip)

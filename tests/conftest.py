"""Shared test setup: make the flat top-level scripts importable, keep torch from busy-waiting, and keep the
suite on the CPU (its bit-equality checks hold on one device) unless `pytest --gpu -m gpu` asks for the GPU."""
import os
import sys

# Set before torch starts its thread pool: busy-waiting OpenMP threads make a second
# process on a 2-core machine 10-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--gpu", action="store_true", help="let tests see CUDA devices (run with -m gpu)")


def pytest_configure(config):
    if not config.getoption("--gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA first initialises, after this

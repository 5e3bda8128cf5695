"""Shared test setup: make the flat top-level scripts importable and keep torch from busy-waiting."""
import os
import sys

# Set before torch starts its thread pool: busy-waiting OpenMP threads make a second
# process on a 2-core machine 10-20x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

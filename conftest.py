"""Loaded by pytest before anything imports torch: let idle OpenMP threads sleep instead of
spinning, which keeps the many tiny-tensor tests fast on a shared 2-core machine."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

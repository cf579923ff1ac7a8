"""Shared test settings.

Hypothesis profiles (pick one with ``pytest --hypothesis-profile=NAME``):

* ``minblip`` (default): 20 examples per property, derandomized, so a plain
  ``pytest`` run is reproducible and fast (the whole foundation suite runs in
  well under a minute on two cores). No example database is written.
* ``explore``: 200 fresh random examples per property, for hunting new failures.

``deadline=None`` everywhere: a gradient check does hundreds of forward passes,
and its run time says nothing about correctness.

The tests and the notebook kernels (which inherit this environment) use one
BLAS thread: minblip's matrices are small, and on two cores a second OpenBLAS
thread mostly waits, which made test runs several times slower. A value set
by the user is respected.
"""
import os
import sys

if "numpy" not in sys.modules:  # the setting only counts before NumPy loads OpenBLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "minblip", max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "explore", max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("minblip")

"""Shared test settings.

Hypothesis profiles (pick one with ``pytest --hypothesis-profile=NAME``):

* ``minblip`` (default): 20 examples per property, derandomized, so a plain
  ``pytest`` run is reproducible and fast (the whole foundation suite runs in
  well under a minute on two cores). No example database is written.
* ``explore``: 200 fresh random examples per property, for hunting new failures.

``deadline=None`` everywhere: a gradient check does hundreds of forward passes,
and its run time says nothing about correctness.
"""
from hypothesis import HealthCheck, settings

settings.register_profile(
    "minblip", max_examples=20, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "explore", max_examples=200, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("minblip")

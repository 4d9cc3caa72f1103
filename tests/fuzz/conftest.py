"""Hypothesis profiles for the fuzz tests: bounded everywhere, and reproducible in CI.

`CI` set: the `ci` profile, derandomized (the same examples every run, so a red build is a real one) with
few enough examples that the module runs in well under a minute on two cores. Otherwise `dev`: the same
bound, random examples, so local runs keep exploring. Neither keeps an example database in the tree.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

EXAMPLES = 400
DEADLINE = timedelta(seconds=2)
"""Per example: a reader that loops or allocates on a hostile number blows through it at once."""

settings.register_profile("ci", max_examples=EXAMPLES, deadline=DEADLINE, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=EXAMPLES, deadline=DEADLINE, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

"""
How torch's CPU threads wait, set before torch loads.

torch's CPU threads are OpenMP threads (GNU libgomp in the PyPI wheels). By default they spin for a while at every
barrier before sleeping. On a machine where another process holds a core, the thread sharing that core is descheduled
for whole time slices while the others spin waiting for it, at each of the thousands of parallel regions of a sampling
run: ENAT-L sampling took 2.8x its idle time with one of two cores busy. With `OMP_WAIT_POLICY=PASSIVE` waiting
threads sleep at once: 1.8x under the same load, and no slower on an idle machine (docs/source/optimization/speed-memory.md, "Shared machines").

libgomp reads the variable once, when torch is imported, so it can only be set before that. Importing
`enat_diffusers` before torch therefore sets `OMP_WAIT_POLICY=PASSIVE` unless the environment already sets it, or
sets `ENAT_DIFFUSERS_SET_OMP_WAIT_POLICY=0` (libgomp's own default: spin, then sleep); imported after torch, it
changes nothing. `wait_policy_applied` says whether it set the variable.
"""

import os
import sys

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"
DEFAULT_WAIT_POLICY = "PASSIVE"
# Set to 0 to leave OpenMP's waiting as libgomp does it by default (e.g. to measure that default).
OPT_OUT_VARIABLE = "ENAT_DIFFUSERS_SET_OMP_WAIT_POLICY"


def apply_default_wait_policy() -> bool:
    """Sets `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it or opts out, or torch is loaded already;
    returns whether it did."""
    if WAIT_POLICY_VARIABLE in os.environ or os.environ.get(OPT_OUT_VARIABLE) == "0" or "torch" in sys.modules:
        return False
    os.environ[WAIT_POLICY_VARIABLE] = DEFAULT_WAIT_POLICY
    return True


# Whether importing this package chose the wait policy (False: the environment chose it, or torch came first).
wait_policy_applied = apply_default_wait_policy()

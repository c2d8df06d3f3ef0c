"""Importing enat_diffusers before torch makes torch's OpenMP threads wait passively, unless told otherwise."""

import json
import os
import subprocess
import sys

import pytest

from enat_diffusers import cpu_threads

REPORT = (
    "import json, os, sys\n"
    "{imports}\n"
    "from enat_diffusers import cpu_threads\n"
    "print(json.dumps([os.environ.get('OMP_WAIT_POLICY'), cpu_threads.wait_policy_applied]))\n"
)


def fresh_process(imports: str, **environment) -> list:
    """What a new Python process that runs `imports` sees: the wait policy and whether enat_diffusers set it."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in (cpu_threads.WAIT_POLICY_VARIABLE, cpu_threads.OPT_OUT_VARIABLE)
    }
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", REPORT.format(imports=imports)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("imports", "environment", "expected"),
    [
        ("import enat_diffusers", {}, ["PASSIVE", True]),
        ("import enat_diffusers", {"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", False]),
        ("import enat_diffusers", {"ENAT_DIFFUSERS_SET_OMP_WAIT_POLICY": "0"}, [None, False]),
        ("import torch", {}, [None, False]),  # torch came first: libgomp has read the environment already
    ],
    ids=["first", "user-set", "opted-out", "after-torch"],
)
def test_the_wait_policy_is_passive_only_where_it_can_still_act_and_nobody_chose(imports, environment, expected):
    assert fresh_process(imports, **environment) == expected

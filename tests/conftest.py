"""Shared fixtures: one private Ray for the whole pytest session.

Started with `sweeps.local_ray.start` (its own temp dir and free ports, never a cluster some `ray
start` left on the machine, start-up retried on a busy machine), with RAY_AUTH_MODE fixed for the
session so that driver subprocesses joining it (`--address`) authenticate the same way. Never
`ray stop`: that would end every Ray on the machine.
"""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_address():
    """The GCS address of this session's private Ray (2 CPUs), started on first use."""
    import ray

    from sweeps import local_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = None
    if not ray.is_initialized():
        temp_dir = local_ray.start(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    if temp_dir:
        ray.shutdown()
        local_ray.cleanup(temp_dir)

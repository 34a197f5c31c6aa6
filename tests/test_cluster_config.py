"""Every cluster YAML against Ray's own cluster-config schema (the one in the ray wheel) and the
project's rules; each broken variant fails with a message naming the field."""
from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from cluster import validate

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml")) + sorted((REPO / "tests" / "fake_cluster").glob("*.yaml"))
GPU_YAML = REPO / "cluster" / "gpu.yaml"


@pytest.fixture
def gpu_config() -> dict:
    return validate.load_config(GPU_YAML)


def errors_of(config: dict) -> str:
    return "\n".join(validate.check_config(config).errors)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_cluster_yaml_passes_rays_schema_and_our_rules(path):
    report = validate.validate_file(path)
    assert report.errors == (), report.render()


def test_the_configs_we_ship_are_found():
    assert {p.name for p in CONFIGS} >= {"gpu.yaml", "autoscaler.yaml"}


def test_gpu_yaml_shape(gpu_config):
    types = gpu_config["available_node_types"]
    assert types[gpu_config["head_node_type"]]["resources"] == {"CPU": 0}
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items()}
    assert gpus == {"head": 0, "gpu1x": 1, "gpu4x": 4}
    assert gpu_config["idle_timeout_minutes"] > 0
    assert all(types[n]["min_workers"] == 0 < types[n]["max_workers"] for n in ("gpu1x", "gpu4x"))
    starts = gpu_config["head_start_ray_commands"] + gpu_config["worker_start_ray_commands"]
    assert all("ulimit -n 65536" in c and "RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_gpu_yaml_placeholders_are_listed_and_fail_strict(gpu_config):
    report = validate.check_config(gpu_config, "gpu.yaml")
    assert report.ok() and not report.ok(strict=True)
    fields = {p.split(" = ")[0] for p in report.placeholders}
    assert fields == {f"available_node_types.{t}.node_config.{f}" for t in ("head", "gpu1x", "gpu4x")
                      for f in ("ImageId", "IamInstanceProfile.Arn")}


def test_gpu_yaml_needs_no_shared_file_system(gpu_config):
    """S3 is the storage: nothing is mounted, so the first `ray up` needs no security group set up."""
    setup = "\n".join(gpu_config["setup_commands"])
    assert "mount -t nfs" not in setup and "efs" not in setup.lower()
    assert all(t["node_config"].get("IamInstanceProfile") for t in gpu_config["available_node_types"].values())


def test_an_efs_mount_needs_security_groups_on_every_node_type(gpu_config):
    mount = ("sudo mkdir -p /mnt/adrec && sudo mount -t nfs4 -o nfsvers=4.1 "
             "fs-0123.efs.us-west-2.amazonaws.com:/ /mnt/adrec")
    config = copy.deepcopy(gpu_config)
    config["setup_commands"].append(mount)
    errors = errors_of(config)
    assert errors.count("has no SecurityGroupIds") == 3 and "use --storage s3://BUCKET/adrec" in errors
    for t in config["available_node_types"].values():
        t["node_config"]["SecurityGroupIds"] = ["sg-0123456789abcdef0"]
    assert "SecurityGroupIds" not in errors_of(config)


def test_pins_match_this_machine():
    """The nodes install the Ray this machine runs (the launcher and the schema are this Ray's)."""
    pins = dict(line.split("==") for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["ray"] == ray.__version__
    assert f"ray[default,tune]=={ray.__version__}" in GPU_YAML.read_text()
    import torch

    assert pins["torch"] == torch.__version__.split("+")[0]


def _set(config: dict, path: str, value) -> dict:
    out = copy.deepcopy(config)
    *parents, last = path.split("/")
    node = out
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()
_SETUP = "setup_commands"


def _replace_in_commands(key: str, old: str, new: str):
    def edit(config: dict) -> dict:
        out = copy.deepcopy(config)
        out[key] = [c.replace(old, new) for c in out[key]]
        return out
    return edit


BROKEN = [
    ("head-runs-trials", lambda c: _set(c, "available_node_types/head/resources", {"CPU": 8}),
     r"available_node_types.head.resources: CPU=8; the head must run no trials .* set resources: \{\"CPU\": 0\}"),
    ("head-start-cpus", _replace_in_commands("head_start_ray_commands", "--num-cpus=0", "--num-cpus=4"),
     r"head_start_ray_commands: `ray start --head` has --num-cpus=4; .* use --num-cpus=0"),
    ("gpu-count-wrong", lambda c: _set(c, "available_node_types/gpu4x/resources", {"CPU": 48, "GPU": 1}),
     r"available_node_types.gpu4x.resources: GPU=1 but InstanceType g5.12xlarge has 4 GPU\(s\)"),
    ("gpu-undeclared", lambda c: _set(c, "available_node_types/gpu1x/resources", {"CPU": 4}),
     r"available_node_types.gpu1x.resources: GPU=None but InstanceType g5.xlarge has 1 GPU"),
    ("fractional-gpu-in-type", lambda c: _set(c, "available_node_types/gpu1x/resources", {"CPU": 4, "GPU": 0.5}),
     r"available_node_types.gpu1x.resources.GPU: 0.5 is not of type 'integer' \(Ray's cluster schema\)"),
    ("unknown-field", lambda c: _set(c, "available_node_types/gpu1x/gpus", 1),
     r"available_node_types.gpu1x: Additional properties are not allowed \('gpus' was unexpected\)"),
    ("head-type-missing", lambda c: _set(c, "head_node_type", "ray.head.default"),
     r"Ray's validate_config: `head_node_type` must be one of `available_node_types`"),
    ("cannot-scale-up", lambda c: _set(c, "available_node_types/gpu1x/min_workers", 8),
     r"available_node_types.gpu1x: min_workers=8, max_workers=8; the autoscaler cannot add gpu1x nodes"),
    ("no-idle-timeout", lambda c: _set(c, "idle_timeout_minutes", 0),
     r"idle_timeout_minutes: 0; idle GPU nodes would never be removed"),
    ("project-not-installed", _replace_in_commands(_SETUP, "-e /home/ubuntu/adrec-sensitivity", ""),
     r"setup_commands: no command installs the project from the synced directory /home/ubuntu/adrec-sensitivity"),
    ("ray-pin-differs", _replace_in_commands(_SETUP, "ray[default,tune]==2.60.0", "ray[default,tune]==2.59.0"),
     r"setup_commands: pins ray==2.59.0 but this machine runs ray 2.60.0"),
    ("ray-unpinned", _replace_in_commands(_SETUP, "ray[default,tune]==2.60.0", "ray[default,tune]"),
     r"setup_commands: ray is installed without a version pin"),
    ("working-dir-not-synced", lambda c: _set(c, "file_mounts", {"/home/ubuntu/.ray/auth_token": "~/.ray/auth_token"}),
     r"file_mounts: no entry syncs the working directory"),
    ("no-ulimit", _replace_in_commands("worker_start_ray_commands", "ulimit -n 65536;", ""),
     r"worker_start_ray_commands: `ray start` runs with the default open-file limit.*ulimit -n 65536"),
    ("auth-mode-differs", _replace_in_commands("worker_start_ray_commands", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"),
     r"RAY_AUTH_MODE differs \(\{'head_start_ray_commands': 'token', 'worker_start_ray_commands': 'disabled'\}\)"),
    ("token-not-shipped", lambda c: _set(c, "file_mounts", {"/home/ubuntu/adrec-sensitivity": "."}),
     r"file_mounts: RAY_AUTH_MODE=token but no node receives the token"),
    ("no-instance-profile", lambda c: _set(c, "available_node_types/gpu4x/node_config/IamInstanceProfile", _DELETE),
     r"available_node_types.gpu4x.node_config: no IamInstanceProfile; this node cannot reach the S3 bucket"),
    ("no-provider", lambda c: _set(c, "provider", {}),
     r"provider.type: missing"),
]


@pytest.mark.parametrize("mutate, message", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_gpu_config_is_refused_naming_the_field(gpu_config, mutate, message):
    errors = errors_of(mutate(gpu_config))
    assert re.search(message, errors), errors


def test_field_paths_quote_keys_that_are_not_identifiers():
    assert validate.field_path(["available_node_types", "ray.head.default", "resources", "CPU"]) == \
        "available_node_types['ray.head.default'].resources.CPU"
    assert validate.field_path(["setup_commands", 2]) == "setup_commands[2]"


def test_cli_exit_codes_and_output(tmp_path):
    run = [sys.executable, "-m", "cluster.validate"]
    ok = subprocess.run(run + [str(GPU_YAML), str(REPO / "tests/fake_cluster/autoscaler.yaml")], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "gpu.yaml: valid; node types: head m5.2xlarge (CPU 0; head); gpu1x g5.xlarge (CPU 4, GPU 1; 0..8)" in ok.stdout
    strict = subprocess.run(run + ["--strict", str(GPU_YAML)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1
    assert "error: available_node_types.head.node_config.ImageId = ami-REPLACE_ME is a placeholder" in strict.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text(GPU_YAML.read_text().replace('resources: {"CPU": 0}', 'resources: {"CPU": 2}'))
    bad = subprocess.run(run + [str(broken)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "INVALID" in bad.stdout and "CPU=2; the head must run no trials" in bad.stdout

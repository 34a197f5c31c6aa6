"""Check a Ray cluster YAML before `ray up`: Ray's own schema first, then this project's rules.

    python -m cluster.validate cluster/gpu.yaml [more.yaml ...] [--strict]

Ray's part is what `ray up` itself runs: the config is completed with the provider's defaults
(`prepare_config`), checked against the JSON schema shipped in the ray wheel
(`ray/autoscaler/ray-schema.json`, every violation listed with its field path) and then by Ray's
`validate_config`. The project's rules: the head runs no trials, GPU worker types declare their GPUs
(and the count the instance type really has), the autoscaler can add and remove GPU nodes, setup
installs this project from the synced working directory with the same Ray as this machine, the
start commands raise the open-file limit and agree on RAY_AUTH_MODE, AWS nodes carry an instance
profile for the S3 bucket the sweep writes to (the default storage), and a config that mounts an
NFS/EFS folder instead gives its nodes a security group the mount targets can allow before the
first `ray up`. Values containing REPLACE_ME are listed; `--strict` fails on them.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

PLACEHOLDER = "REPLACE_ME"
REPO_ROOT = Path(__file__).resolve().parents[1]
# Providers whose config is used as written: Ray's fake_multinode defaults file (example.yaml) is
# not shipped in the ray 2.60 wheel, and its monitor reads the YAML without completing it.
USED_AS_WRITTEN = {"fake_multinode"}
MIN_OPEN_FILES = 65536

# AWS instance families with NVIDIA GPUs, and the GPU count of the sizes this project suggests.
AWS_GPU_FAMILY = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p3dn|p4d|p4de|p5|p5e|p5en)\.")
AWS_GPUS = {
    "g4dn.xlarge": 1, "g4dn.2xlarge": 1, "g4dn.4xlarge": 1, "g4dn.8xlarge": 1, "g4dn.16xlarge": 1,
    "g4dn.12xlarge": 4, "g4dn.metal": 8,
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.16xlarge": 1,
    "g5.12xlarge": 4, "g5.24xlarge": 4, "g5.48xlarge": 8,
    "g6.xlarge": 1, "g6.2xlarge": 1, "g6.4xlarge": 1, "g6.8xlarge": 1, "g6.16xlarge": 1,
    "g6.12xlarge": 4, "g6.24xlarge": 4, "g6.48xlarge": 8,
    "p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8,
}


@dataclass(frozen=True)
class Report:
    """The outcome for one config: errors (rule, value, fix), placeholders left, a one-line summary."""

    source: str
    errors: tuple[str, ...]
    placeholders: tuple[str, ...]
    summary: str

    def ok(self, strict: bool = False) -> bool:
        return not self.errors and not (strict and self.placeholders)

    def render(self, strict: bool = False) -> str:
        head = f"{self.source}: {'valid' if self.ok(strict) else 'INVALID'}; {self.summary}"
        lines = [head] + [f"  error: {e}" for e in self.errors]
        kind = "error" if strict else "to replace before `ray up`"
        lines += [f"  {kind}: {p} is a placeholder: put your value (docs/cluster.md)" for p in self.placeholders]
        return "\n".join(lines)


def load_config(path: str | Path) -> dict[str, Any]:
    """The YAML at `path` as a dict (a clear error when it is not a mapping)."""
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a cluster config must be a YAML mapping; got {type(config).__name__}")
    return config


def check_config(config: dict[str, Any], source: str = "<config>") -> Report:
    """Ray's checks, then the project's rules (only when Ray accepts the config), then placeholders."""
    errors = ray_errors(config)
    if not errors:
        errors = project_errors(config)
    return Report(source, tuple(errors), tuple(placeholders(config)), _summary(config))


def validate_file(path: str | Path) -> Report:
    """`check_config` of the YAML at `path`."""
    return check_config(load_config(path), str(path))


# ---------------------------------------------------------------------------------------------
# Ray's own checks
# ---------------------------------------------------------------------------------------------
def ray_schema() -> dict[str, Any]:
    """The cluster-config JSON schema shipped in the installed ray wheel."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_errors(config: dict[str, Any]) -> list[str]:
    """Every schema violation (with its field path) of the config as `ray up` completes it, then
    Ray's `validate_config` (head_node_type, min/max workers)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    provider_section = config.get("provider")
    provider = provider_section.get("type") if isinstance(provider_section, dict) else None
    if provider is None:
        return ["provider.type: missing; set provider: {type: aws, region: ...} (or fake_multinode for local tests)"]
    try:
        full = copy.deepcopy(config) if provider in USED_AS_WRITTEN else prepare_config(copy.deepcopy(config))
    except (KeyError, ValueError, TypeError, NotImplementedError, AssertionError) as exc:
        return [f"Ray could not complete the config with provider {provider!r}'s defaults: "
                f"{type(exc).__name__}: {exc}"]
    schema = ray_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    found = sorted(validator.iter_errors(full), key=lambda e: [str(p) for p in e.absolute_path])
    errors = [f"{field_path(e.absolute_path) or '(top level)'}: {e.message} (Ray's cluster schema)"
              for e in found]
    if errors:
        return errors
    try:
        validate_config(full)
    except (ValueError, RuntimeError) as exc:
        return [f"Ray's validate_config: {exc}"]
    return []


def field_path(parts: Any) -> str:
    """`available_node_types.gpu1x.resources.GPU`; keys that are not identifiers in brackets."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += ("." if out else "") + str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


# ---------------------------------------------------------------------------------------------
# The project's rules
# ---------------------------------------------------------------------------------------------
def project_errors(config: dict[str, Any]) -> list[str]:
    """Rules `ray up` does not know but this sweep needs; each message names the field."""
    return (head_runs_no_trials(config) + gpu_types_declare_gpus(config) + autoscaler_can_scale(config)
            + setup_installs_project(config) + start_commands(config) + storage_access(config))


def _types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return config.get("available_node_types") or {}


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in _types(config).items() if name != config.get("head_node_type")}


def _launched_by_commands(config: dict[str, Any]) -> bool:
    """True for `ray up` configs (nodes set up over SSH); False for the fake local provider."""
    return config["provider"]["type"] not in USED_AS_WRITTEN


def head_runs_no_trials(config: dict[str, Any]) -> list[str]:
    """The head advertises no CPU and no GPU, so no trial (which asks for CPU) is placed there."""
    head = config["head_node_type"]
    resources = _types(config)[head].get("resources") or {}
    errors = []
    if resources.get("CPU") != 0:
        errors.append(f"available_node_types.{head}.resources: CPU={resources.get('CPU')!r}; the head must "
                      f"run no trials (it runs the driver and the GCS): set resources: {{\"CPU\": 0}}")
    if resources.get("GPU", 0) != 0:
        errors.append(f"available_node_types.{head}.resources: GPU={resources['GPU']!r}; the head must run "
                      f"no trials: remove GPU from the head's resources")
    for command in config.get("head_start_ray_commands") or []:
        match = re.search(r"--num-cpus[= ](\S+)", command)
        if "ray start" in command and match and match.group(1) != "0":
            errors.append(f"head_start_ray_commands: `ray start --head` has --num-cpus={match.group(1)}; the "
                          f"head must run no trials: use --num-cpus=0")
    return errors


def gpu_types_declare_gpus(config: dict[str, Any]) -> list[str]:
    """GPU instance types declare resources.GPU (the count the instance has); some worker type has a GPU."""
    errors = []
    for name, node_type in _workers(config).items():
        instance = str((node_type.get("node_config") or {}).get("InstanceType", ""))
        declared = (node_type.get("resources") or {}).get("GPU")
        field = f"available_node_types.{name}.resources"
        if instance in AWS_GPUS and declared != AWS_GPUS[instance]:
            errors.append(f"{field}: GPU={declared!r} but InstanceType {instance} has {AWS_GPUS[instance]} "
                          f"GPU(s); declare resources: {{\"GPU\": {AWS_GPUS[instance]}, ...}}")
        elif AWS_GPU_FAMILY.match(instance) and not declared:
            errors.append(f"{field}: no GPU declared for GPU InstanceType {instance}; declare resources: "
                          f"{{\"GPU\": <GPUs of {instance}>, ...}} so the autoscaler launches it for GPU trials")
    if not any((t.get("resources") or {}).get("GPU", 0) >= 1 for t in _workers(config).values()):
        errors.append("available_node_types: no worker type declares a GPU (resources: {\"GPU\": n}); the "
                      "sweep's GPU trials would stay pending forever: add a GPU worker type")
    return errors


def autoscaler_can_scale(config: dict[str, Any]) -> list[str]:
    """GPU types can grow (max_workers > min_workers) and idle nodes are removed (idle_timeout_minutes > 0)."""
    errors = []
    for name, node_type in _workers(config).items():
        if (node_type.get("resources") or {}).get("GPU", 0) < 1:
            continue
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", config.get("max_workers", 0))
        if high <= low:
            errors.append(f"available_node_types.{name}: min_workers={low}, max_workers={high}; the autoscaler "
                          f"cannot add {name} nodes while trials are pending: set max_workers > min_workers")
    idle = config.get("idle_timeout_minutes")
    if idle is None or idle <= 0:
        errors.append(f"idle_timeout_minutes: {idle!r}; idle GPU nodes would never be removed: set a number "
                      f"of minutes > 0 (e.g. 10)")
    if config.get("max_workers", 0) < 1:
        errors.append(f"max_workers: {config.get('max_workers')!r}; the cluster could not add a single worker: "
                      f"set max_workers >= 1")
    return errors


def _all_setup_commands(config: dict[str, Any]) -> list[str]:
    commands = []
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        commands += config.get(key) or []
    for node_type in _types(config).values():
        commands += node_type.get("worker_setup_commands") or []
    return [str(c) for c in commands]


def _synced_working_dirs(config: dict[str, Any]) -> list[str]:
    """file_mounts targets whose local side is the repository (`.` when `ray up` runs at its root)."""
    targets = []
    for remote, local in (config.get("file_mounts") or {}).items():
        if str(local).rstrip("/") in (".", "") or Path(str(local)).expanduser().resolve() == REPO_ROOT:
            targets.append(str(remote).rstrip("/"))
    return targets


def setup_installs_project(config: dict[str, Any]) -> list[str]:
    """file_mounts syncs the working directory; setup pip-installs it (-e) and pins this machine's Ray."""
    if not _launched_by_commands(config):
        return []
    import ray

    targets = _synced_working_dirs(config)
    if not targets:
        return ["file_mounts: no entry syncs the working directory; add `/home/ubuntu/adrec-sensitivity: .` "
                "(and run `ray up` from the repository root)"]
    commands = "\n".join(_all_setup_commands(config))
    errors = []
    installs = [t for t in targets
                if re.search(r"pip install[^\n]*(?:-e|--editable)[ =]+[\"']?" + re.escape(t) + r"[/\"']?(?:\s|$)",
                             commands)]
    if not installs:
        errors.append(f"setup_commands: no command installs the project from the synced directory {targets[0]}; "
                      f"add `pip install \"ray[default,tune]=={ray.__version__}\" -e {targets[0]}`")
    pins = re.findall(r"ray(?:\[[^\]]*\])?==([0-9][^\s\"']*)", commands)
    if not pins:
        errors.append(f"setup_commands: ray is installed without a version pin; every node and this machine "
                      f"must run the same Ray: pin \"ray[default,tune]=={ray.__version__}\"")
    for pin in sorted(set(pins) - {ray.__version__}):
        errors.append(f"setup_commands: pins ray=={pin} but this machine runs ray {ray.__version__} (the "
                      f"launcher, the driver and the nodes must match): pin ray[default,tune]=={ray.__version__}")
    return errors


def start_commands(config: dict[str, Any]) -> list[str]:
    """`ray start` runs under `ulimit -n >= 65536`; every start command sets the same RAY_AUTH_MODE,
    and token mode ships the token file to every node."""
    errors, modes = [], {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [str(c) for c in config.get(key) or [] if "ray start" in str(c)]
        for command in starts:
            limit = re.search(r"ulimit -n (\d+)", command)
            if not limit or int(limit.group(1)) < MIN_OPEN_FILES:
                errors.append(f"{key}: `ray start` runs with the default open-file limit; trials with many "
                              f"workers hit 'Too many open files': prefix it with `ulimit -n {MIN_OPEN_FILES};`")
            mode = re.search(r"RAY_AUTH_MODE=(\w+)", command)
            modes[key] = mode.group(1) if mode else None
    if len(set(modes.values())) > 1:
        errors.append(f"head_start_ray_commands/worker_start_ray_commands: RAY_AUTH_MODE differs ({modes}); a "
                      f"node with another mode cannot join: set the same RAY_AUTH_MODE in both")
    if "token" in modes.values():
        mounts = [str(r) for r in (config.get("file_mounts") or {})]
        if not any(r.endswith(".ray/auth_token") for r in mounts):
            errors.append("file_mounts: RAY_AUTH_MODE=token but no node receives the token; add "
                          "`/home/ubuntu/.ray/auth_token: ~/.ray/auth_token` (create it with "
                          "`ray get-auth-token --generate`)")
    return errors


def storage_access(config: dict[str, Any]) -> list[str]:
    """On AWS every node type carries an IAM instance profile: the sweep's storage is an S3 prefix
    every node writes to. A config that mounts an NFS/EFS folder instead must give every node type
    SecurityGroupIds: Ray creates its own group at the first `ray up`, too late for the EFS mount
    targets' NFS rule to name it, so the first mount would hang."""
    if not _launched_by_commands(config) or config["provider"]["type"] != "aws":
        return []
    errors = [f"available_node_types.{name}.node_config: no IamInstanceProfile; this node cannot reach the "
              f"S3 bucket: add IamInstanceProfile: {{Arn: arn:aws:iam::<account>:instance-profile/<name>}}"
              for name, t in _types(config).items() if not (t.get("node_config") or {}).get("IamInstanceProfile")]
    if re.search(r"\bmount\b[^\n]*-t (nfs|efs)", "\n".join(_all_setup_commands(config))):
        errors += [f"available_node_types.{name}.node_config: setup mounts NFS/EFS but this node type has no "
                   f"SecurityGroupIds; the mount targets' NFS rule (TCP 2049) cannot allow a group Ray creates at the "
                   f"first `ray up`: add SecurityGroupIds: [sg-...] (a group made beforehand) or use --storage "
                   f"s3://BUCKET/adrec without the mount"
                   for name, t in _types(config).items() if not (t.get("node_config") or {}).get("SecurityGroupIds")]
    return errors


# ---------------------------------------------------------------------------------------------
# Placeholders and the summary
# ---------------------------------------------------------------------------------------------
def _walk(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, path + (i,))
    else:
        yield path, value


def placeholders(config: dict[str, Any]) -> list[str]:
    """`field = value` for every value that still holds REPLACE_ME."""
    return [f"{field_path(p)} = {v if len(v) <= 100 else '...' + v[v.index(PLACEHOLDER) - 40:][:90] + '...'}"
            for p, v in _walk(config) if isinstance(v, str) and PLACEHOLDER in v]


def _summary(config: dict[str, Any]) -> str:
    parts = []
    for name, t in _types(config).items():
        instance = (t.get("node_config") or {}).get("InstanceType", "")
        res = ", ".join(f"{k} {v}" for k, v in (t.get("resources") or {}).items())
        role = "head" if name == config.get("head_node_type") else f"{t.get('min_workers', 0)}..{t.get('max_workers', '?')}"
        parts.append(f"{name} {instance} ({res}; {role})".replace("  ", " "))
    return "node types: " + "; ".join(parts) if parts else "no node types"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", help="cluster YAML files")
    parser.add_argument("--strict", action="store_true", help="fail while a REPLACE_ME placeholder is left")
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config's INFO chatter
    ok = True
    for path in args.configs:
        try:
            report = validate_file(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"{path}: cannot be read: {exc}")
            ok = False
            continue
        print(report.render(args.strict))
        ok = ok and report.ok(args.strict)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

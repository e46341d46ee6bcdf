"""The deployment files: cluster.yaml, the KubeRay nightly screen, the crontab example.

CI has no AWS account and no Kubernetes cluster, so these tests check what can be checked
offline: cluster.yaml through the Ray launcher's own defaults and schema, the Kubernetes
objects and the references between them, the nightly command line through lungray's own
argument parser, and cron syntax. No Ray cluster is started.
"""

from __future__ import annotations

import copy
import re
import shlex
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
KUBERAY_YAML = REPO / "deploy" / "kuberay-nightly-screen.yaml"
CRONTAB = REPO / "deploy" / "crontab.example"
SCREEN_JOB = "jobs/screen.py"
DATE_PLACEHOLDER = "@DATE@"  # replaced by the CronJob when it creates the night's RayJob
A_DATE = "2026-11-27"

# (vCPUs, GPUs) of the EC2 instance types cluster.yaml may use, from AWS's instance type
# pages. A node type must declare what its instance has: declaring more makes the
# autoscaler launch nodes that cannot run what they were launched for.
INSTANCE_SHAPES = {
    "m6i.2xlarge": (8, 0),
    "c6i.8xlarge": (32, 0),
    "g5.xlarge": (4, 1),
    "g6.xlarge": (4, 1),
    "g5.12xlarge": (48, 4),
}

CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_ITEM = re.compile(r"(?:\*|(\d+)(?:-(\d+))?)(?:/(\d+))?")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\s*=")
# KubeRay names the cluster and its services after the RayJob, so it refuses RayJob names
# that are not DNS-1035 labels or are longer than 47 characters.
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
RAYJOB_NAME_MAX = 47


def is_cron_schedule(expression: str) -> bool:
    """Five numeric cron fields (`*`, N, N-M, lists, /step) within their ranges."""
    fields = expression.split()
    if len(fields) != len(CRON_RANGES):
        return False
    for field, (low, high) in zip(fields, CRON_RANGES):
        for item in field.split(","):
            match = CRON_ITEM.fullmatch(item)
            if match is None:
                return False
            start, end, step = match.groups()
            bounds = [int(value) for value in (start, end) if value is not None]
            if any(not low <= value <= high for value in bounds) or bounds != sorted(bounds):
                return False
            if step is not None and int(step) == 0:
                return False
    return True


def parse_screen_arguments(tokens: list[str]) -> Any:
    """Parse a `python jobs/screen.py ...` command line as the job does: with `lungray screen`'s parser."""
    from lungray.cli import build_parser

    assert tokens[0] == "python" and tokens[1].endswith(SCREEN_JOB), tokens
    return build_parser().parse_args(["screen", *tokens[2:]])


def test_the_screen_job_the_deploy_files_run_exists() -> None:
    assert (REPO / SCREEN_JOB).is_file()


# --- cluster.yaml --------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def gpu_count(node_type: dict[str, Any]) -> int:
    return node_type["resources"].get("GPU", 0)


def test_cluster_yaml_passes_the_launchers_own_validation(cluster: dict[str, Any]) -> None:
    # The checks of `ray up` that need no AWS account: merge the provider's defaults, then
    # check the result against ray-schema.json and the launcher's cross-field rules.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_node_types_declare_the_resources_of_their_instances(cluster: dict[str, Any]) -> None:
    for name, node_type in cluster["available_node_types"].items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in INSTANCE_SHAPES, f"{name}: add {instance}'s vCPUs and GPUs to INSTANCE_SHAPES"
        cpus, gpus = INSTANCE_SHAPES[instance]
        assert gpu_count(node_type) == gpus, name
        if name != cluster["head_node_type"]:
            assert node_type["resources"]["CPU"] == cpus, name


def test_head_is_a_cpu_node_that_takes_no_tasks(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert INSTANCE_SHAPES[head["node_config"]["InstanceType"]][1] == 0
    assert gpu_count(head) == 0
    assert head["resources"]["CPU"] == 0


def test_workers_offer_single_gpu_multi_gpu_and_cpu_only_nodes(cluster: dict[str, Any]) -> None:
    workers = {name: node for name, node in cluster["available_node_types"].items() if name != cluster["head_node_type"]}
    gpus = sorted(gpu_count(node) for node in workers.values())
    assert 0 in gpus and 1 in gpus and max(gpus) >= 2, gpus


def nodes_launched_for(cluster: dict[str, Any], demands: list[dict[str, float]]) -> dict[str, int]:
    """The node types Ray's autoscaler would launch for these demands on an empty cluster."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    scorer = partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))
    launched, unfulfilled = get_nodes_for(
        cluster["available_node_types"], {}, cluster["head_node_type"], cluster["max_workers"], demands, scorer
    )
    assert not unfulfilled, unfulfilled
    return dict(launched)


def nodes_by_gpu_count(cluster: dict[str, Any], launched: dict[str, int]) -> dict[int, int]:
    """GPUs per node -> how many of the launched nodes have that many."""
    counts: dict[int, int] = {}
    for name, count in launched.items():
        gpus = gpu_count(cluster["available_node_types"][name])
        counts[gpus] = counts.get(gpus, 0) + count
    return counts


def test_placement_follows_the_cpus_each_training_worker_asks_for(cluster: dict[str, Any]) -> None:
    # docs/operators.md, "Multi-GPU training": a few CPUs per GPU worker get single-GPU
    # nodes; 8 per worker fit only the 4-GPU node, so `--cpus-per-worker 8` lands there.
    assert nodes_by_gpu_count(cluster, nodes_launched_for(cluster, [{"GPU": 1, "CPU": 3}] * 4)) == {1: 4}
    assert nodes_by_gpu_count(cluster, nodes_launched_for(cluster, [{"GPU": 1, "CPU": 8}] * 4)) == {4: 1}


def test_decode_tasks_do_not_launch_gpu_nodes(cluster: dict[str, Any]) -> None:
    assert set(nodes_by_gpu_count(cluster, nodes_launched_for(cluster, [{"CPU": 1}] * 40))) == {0}


def test_autoscaling_bounds_are_consistent(cluster: dict[str, Any]) -> None:
    assert cluster["idle_timeout_minutes"] > 0
    for name, node_type in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cluster["max_workers"], name


def test_every_node_reaches_s3_through_an_instance_profile(cluster: dict[str, Any]) -> None:
    for name, node_type in cluster["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name


def test_setup_installs_lungray_from_the_synced_repository(cluster: dict[str, Any]) -> None:
    remote_by_local = {(REPO / local).resolve(): remote for remote, local in cluster["file_mounts"].items()}
    assert REPO in remote_by_local, "file_mounts must sync the repository (run `ray up` from its root)"
    assert (REPO / "pyproject.toml").is_file()
    installs = [shlex.split(command) for command in cluster["setup_commands"]]
    assert any(tokens[:2] == ["pip", "install"] and remote_by_local[REPO] in tokens for tokens in installs), installs


def test_the_local_virtualenv_is_not_synced(cluster: dict[str, Any]) -> None:
    assert ".venv" in cluster["rsync_exclude"]


# --- KubeRay -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(KUBERAY_YAML.read_text()) if document]


def one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [document for document in manifests if document["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def rayjob_template(manifests: list[dict[str, Any]]) -> tuple[str, str]:
    """(ConfigMap key, RayJob manifest text with the date placeholder)."""
    [(key, text)] = one(manifests, "ConfigMap")["data"].items()
    return key, text


@pytest.fixture(scope="module")
def rayjob(rayjob_template: tuple[str, str]) -> dict[str, Any]:
    """The RayJob as the CronJob creates it on A_DATE."""
    return yaml.safe_load(rayjob_template[1].replace(DATE_PLACEHOLDER, A_DATE))


def cronjob_script(manifests: list[dict[str, Any]]) -> str:
    [container] = one(manifests, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container["args"][-1]


def test_manifest_kinds_and_api_versions(manifests: list[dict[str, Any]], rayjob: dict[str, Any]) -> None:
    kinds = sorted((document["apiVersion"], document["kind"]) for document in manifests)
    assert kinds == sorted(
        [
            ("v1", "Namespace"),
            ("v1", "ServiceAccount"),
            ("v1", "ServiceAccount"),
            ("rbac.authorization.k8s.io/v1", "Role"),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"),
            ("v1", "ConfigMap"),
            ("batch/v1", "CronJob"),
        ]
    )
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")


def test_rayjob_runs_the_incremental_screen_for_its_date(rayjob: dict[str, Any]) -> None:
    args = parse_screen_arguments(shlex.split(rayjob["spec"]["entrypoint"]))
    assert args.incremental
    assert args.date == A_DATE
    assert all(uri.startswith("s3://") for uri in (args.model, args.input, args.output))


def test_rayjob_name_is_valid_for_kuberay(rayjob: dict[str, Any]) -> None:
    name = rayjob["metadata"]["name"]
    assert A_DATE in name and DNS_1035_LABEL.fullmatch(name) and len(name) <= RAYJOB_NAME_MAX, name


def test_rayjob_cleans_up_retries_and_has_a_deadline(rayjob: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 0
    attempts_deadline = spec["activeDeadlineSeconds"] * (spec["backoffLimit"] + 1)
    waiter_deadline = one(manifests, "CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert attempts_deadline < waiter_deadline < 24 * 3600, "the CronJob must outwait every attempt, and end before the next night"


def test_ray_cluster_has_a_taskless_head_a_gpu_group_and_a_cpu_group(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    [head_container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
    gpus_by_group = {}
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        [container] = group["template"]["spec"]["containers"]
        gpus_by_group[group["groupName"]] = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert min(gpus_by_group.values()) == 0 and max(gpus_by_group.values()) >= 1, gpus_by_group
    for params in [head["rayStartParams"], *(group["rayStartParams"] for group in cluster["workerGroupSpecs"])]:
        assert all(isinstance(value, str) for value in params.values()), "KubeRay takes rayStartParams as strings"


def test_ray_pods_reach_s3_through_irsa(rayjob: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    accounts = {document["metadata"]["name"]: document for document in manifests if document["kind"] == "ServiceAccount"}
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        account = accounts[group["template"]["spec"]["serviceAccountName"]]
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_cronjob_may_do_what_its_script_does(manifests: list[dict[str, Any]]) -> None:
    account = one(manifests, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["serviceAccountName"]
    binding = one(manifests, "RoleBinding")
    assert {"kind": "ServiceAccount", "name": account, "namespace": "lungray"} in binding["subjects"]
    role = one(manifests, "Role")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    allowed = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "get")}
    if "kubectl logs job/" in cronjob_script(manifests).replace('"', ""):
        needed |= {("batch", "jobs", "get"), ("", "pods", "list"), ("", "pods/log", "get")}
    assert needed <= allowed, needed - allowed


def test_cronjob_renders_the_configmap_manifest_nightly(manifests: list[dict[str, Any]], rayjob_template: tuple[str, str]) -> None:
    cronjob = one(manifests, "CronJob")
    assert is_cron_schedule(cronjob["spec"]["schedule"])
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [volume] = [volume for volume in pod["volumes"] if volume["configMap"]["name"] == one(manifests, "ConfigMap")["metadata"]["name"]]
    [mount] = [mount for mount in pod["containers"][0]["volumeMounts"] if mount["name"] == volume["name"]]
    script = cronjob_script(manifests)
    assert f"{mount['mountPath']}/{rayjob_template[0]}" in script
    assert f"s/{DATE_PLACEHOLDER}/" in script and "kubectl create -f -" in script


# --- crontab -------------------------------------------------------------------------


def crontab_entries(text: str) -> list[str]:
    """The job lines of a crontab: not blank, not comments, not VAR=value settings."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#") and not ENV_ASSIGNMENT.match(line)]


@pytest.fixture(scope="module")
def cron_entry() -> tuple[str, str]:
    """(schedule, command) of the crontab's one job line."""
    [line] = crontab_entries(CRONTAB.read_text())
    fields = line.split(maxsplit=5)
    return " ".join(fields[:5]), fields[5]


def test_crontab_line_has_five_valid_time_fields(cron_entry: tuple[str, str]) -> None:
    assert is_cron_schedule(cron_entry[0])


def test_crontab_escapes_every_percent_sign(cron_entry: tuple[str, str]) -> None:
    command = cron_entry[1]
    assert "%" in command and re.search(r"(?<!\\)%", command) is None


def test_crontab_submits_the_incremental_screen_and_waits_under_a_lock(cron_entry: tuple[str, str]) -> None:
    tokens = shlex.split(cron_entry[1].replace("\\%", "%"))  # cron turns \% into %
    assert tokens[0] == "flock" and "-n" in tokens
    submit = tokens.index("ray")
    assert tokens[submit : submit + 3] == ["ray", "job", "submit"]
    separator = tokens.index("--")
    options = tokens[submit + 3 : separator]
    assert "--no-wait" not in options, "waiting is what brings the job's exit code back to cron"
    assert {"--address", "--working-dir"} <= set(options)
    job = tokens[separator + 1 : tokens.index(">>")]
    args = parse_screen_arguments(job)
    assert args.incremental and args.date == "$(date -u +%F)"


@pytest.mark.parametrize(
    ("expression", "valid"),
    [
        ("15 2 * * *", True),
        ("*/15 0-6,22 1 1-12/2 0", True),
        ("60 2 * * *", False),
        ("15 2 * *", False),
        ("5-1 * * * *", False),
        ("*/0 * * * *", False),
        ("15 2 * * * echo", False),
    ],
)
def test_cron_checker_rejects_what_cron_would(expression: str, valid: bool) -> None:
    assert is_cron_schedule(expression) is valid

"""Static checks of infra/: the compose file, the Dockerfiles and the Kubernetes manifests.

No docker, no cluster, no network: these read the files and check what a typo or a half-done edit would break
(an unpinned image, a port open to the network, a dangling dependency, a template variable nobody declared).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
JOB_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
MULTINODE = INFRA / "k8s" / "torchrun-multinode.yaml"
SERVICES = {"postgres", "minio", "minio-buckets", "mlflow", "prefect-server", "cpu-worker", "gpu-worker"}

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader when built: keeps the file well under 1 s

# Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`; `$$` is a literal `$`.
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
# Prefect's own placeholder pattern (prefect.utilities.templating).
PLACEHOLDER = re.compile(r"{{\s*([\w.\-\[\]$]+)\s*}}")


def with_defaults(value: Any) -> Any:
    """`value` as compose would read it with nothing set in the environment: what a fresh checkout gets."""
    if isinstance(value, dict):
        return {key: with_defaults(item) for key, item in value.items()}
    if isinstance(value, list):
        return [with_defaults(item) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if operator and operator.endswith("?"):
            raise AssertionError(f"${{{name}}} is required: the stack would not start without it")
        return default if operator else ""

    return INTERPOLATION.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return with_defaults(yaml.load(COMPOSE.read_text(), Loader=Loader))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return json.loads(JOB_TEMPLATE.read_text())


def project_pins(extra: str | None = None) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["optional-dependencies"][extra] if extra else project["dependencies"]
    pins = (dep.split("==", 1) for dep in deps if "==" in dep)
    return {name.split("[")[0]: version for name, version in pins}  # moto[server] is pinned as moto


def lock_pins() -> dict[str, str]:
    lines = (REPO / "requirements.lock.txt").read_text().splitlines()
    return {name.lower(): version for name, version in (line.split("==", 1) for line in lines if "==" in line)}


def test_the_lock_holds_every_pin_of_the_project_and_its_extras() -> None:
    # `pip install -c requirements.lock.txt ".[s3]"` must resolve offline to what was tested.
    lock = lock_pins()
    for extra in (None, "dev", "s3"):
        for name, version in project_pins(extra).items():
            assert lock.get(name.lower()) == version, (extra, name)


def pinned(ref: str) -> bool:
    """An image reference with an explicit tag (or digest) that is not `latest`."""
    if "@sha256:" in ref:
        return True
    _, sep, tag = ref.rpartition(":")
    return bool(sep) and "/" not in tag and tag not in {"", "latest"}


def dockerfile_froms(path: Path) -> list[str]:
    return [line.split()[1] for line in path.read_text().splitlines() if line.upper().startswith("FROM ")]


def command_text(command: str | list[str]) -> str:
    return command if isinstance(command, str) else " ".join(command)


# --- every file parses ---------------------------------------------------------------------------------------


def test_every_yaml_and_json_file_under_infra_parses() -> None:
    yamls = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml")])
    assert {COMPOSE, MULTINODE} <= set(yamls)
    for path in yamls:
        documents = list(yaml.load_all(path.read_text(), Loader=Loader))
        assert documents and all(isinstance(doc, dict) for doc in documents), path
    for path in INFRA.rglob("*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


# --- docker compose ------------------------------------------------------------------------------------------


def test_compose_has_the_team_services(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == SERVICES


def test_gpu_worker_is_opt_in_and_reserves_gpus(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device.get("capabilities", []) for device in devices)
    assert gpu.get("shm_size"), "Docker's 64 MB /dev/shm starves DataLoader workers and NCCL"
    assert "--pool gpu-compose" in command_text(gpu["command"])
    # Everything else starts without the profile, and none of it may need the GPU worker to do so.
    for name, service in services.items():
        if name != "gpu-worker":
            assert "profiles" not in service, name
            assert "gpu-worker" not in service.get("depends_on", {}), name


def test_published_ports_bind_localhost(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                # HOST_IP:HOST_PORT:CONTAINER_PORT; without the IP Docker binds every interface.
                parts = str(port).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", (name, port)
    assert published >= 4  # MLflow, Prefect, MinIO API and console


def test_every_image_has_an_explicit_tag(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            assert pinned(service["image"]), (name, service["image"])
        if "build" in service:
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            dockerfile = (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve()
            assert dockerfile.is_file(), (name, dockerfile)
            froms = dockerfile_froms(dockerfile)
            assert froms and all(pinned(ref) for ref in froms), (name, froms)


def test_dependencies_exist_and_are_checkable(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and check["test"] != ["NONE"] and not check.get("disable"), (
                    f"{name} waits for {target}, which has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert "restart" not in services[target], f"{target} is a one-shot job, it must not restart"


def test_databases_and_buckets_are_wired(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    mounts = [volume.split(":") for volume in postgres["volumes"] if isinstance(volume, str)]
    init = [source for source, target, *_ in mounts if target.startswith("/docker-entrypoint-initdb.d")]
    assert len(init) == 1
    init_sql = (COMPOSE.parent / init[0]).read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+)", init_sql, flags=re.IGNORECASE))
    assert created >= {"mlflow", "prefect"}

    mlflow = command_text(services["mlflow"]["command"])
    backend = re.search(r"--backend-store-uri[= ](\S+)", mlflow)
    assert backend and backend.group(1).startswith("postgresql") and backend.group(1).endswith("@postgres:5432/mlflow")
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")

    make_buckets = command_text(services["minio-buckets"]["command"]).split("mc mb", 1)[1]
    buckets = {word.rsplit("/", 1)[1] for word in make_buckets.split() if "/" in word and not word.startswith("-")}
    assert buckets >= {"mlflow", "dvc"}
    destination = re.search(r"--(?:artifacts-destination|default-artifact-root)[= ]s3://([\w.-]+)", mlflow)
    assert destination and destination.group(1) in buckets
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_servers_match_the_project_client_versions(services: dict[str, dict[str, Any]]) -> None:
    # Prefect: newer clients can be refused by older servers; MLflow: the server writes the client's schema.
    pins = project_pins()
    assert services["prefect-server"]["image"].split(":")[1].startswith(f"{pins['prefect']}-")
    mlflow_build = services["mlflow"]["build"]
    mlflow_context = mlflow_build if isinstance(mlflow_build, str) else mlflow_build["context"]
    assert f"mlflow=={pins['mlflow']}" in (COMPOSE.parent / mlflow_context / "Dockerfile").read_text()


# --- training image ------------------------------------------------------------------------------------------


def test_training_dockerfile_pins_the_project_stack() -> None:
    text = (INFRA / "Dockerfile").read_text()
    froms = dockerfile_froms(INFRA / "Dockerfile")
    assert froms and all(pinned(ref) for ref in froms)
    assert "cuda" in froms[0] or "pytorch" in froms[0]
    pins = project_pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for package in ("torch", "torchvision"):
        assert re.search(rf"(?<![\w-]){package}=={re.escape(pins[package])}(?![\w.])", text), package
    assert '-c requirements.lock.txt ".[s3]"' in text  # the flows pull and push to the S3 remote
    assert re.search(r"^WORKDIR /workspace$", text, flags=re.MULTILINE)
    assert re.search(r"HF_HUB_OFFLINE=1", text)
    cmd = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert len(cmd) == 1 and "torchrun" in cmd[0] and "-m blip" in cmd[0]


def test_training_image_context_holds_what_it_copies() -> None:
    # The ignore file is an allowlist: a COPY of anything it does not re-include fails the build.
    allowed = {
        line[1:].strip("/")
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = []
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.strip("/").split("/")[0] in allowed, source


# --- Kubernetes ----------------------------------------------------------------------------------------------


def test_job_template_declares_every_placeholder(template: dict[str, Any]) -> None:
    assert set(template) == {"job_configuration", "variables"}
    used = set(PLACEHOLDER.findall(json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    # Prefect refuses a template using an undeclared variable; a declared, unused one is a knob that does nothing.
    assert used == declared, {"undeclared": used - declared, "unused": declared - used}
    assert {"image", "gpu_count", "shm_size", "namespace", "env", "service_account_name"} <= declared


def test_job_template_wires_gpus_and_shared_memory(template: dict[str, Any]) -> None:
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "{{ service_account_name }}"
    (container,) = pod["containers"]
    assert container["image"] == "{{ image }}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    (shm,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == shm["name"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}


def test_job_template_variables_are_a_valid_schema(template: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = template["variables"]
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    assert not list(validator.iter_errors({"image": "registry.example.com/blip-train:0.1.0", "gpu_count": 8}))
    assert list(validator.iter_errors({"gpu_count": 1}))  # no image: a Job without one cannot start
    assert list(validator.iter_errors({"image": "x:1", "gpu_count": "eight"}))
    for name, prop in schema["properties"].items():
        if "default" in prop:
            assert not list(validator.iter_errors({"image": "x:1", name: prop["default"]})), name


def test_multinode_job_rendezvous_is_consistent() -> None:
    documents = {doc["kind"]: doc for doc in yaml.load_all(MULTINODE.read_text(), Loader=Loader)}
    service, job = documents["Service"], documents["Job"]
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    nodes = job["spec"]["completions"]
    assert job["spec"]["parallelism"] == nodes

    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    line = " ".join([*container.get("command", []), *container.get("args", [])])
    line = re.sub(r"\$\{(\w+)\}", lambda match: env[match.group(1)], line)
    flags = dict(re.findall(r"--(\w+)=(\S+)", line))
    assert "torchrun" in line and "-m blip" in line
    assert int(flags["nnodes"]) == nodes
    assert int(flags["nproc_per_node"]) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert flags["rdzv_backend"] == "c10d"
    host, port = flags["rdzv_endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # the Indexed Job's pod 0
    assert int(port) in {entry["port"] for entry in service["spec"]["ports"]}

    (shm,) = [mount for mount in container["volumeMounts"] if mount["mountPath"] == "/dev/shm"]
    (volume,) = [volume for volume in pod["spec"]["volumes"] if volume["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_prefect_yaml_deployments_match_the_pools_and_the_flows(template: dict[str, Any]) -> None:
    """The nightly and fine-tune deployments target the Kubernetes GPU pool with variables its template declares;
    the CPU ones the process pool; every entrypoint exists (the e2e test deploys and runs `pipeline-cpu`)."""
    project = yaml.load((REPO / "prefect.yaml").read_text(), Loader=Loader)
    declared = set(template["variables"]["properties"])
    deployments = {d["name"]: d for d in project["deployments"]}
    assert set(deployments) == {"nightly", "pipeline-cpu", "finetune", "evaluate"}
    assert [s["cron"] for s in deployments["nightly"]["schedules"]] == ["0 2 * * *"]
    for name in ("nightly", "finetune"):
        pool = deployments[name]["work_pool"]
        assert pool["name"] == "gpu" and {"image", "gpu_count", "shm_size"} <= set(pool["job_variables"]) <= declared
    for name in ("pipeline-cpu", "evaluate"):
        assert deployments[name]["work_pool"] == {"name": "cpu"} and "schedules" not in deployments[name]
    for deployment in deployments.values():
        path, flow = deployment["entrypoint"].split(":")
        assert f"def {flow}(" in (REPO / path).read_text()


def test_prefect_yaml_working_directory_is_resolved_on_the_worker(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """`prefect deploy` fills `{{ $VAR }}` placeholders in from the deploying shell: the pull steps must come through
    it unchanged, then take the folder from the worker's BLIP_PROJECT_DIR when a run starts (the GPU deployments'
    jobs set it to the training image's WORKDIR), and fail clearly where it is unset."""
    from prefect.deployments.steps import run_shell_script
    from prefect.utilities.templating import apply_values

    project = yaml.load((REPO / "prefect.yaml").read_text(), Loader=Loader)
    pull = project["pull"]
    monkeypatch.setenv("BLIP_PROJECT_DIR", "/the/deploying/shell")
    assert apply_values(pull, dict(os.environ), remove_notset=False) == pull  # what `prefect deploy` does

    # What the worker's run does (prefect.deployments.steps.core.run_steps): each step's output under its id.
    (script,), (chdir,) = pull[0].values(), pull[1].values()
    step_id, inputs = script["id"], {key: value for key, value in script.items() if key != "id"}
    monkeypatch.setenv("BLIP_PROJECT_DIR", str(tmp_path))
    outputs = asyncio.run(run_shell_script(**inputs))
    assert apply_values(chdir, {step_id: outputs}) == {"directory": str(tmp_path)}
    monkeypatch.delenv("BLIP_PROJECT_DIR")
    with pytest.raises(RuntimeError, match="BLIP_PROJECT_DIR: the worker must set it"):
        asyncio.run(run_shell_script(**inputs))

    workdir = re.search(r"^WORKDIR (\S+)$", (INFRA / "Dockerfile").read_text(), re.MULTILINE).group(1)
    for deployment in project["deployments"]:
        if deployment["work_pool"]["name"] == "gpu":
            assert deployment["work_pool"]["job_variables"]["env"]["BLIP_PROJECT_DIR"] == workdir

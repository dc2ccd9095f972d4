"""The Dockerfile, the compose file and the Helm values agree with the project and with each other.

No Docker engine is needed: the Dockerfile's instructions are read and checked against the project
layout and the installed package, the instance files are validated by Dagster itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from qa_pipeline_tests.conftest import REPO

DEPLOY = REPO / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
POSTGRES_ENV = {
    "DAGSTER_POSTGRES_HOST": "db.internal",
    "DAGSTER_POSTGRES_PORT": "5432",
    "DAGSTER_POSTGRES_USER": "dagster",
    "DAGSTER_POSTGRES_PASSWORD": "secret",
    "DAGSTER_POSTGRES_DB": "dagster",
}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the repository's Dockerfile, continuation lines joined."""
    instructions, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.strip().partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for keyword, arguments in dockerfile() if keyword == name]


def image_env() -> dict[str, str]:
    env = {}
    for arguments in instruction("ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def image_cmd() -> list[str]:
    (cmd,) = instruction("CMD")
    return yaml.safe_load(cmd)  # the exec form is a JSON array


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def resolve(value: str) -> str:
    """A compose value with `${VAR:-default}` / `${VAR:?error}` read as it is without a .env file."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?(?::?\?[^}]*)?\}", lambda m: m.group(1) or "", value)


def compose() -> dict:
    return load_yaml(DEPLOY / "docker-compose.yaml")


def dagster_version() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("dagster==")]
    return pin.split("==")[1]


def dagster_postgres_version() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("dagster-postgres==")]
    return pin.split("==")[1]


# -- the Dockerfile against the project -------------------------------------------------------------


def test_dockerfile_copies_only_files_that_exist_in_the_repository():
    copies = instruction("COPY")
    assert copies
    for arguments in copies:
        parts = [p for p in shlex.split(arguments) if not p.startswith("--")]
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"Dockerfile: COPY {source} but {REPO / source} does not exist"
    copied = {source for a in copies for source in shlex.split(a)[:-1]}
    assert {"pyproject.toml", "qa_pipeline"} <= copied
    # pyproject names README.md as the package's readme: the build needs it.
    assert PYPROJECT["project"]["readme"] in copied


def test_base_image_python_satisfies_requires_python():
    (base,) = instruction("FROM")
    version = re.fullmatch(r"python:(\d+\.\d+)(?:[.-].*)?", base)
    assert version, f"base image {base!r} is not an official python image"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{version.group(1)}.0")


def test_image_runs_as_a_non_root_user_that_owns_the_data_and_dagster_home():
    keywords = [keyword for keyword, _ in dockerfile()]
    users = instruction("USER")
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    user = users[-1]
    # Everything installed before the switch; nothing after it runs as root.
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")
    created = " ".join(instruction("RUN"))
    assert re.search(rf"useradd\b[^&]*--uid \d+ {user}\b", created), f"no useradd for {user}"
    env = image_env()
    for folder in (env["QA_PIPELINE_DATA_DIR"], env["DAGSTER_HOME"]):
        assert re.search(rf"chown -R {user}\b[^&]*{re.escape(folder)}", created), f"{folder} is not {user}'s"


def image_uid() -> int:
    return int(re.search(r"useradd\b[^&]*--uid (\d+)", " ".join(instruction("RUN"))).group(1))


def test_image_installs_the_project_with_the_entry_points_of_pyproject():
    assert any(re.search(r"pip install\b.*-e \.", run) for run in instruction("RUN"))
    # This environment is installed the same way (pip install -e .): what the image gets.
    distribution = importlib.metadata.distribution("qa_pipeline")
    installed = {ep.name: ep.value for ep in distribution.entry_points if ep.group == "console_scripts"}
    assert installed == PYPROJECT["project"]["scripts"]
    for ep in distribution.entry_points:
        assert callable(ep.load()), f"entry point {ep.name} = {ep.value} does not load"


def test_image_installs_the_run_launchers_of_the_deploy_files_at_the_pinned_release():
    installs = " ".join(instruction("ARG") + instruction("RUN"))
    for package in ("dagster-docker", "dagster-k8s"):
        assert f"{package}=={dagster_postgres_version()}" in installs, f"the image lacks {package}"


def test_image_serves_the_code_location_on_its_exposed_port():
    cmd = image_cmd()
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert option(cmd, "-h") == "0.0.0.0"
    assert instruction("EXPOSE") == [option(cmd, "-p")]
    module = option(cmd, "-m")
    assert importlib.util.find_spec(module) is not None, f"CMD loads {module}, which does not exist"
    workspace = load_yaml(REPO / "workspace.yaml")["load_from"][0]["python_module"]
    assert workspace["module_name"] == module


# -- the instance files ------------------------------------------------------------------------------


def instance_config(path: Path, tmp_path: Path, monkeypatch) -> dict:
    """The file validated by Dagster as the dagster.yaml of an instance."""
    from dagster._core.instance.config import dagster_instance_config

    for name, value in POSTGRES_ENV.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / path.parent.name
    home.mkdir()
    (home / "dagster.yaml").write_text(path.read_text())
    config, _ = dagster_instance_config(str(home))
    return config


def test_one_server_instance_is_valid_and_uses_postgres_and_the_run_queue(tmp_path, monkeypatch):
    config = instance_config(DEPLOY / "dagster.yaml", tmp_path, monkeypatch)

    postgres = config["storage"]["postgres"]["postgres_db"]
    assert {field: postgres[field] for field in ("hostname", "port", "username", "password", "db_name")} == {
        "hostname": {"env": "DAGSTER_POSTGRES_HOST"},
        "port": {"env": "DAGSTER_POSTGRES_PORT"},
        "username": {"env": "DAGSTER_POSTGRES_USER"},
        "password": {"env": "DAGSTER_POSTGRES_PASSWORD"},
        "db_name": {"env": "DAGSTER_POSTGRES_DB"},
    }
    assert postgres["scheme"] == "postgresql+psycopg2"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    runs, pools = config["concurrency"]["runs"], config["concurrency"]["pools"]
    assert runs["max_concurrent_runs"] >= 4
    assert all(limit["limit"] < runs["max_concurrent_runs"] for limit in runs["tag_concurrency_limits"])
    assert pools["default_limit"] >= 1 and pools["granularity"] == "op"
    assert "run_launcher" not in config  # processes started by the code server


def test_the_llm_pool_of_the_deploy_files_is_the_pool_of_the_assets():
    from qa_pipeline.defs.assets import concurrency_benchmark, qa_pairs

    assert qa_pairs.node_def.pool == concurrency_benchmark.node_def.pool == "llm_server"
    # The deploy files and README tell how to size that pool by its name.
    for path in (DEPLOY / "dagster.yaml", DEPLOY / "README.md"):
        assert "concurrency set llm_server" in path.read_text()


def test_docker_instance_is_the_one_server_instance_plus_the_docker_run_launcher(tmp_path, monkeypatch):
    one_server = load_yaml(DEPLOY / "dagster.yaml")
    docker = load_yaml(DEPLOY / "docker" / "dagster.yaml")
    launcher = docker.pop("run_launcher")
    assert docker == one_server, "deploy/docker/dagster.yaml drifted from deploy/dagster.yaml"
    assert (launcher["module"], launcher["class"]) == ("dagster_docker", "DockerRunLauncher")
    instance_config(DEPLOY / "docker" / "dagster.yaml", tmp_path, monkeypatch)


@pytest.mark.parametrize("name", ["dagster.yaml", "docker/dagster.yaml", "dagster-dev.yaml"])
def test_instances_retry_only_runs_whose_worker_died_not_runs_that_failed_in_their_code(name, tmp_path, monkeypatch):
    # A document over its failure threshold, a STALLED server or a failed blocking check fails its
    # step; a retry would fail the same way (qa_pipeline_tests/test_run_retries.py runs the daemon).
    retries = instance_config(DEPLOY / name, tmp_path, monkeypatch).get("run_retries", {})
    if retries.get("enabled"):
        assert retries["retry_on_asset_or_op_failure"] is False
        assert retries["max_retries"] >= 1


# -- compose --------------------------------------------------------------------------------------


def test_compose_runs_every_dagster_service_from_the_repository_image():
    services = compose()["services"]
    image = resolve(services["code"]["image"])
    for name in ("code", "webserver", "daemon"):
        service = services[name]
        assert resolve(service["image"]) == image
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == (
            REPO / "Dockerfile"
        )
    # Runs are launched in the code location's own image.
    assert resolve(services["code"]["environment"]["DAGSTER_CURRENT_IMAGE"]) == image
    assert resolve(services["code"]["build"]["context"]) == ".."


def test_compose_wires_the_code_server_port_instance_and_workspace_consistently():
    services = compose()["services"]
    port = option(image_cmd(), "-p")
    assert services["code"]["expose"] == [port]
    assert services["code"]["healthcheck"]["test"][-2:] == ["-p", port]
    home = image_env()["DAGSTER_HOME"]
    for name in ("webserver", "daemon"):
        service = services[name]
        workspace_path = option(service["command"], "-w")
        mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in service["volumes"] if volume.endswith(":ro"))
        assert mounts["./docker/dagster.yaml"] == f"{home}/dagster.yaml"
        assert mounts["./docker/workspace.yaml"] == workspace_path
        assert "/var/run/docker.sock:/var/run/docker.sock" in service["volumes"]
    workspace = load_yaml(DEPLOY / "docker" / "workspace.yaml")["load_from"][0]["grpc_server"]
    assert workspace["host"] in services and str(workspace["port"]) == port
    assert services["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    assert option(services["webserver"]["command"], "-p") == "3000"


def test_compose_gives_run_containers_the_network_volumes_and_variables_the_launcher_expects():
    spec = compose()
    services = spec["services"]
    launcher = load_yaml(DEPLOY / "docker" / "dagster.yaml")["run_launcher"]["config"]
    daemon_env = services["daemon"]["environment"]
    for name in launcher["env_vars"]:
        assert name in daemon_env, f"the run launcher passes {name}, which the daemon does not have"
    assert launcher["network"] == spec["networks"]["qa_pipeline"]["name"]
    named = {volume["name"]: key for key, volume in spec["volumes"].items() if volume and "name" in volume}
    data_dir = image_env()["QA_PIPELINE_DATA_DIR"]
    for mount in launcher["container_kwargs"]["volumes"]:
        volume, target = mount.split(":")[:2]
        assert volume in named, f"run containers mount {volume}, which compose does not create by that name"
        if target == data_dir:
            assert f"{named[volume]}:{data_dir}" in services["code"]["volumes"]
    assert resolve(daemon_env["QA_PIPELINE_DATA_DIR"]) == data_dir
    # The instance reads these; every Dagster service has them.
    for name in ("code", "webserver", "daemon"):
        assert set(POSTGRES_ENV) <= set(services[name]["environment"])
    assert resolve(daemon_env["DAGSTER_POSTGRES_HOST"]) in services


def test_compose_points_the_pipeline_at_the_vllm_services():
    services = compose()["services"]
    urls = resolve(services["daemon"]["environment"]["QA_PIPELINE_LLM_BASE_URL"]).split(",")
    assert len(urls) >= 2
    for url in urls:
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)/v1", url).groups()
        assert host in services and option(services[host]["command"], "--port") == port
        assert services[host]["profiles"] == ["gpu"]


# -- Helm -------------------------------------------------------------------------------------------


def helm() -> dict:
    return load_yaml(DEPLOY / "helm" / "values.yaml")


def test_helm_values_run_the_image_as_its_non_root_user_with_the_code_location_of_the_image():
    (deployment,) = helm()["dagster-user-deployments"]["deployments"]
    cmd = image_cmd()
    assert deployment["codeServerArgs"] == ["-m", option(cmd, "-m")]
    assert str(deployment["port"]) == option(cmd, "-p")
    assert deployment["securityContext"]["runAsUser"] == image_uid()
    assert deployment["securityContext"]["runAsNonRoot"] is True
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["QA_PIPELINE_DATA_DIR"] == image_env()["QA_PIPELINE_DATA_DIR"]
    assert {m["mountPath"] for m in deployment["volumeMounts"]} == {env["QA_PIPELINE_DATA_DIR"]}
    assert len(env["QA_PIPELINE_LLM_BASE_URL"].split(",")) == helm()["concurrency"]["pools"]["defaultLimit"]


def test_helm_values_use_the_k8s_launcher_the_queue_and_the_instance_settings_of_deploy():
    values = helm()
    one_server = load_yaml(DEPLOY / "dagster.yaml")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    # Limits live under `concurrency`, as in dagster.yaml: the chart would otherwise write both.
    assert "maxConcurrentRuns" not in values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"]["granularity"] == one_server["concurrency"]["pools"]["granularity"]
    tag_keys = {limit["key"] for limit in values["concurrency"]["runs"]["tagConcurrencyLimits"]}
    assert tag_keys == {limit["key"] for limit in one_server["concurrency"]["runs"]["tag_concurrency_limits"]}
    scheme = one_server["storage"]["postgres"]["postgres_db"]["scheme"]
    assert values["postgresql"]["postgresqlScheme"] == scheme
    assert values["telemetry"]["enabled"] is one_server["telemetry"]["enabled"]
    retries = values["dagsterDaemon"]["runRetries"]
    assert (retries["enabled"], retries["maxRetries"], retries["retryOnAssetOrOpFailure"]) == (
        one_server["run_retries"]["enabled"],
        one_server["run_retries"]["max_retries"],
        one_server["run_retries"]["retry_on_asset_or_op_failure"],
    )
    assert f"--version {dagster_version()}" in (DEPLOY / "helm" / "values.yaml").read_text()


@pytest.mark.parametrize("level", ["Laptop", "One server", "Cluster"])
def test_deploy_readme_explains_each_level(level):
    assert f"## {level}" in (DEPLOY / "README.md").read_text()

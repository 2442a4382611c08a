"""The Docker files, checked without a Docker engine: what compose declares, what the images
run, and that the image installs with the README's own install script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from s2s.pipeline.pipeline import Pipeline
from s2s.server.app import S2SServer, ServerConfig
from s2s.server.cli import build_parser, env_var
from tests.docker_engine import (
    base_image,
    docker,
    local_simple_roots,
    local_wheel,
    pip_build_args,
    start_engine,
    torch_index,
    wait_healthy,
)
from tests.processes import free_port, start_client

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
LIBRARY_VARIABLES = {"HF_HOME"}
"""Variables read by a library rather than by s2s (huggingface_hub's cache location)."""


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def console_scripts() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["scripts"])


def help_text(script: str) -> str:
    done = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_runs_an_existing_command(command: list[str]) -> None:
    script, *args = command
    assert script in console_scripts()
    known = set(re.findall(r"--[a-z0-9-]+", help_text(script)))
    options = [arg for arg in args if arg.startswith("--")]
    assert options and set(options) <= known, f"unknown options: {set(options) - known}"


def dockerfile_cmd(name: str) -> list[str]:
    lines = (DOCKER / name).read_text().splitlines()
    [line] = [text for text in lines if text.startswith("CMD ")]
    command: list[str] = yaml.safe_load(line.removeprefix("CMD "))
    return command


def test_gpu_service_declares_gpu_port_volume_health_and_restart() -> None:
    """The default service reserves NVIDIA GPUs and has the port, cache volume, /healthz check
    and a restart policy."""
    service = compose()["services"]["s2s"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert any(str(port).endswith(":8765") for port in service["ports"])
    volume, mount = service["volumes"][0].split(":")
    assert volume in compose()["volumes"] and mount == "/home/s2s/.cache"
    assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "s2s.server.healthcheck"]
    assert service["restart"] == "unless-stopped"
    assert service["environment"]["HF_HOME"].startswith(mount)


def test_cpu_variant_is_a_profile_of_its_own() -> None:
    """`docker compose up` starts only the GPU service; the CPU one needs --profile cpu."""
    services = compose()["services"]
    assert "profiles" not in services["s2s"]
    assert services["s2s-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["s2s-cpu"]


@pytest.mark.parametrize("service", ["s2s", "s2s-cpu"])
def test_every_setting_is_one_the_server_reads(service: str) -> None:
    """Each S2S_ variable names a server option; anything else is a known library variable."""
    options = {
        action.option_strings[0][2:] for action in build_parser()._actions if action.option_strings
    }
    read_by_server = {env_var(option) for option in options}
    environment = set(compose()["services"][service]["environment"])
    assert environment - read_by_server <= LIBRARY_VARIABLES
    assert {"S2S_TOKEN", "S2S_MAX_SESSIONS", "S2S_LLM_MODEL"} <= environment


@pytest.mark.parametrize("service", ["s2s", "s2s-cpu"])
def test_compose_commands_are_console_scripts_with_real_options(service: str) -> None:
    assert_runs_an_existing_command(compose()["services"][service]["command"])


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_image_command_is_the_server_configured_by_server_options(dockerfile: str) -> None:
    """The image runs s2s-server; its S2S_* settings are options the server reads."""
    assert dockerfile_cmd(dockerfile) == ["s2s-server"]
    options = {
        action.option_strings[0][2:] for action in build_parser()._actions if action.option_strings
    }
    text = (DOCKER / dockerfile).read_text()
    not_server = {"S2S_VENV", "S2S_TORCH_INDEX_URL"}  # read by .ci/install.sh
    settings = set(re.findall(r"\b(S2S_[A-Z_]+)=", text)) - not_server
    assert {"S2S_HOST", "S2S_DEVICE"} <= settings
    assert settings <= {env_var(option) for option in options}


def test_health_check_module_answers_for_a_live_ready_server_only() -> None:
    """`python -m s2s.server.healthcheck` (the images' and compose's check) exits 1 when
    nothing listens on S2S_PORT, 1 while the server still loads its models (/readyz 503),
    and 0 once it is ready."""
    check = [sys.executable, "-m", "s2s.server.healthcheck"]
    env = {**os.environ, "S2S_PORT": str(free_port())}
    assert subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 1
    server = S2SServer(ServerConfig(port=0), build_pipeline=_no_sessions, models_info=None)
    server.start()
    serving = threading.Thread(target=server.serve_forever, name="health-server")
    serving.start()
    try:
        env["S2S_PORT"] = str(server.port)
        loading = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert loading.returncode == 1 and "/readyz" in loading.stderr
        server.mark_ready({"device": "cpu"})
        done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    finally:
        assert server.shutdown(2.0) == []
        serving.join(5.0)


def _no_sessions(**_: object) -> Pipeline:
    raise AssertionError("the health check opened a session")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_with_the_readme_script_and_run_unprivileged(dockerfile: str) -> None:
    """The build stage installs with .ci/install.sh (dependencies, then the code, so a code
    change keeps the dependency layer), the image copies the package, and runs as a user."""
    text = (DOCKER / dockerfile).read_text()
    readme_install = (ROOT / "README.md").read_text().split("```bash")[1].splitlines()[1]
    assert readme_install.startswith("bash .ci/install.sh")
    assert "bash .ci/install.sh --deps-only" in text
    assert text.index("--deps-only") < text.index("COPY s2s/ s2s/")
    assert re.search(r"^USER s2s$", text, re.MULTILINE)
    assert re.search(
        r"HEALTHCHECK .*\n\s+CMD \[\"python\", \"-m\", \"s2s.server.healthcheck\"\]", text
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_cache_volume_is_created_and_owned_by_s2s_before_volume(dockerfile: str) -> None:
    """A fresh named volume copies the ownership of the directory it mounts over: the image
    must create /home/s2s/.cache as s2s before VOLUME, in the stage the image is built from."""
    text = (DOCKER / dockerfile).read_text()
    final_stage_base = re.findall(r"^FROM (\S+)\s*$", text, re.MULTILINE)[-1]
    stage_text = text[text.index(f"AS {final_stage_base}") :]
    made = re.search(r"mkdir -p /home/s2s/\.cache\S*", stage_text)
    owned = re.search(r"chown (-R )?s2s:s2s /home/s2s/\.cache\b", stage_text)
    assert made and owned, "the cache directory is not created and chowned to s2s"
    volume_line = re.search(r"^VOLUME ", stage_text, re.MULTILINE)
    assert volume_line and stage_text.index(owned.group(0)) < volume_line.start()
    assert text.index("\nUSER s2s") < text.index("\nVOLUME ")


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_pip_settings_stay_in_the_build_stage(dockerfile: str) -> None:
    """PIP_* build arguments are declared only in the build stage; the image copies the
    environment from it and declares none of them."""
    text = (DOCKER / dockerfile).read_text()
    final = text[text.rindex("\nFROM ") :]
    build = text[text.index(" AS build") : text.rindex("\nFROM ")]
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CERT_PEM"):
        assert f"ARG {arg}" in build
        assert arg not in final
    assert "COPY --from=build /opt/s2s/venv" in final


def test_dockerignore_keeps_the_context_small() -> None:
    """The context leaves out the environment, git and caches (the venv alone is 2.5 GB)."""
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv/", ".git/", "**/__pycache__/", ".mypy_cache/", "out/"):
        assert entry in ignored


@pytest.fixture(scope="module")
def engine() -> None:
    reason = start_engine()
    if reason is not None:
        pytest.skip(reason)


def build_cpu_image(tag: str) -> None:
    """Build Dockerfile.cpu the way a user behind a mirror would: pip's settings as build
    arguments, the CPU torch from a local index, the build on the host's network only."""
    torch_wheel = local_wheel("torch")
    assert torch_wheel is not None, "no local torch wheel in pip's find-links"
    with torch_index(torch_wheel, local_simple_roots()) as index_url:
        build = subprocess.run(
            [
                "docker",
                "build",
                "--network",
                "host",
                "-f",
                str(DOCKER / "Dockerfile.cpu"),
                "--build-arg",
                f"BASE_IMAGE={base_image()}",
                "--build-arg",
                f"TORCH_INDEX_URL={index_url}",
                *pip_build_args(),
                "-t",
                tag,
                str(ROOT),
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]


@pytest.mark.usefixtures("engine")
def test_cpu_image_starts_on_a_fresh_volume_serves_a_turn_stops_and_restarts(
    question_wav: Path,
) -> None:
    """Build the CPU image, run it as compose does (a fresh named volume on the cache), wait
    for healthy, hold a spoken turn from the host, stop it cleanly, restart from the volume."""
    tag = "s2s:cpu-test"
    began = time.monotonic()
    build_cpu_image(tag)
    print(f"image built in {time.monotonic() - began:.0f} s")
    assert docker("image", "inspect", "--format", "{{.Config.User}}", tag) == "s2s"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag)
    assert "PIP_CERT" not in history and "PIP_INDEX_URL" not in history
    suffix = f"{os.getpid()}-{int(time.time())}"
    volume, name, port = f"s2s-test-cache-{suffix}", f"s2s-test-{suffix}", free_port()
    docker("volume", "create", volume)
    try:
        docker(
            "run", "-d", "--name", name, "--network", "host",
            "-v", f"{volume}:/home/s2s/.cache",
            "-e", "S2S_HOST=127.0.0.1", "-e", f"S2S_PORT={port}", tag,
        )  # fmt: skip
        print(f"first start healthy after {wait_healthy(name, 300):.1f} s")
        client = start_client(f"ws://127.0.0.1:{port}", "--file", str(question_wav))
        assert client.proc.wait(timeout=120) == 0, client.stderr()
        [turn] = [e for e in client.events() if e["type"] == "turn"]
        assert turn["assistant_text"], turn
        print(f"turn answered: {turn['user_text']!r} -> {turn['assistant_text']!r}")
        stopping = time.monotonic()
        docker("stop", "-t", "10", name)
        print(f"docker stop took {time.monotonic() - stopping:.2f} s")
        assert docker("inspect", "--format", "{{.State.ExitCode}}", name) == "0"
        docker("start", name)
        print(f"restart healthy after {wait_healthy(name, 120):.1f} s")
        cached = docker("exec", name, "ls", "/home/s2s/.cache/s2s")
        assert cached, "the converted LLM was not kept in the volume"
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)

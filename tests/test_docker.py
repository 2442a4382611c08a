"""The Docker files, checked without a Docker engine: what compose declares, what the images
run, and that the image installs with the README's own install script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from s2s.server.cli import build_parser, env_var
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
    assert "/healthz" in " ".join(service["healthcheck"]["test"])
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
def test_image_commands_are_console_scripts_with_real_options(dockerfile: str) -> None:
    assert_runs_an_existing_command(dockerfile_cmd(dockerfile))


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_install_with_the_readme_script_and_run_unprivileged(dockerfile: str) -> None:
    """The image's install steps are .ci/install.sh (dependencies, then the code, so a code
    change keeps the dependency layer), it copies every package, and it runs as a user."""
    text = (DOCKER / dockerfile).read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN bash .ci/install.sh")]
    assert [r.split()[3] for r in runs] == ["--deps-only", "--project-only"]
    readme_install = (ROOT / "README.md").read_text().split("```bash")[1].splitlines()[1]
    assert readme_install.startswith("bash .ci/install.sh")
    assert "COPY s2s/ s2s/" in text
    assert text.index("--deps-only") < text.index("COPY s2s/")
    assert re.search(r"^USER s2s$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text and "/healthz" in text


def docker_engine() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "no docker client"
    if info.returncode != 0:
        return "no Docker engine is running"
    return None


@pytest.mark.skipif(docker_engine() is not None, reason=f"{docker_engine()}: image not built")
def test_cpu_image_builds_and_serves_a_turn(question_wav: Path, tmp_path: Path) -> None:
    """Build the CPU image (BASE_IMAGE from S2S_DOCKER_BASE_IMAGE, for registries of your
    own), run it, and hold a real turn against it with the client."""
    base = os.environ.get("S2S_DOCKER_BASE_IMAGE", "python:3.11-slim-bookworm")
    have_base = subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode
    if have_base != 0 and subprocess.run(["docker", "pull", base], capture_output=True).returncode:
        pytest.skip(f"base image {base} is neither local nor pullable")
    tag = "s2s:cpu-test"
    build = subprocess.run(
        [
            "docker",
            "build",
            "-f",
            str(DOCKER / "Dockerfile.cpu"),
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            tag,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    port = free_port()
    container = subprocess.run(
        ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8765", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the container never became healthy"
                time.sleep(2)
        client = start_client(f"ws://127.0.0.1:{port}", "--file", str(question_wav))
        assert client.proc.wait(timeout=120) == 0, client.stderr()
        assert any(e["type"] == "turn" for e in client.events())
    finally:
        subprocess.run(["docker", "stop", "-t", "2", container], capture_output=True)

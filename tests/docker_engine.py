"""A Docker engine for the image test: started if none runs, a base image made with debootstrap
when the public one cannot be pulled, and this machine's pip settings served to the build.

Everything here is what a user behind a mirror would do by hand; the test only automates it.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PUBLIC_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "local/debian:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
ENGINE_START_BOUND_S = 60.0
PULL_BOUND_S = 60.0
INDEX_PORT = 18765
"""The local index's port when free: the build's cache keys include TORCH_INDEX_URL, so a
stable URL lets a later run reuse the dependency layer."""
DEBOOTSTRAP_BOUND_S = 600.0


def docker(*args: str, timeout_s: float = 120.0, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return done.stdout.strip()


def engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_engine() -> str | None:
    """Start dockerd if none answers. Returns why no engine can run, or None when one does.

    The daemon is left running (its image cache is what makes the next run fast)."""
    if shutil.which("docker") is None:
        return "no docker client installed"
    if engine_answers():
        return None
    if shutil.which("dockerd") is None:
        return "no Docker engine running and no dockerd installed (install docker.io)"
    if os.geteuid() != 0:
        return "no Docker engine running, and starting dockerd needs root"
    log = open(Path(tempfile.gettempdir()) / "s2s-test-dockerd.log", "ab")  # noqa: SIM115
    # A session of its own: the daemon outlives this test run on purpose.
    subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + ENGINE_START_BOUND_S
    while time.monotonic() < deadline:
        if engine_answers():
            return None
        time.sleep(1)
    return f"dockerd did not answer within {ENGINE_START_BOUND_S:g} s (see {log.name})"


def base_image() -> str:
    """The public base if it is here or can be pulled, else a Debian bookworm root made with
    debootstrap and imported (kept for later runs)."""
    for image in (PUBLIC_BASE, LOCAL_BASE):
        if docker("image", "inspect", "--format", "{{.Id}}", image, check=False).startswith("sha"):
            return image
    pulled = subprocess.run(
        ["docker", "pull", PUBLIC_BASE], capture_output=True, timeout=PULL_BOUND_S, check=False
    )
    if pulled.returncode == 0:
        return PUBLIC_BASE
    if shutil.which("debootstrap") is None:
        raise RuntimeError(f"{PUBLIC_BASE} cannot be pulled and debootstrap is not installed")
    with tempfile.TemporaryDirectory(prefix="s2s-rootfs-") as rootfs:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR],
            capture_output=True,
            timeout=DEBOOTSTRAP_BOUND_S,
            check=True,
        )
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-", LOCAL_BASE], stdin=tar.stdout, capture_output=True, check=True
        )
        tar.wait()
    return LOCAL_BASE


def pip_setting(name: str) -> str:
    done = subprocess.run(
        ["pip", "config", "get", f"global.{name}"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""


def pip_build_args() -> list[str]:
    """This machine's pip settings as the images' build arguments (file:// indexes cannot be
    reached from a build, so only http(s) ones pass)."""
    args: list[str] = []
    for setting, arg in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
    ):
        urls = [u for u in pip_setting(setting).split() if u.startswith(("http://", "https://"))]
        if urls:
            args += ["--build-arg", f"{arg}={' '.join(urls)}"]
    extra = extra_certificates()
    if extra:
        args += ["--build-arg", f"PIP_CERT_PEM={extra}"]
    return args


def extra_certificates() -> str:
    """The certificates in pip's configured CA bundle that the public bundle lacks (a company
    or sandbox proxy's CA): what a user behind such a proxy passes as PIP_CERT_PEM."""
    cert = pip_setting("cert") or os.environ.get("PIP_CERT", "")
    if not cert or not Path(cert).is_file():
        return ""
    import certifi

    public = set(_pem_blocks(Path(certifi.where()).read_text()))
    return "\n".join(b for b in _pem_blocks(Path(cert).read_text()) if b not in public)


def _pem_blocks(text: str) -> list[str]:
    end = "-----END CERTIFICATE-----"
    return [
        block[block.index("-----BEGIN") :].strip() + "\n" + end
        for block in text.split(end)
        if "-----BEGIN CERTIFICATE-----" in block
    ]


def local_wheel(name: str) -> Path | None:
    """A wheel of this machine's local find-links folders (where the CPU torch lies)."""
    for folder in pip_setting("find-links").split():
        for wheel in sorted(Path(folder.removeprefix("file://")).glob(f"{name}-*.whl")):
            return wheel
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def torch_index(torch_wheel: Path, simple_roots: list[Path]) -> Iterator[str]:
    """A PEP 503 index on loopback: the local torch wheel, and the local simple indexes that
    hold its dependencies. Yields the index URL for the build's TORCH_INDEX_URL."""
    with tempfile.TemporaryDirectory(prefix="s2s-index-") as served:
        root = Path(served)
        (root / "simple").mkdir()
        (root / "files").mkdir()
        for simple in simple_roots:
            for project in simple.iterdir():
                link = root / "simple" / project.name
                if not link.exists():
                    link.symlink_to(project)
            for file in (simple.parent / "files").glob("*"):
                link = root / "files" / file.name
                if not link.exists():
                    link.symlink_to(file)
        (root / "files" / torch_wheel.name).symlink_to(torch_wheel)
        torch_page = root / "simple" / "torch"
        if torch_page.is_symlink():
            torch_page.unlink()
        torch_page.mkdir(exist_ok=True)
        href = "../../files/" + torch_wheel.name.replace("+", "%2B")
        (torch_page / "index.html").write_text(f'<a href="{href}">{torch_wheel.name}</a>\n')
        handler = functools.partial(_QuietHandler, directory=served)
        try:
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", INDEX_PORT), handler)
        except OSError:
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=httpd.serve_forever, name="torch-index")
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/simple"
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(5)


def local_simple_roots() -> list[Path]:
    roots = []
    for url in pip_setting("extra-index-url").split():
        if url.startswith("file://") and Path(url.removeprefix("file://")).is_dir():
            roots.append(Path(url.removeprefix("file://")))
    return roots


def health(container: str) -> str:
    return docker("inspect", "--format", "{{.State.Health.Status}}", container, check=False)


def wait_healthy(container: str, bound_s: float) -> float:
    """Seconds until the container's health check passed; raises if it never did."""
    began = time.monotonic()
    while time.monotonic() - began < bound_s:
        status = health(container)
        if status == "healthy":
            return time.monotonic() - began
        running = docker("inspect", "--format", "{{.State.Running}}", container, check=False)
        if running != "true":
            logs = docker("logs", "--tail", "40", container, check=False)
            raise AssertionError(f"the container stopped before it was healthy:\n{logs}")
        time.sleep(1)
    logs = docker("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"not healthy within {bound_s:g} s:\n{logs}")

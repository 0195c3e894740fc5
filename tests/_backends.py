"""Which backends the tests run, listed once.

``cpu_backends()``: the available backends that run on CPU tensors here (the triton
backend too when tests/conftest.py has switched on Triton's interpreter);
``cuda_backends()``: those built for CUDA tensors (the tests that use them are marked
``gpu`` and skip without a GPU, so the list does not depend on one being present).
"""
from __future__ import annotations

from typing import List

import torch

import arcface_kernels as ak
from arcface_kernels.backends import resolve_backend


def runs_on(name: str, device: str) -> bool:
    """Whether backend ``name`` is available and runs on ``device`` tensors."""
    try:
        resolve_backend(name, torch.device(device))
    except (ValueError, RuntimeError):
        return False
    return True


def cpu_backends() -> List[str]:
    return [name for name in ak.available_backends() if runs_on(name, "cpu")]


def cuda_backends() -> List[str]:
    return [name for name in ak.available_backends() if runs_on(name, "cuda")]


__all__ = ["runs_on", "cpu_backends", "cuda_backends"]

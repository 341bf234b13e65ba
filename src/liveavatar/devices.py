"""Device helpers shared by models, engines and training.

``torch.autocast`` knows ``cuda``, ``cpu``, ``xpu``, ``mps``...; it has no ``meta`` backend, and the meta device is
this project's stand-in for a GPU in tests (PyTorch refuses to mix CPU and meta tensors as it refuses CPU and
CUDA). Every autocast goes through :func:`autocast_type`, which maps a device to the autocast backend to use.
"""
from __future__ import annotations

import contextlib

import torch

_AUTOCAST_BACKENDS = ("cuda", "cpu", "xpu", "mps", "hpu", "xla")


def autocast_type(device: torch.device | str) -> str:
    """The ``device_type`` to give ``torch.autocast`` for tensors on ``device`` (``cpu`` for backends autocast
    does not know, such as ``meta``)."""
    kind = torch.device(device).type
    return kind if kind in _AUTOCAST_BACKENDS else "cpu"


def autocast_disabled(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region computed in the tensors' own dtypes whatever autocast the caller runs under."""
    return torch.autocast(device_type=autocast_type(device), enabled=False)

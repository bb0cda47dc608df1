"""Which torch device training and inference run on (`--device`).

`auto` takes the first CUDA GPU when torch sees one, else the CPU, so a machine with a
GPU uses it without a flag and the demo on a laptop stays on the CPU. Everything else
in `retrieval` follows the device of the model it is handed: inputs built on the CPU
(decoded pixels, token ids, row indexes) move to it where they meet its weights, and
whatever leaves for numpy, FAISS or a checkpoint comes back to the CPU.
"""

from __future__ import annotations

import torch
from torch import nn

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str | None) -> torch.device:
    """`--device NAME` -> a torch.device, or a ValueError saying why it cannot be used."""
    wanted = (name or "auto").strip().lower()
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: only {DEVICE_CHOICES} are supported")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda
                                                 else ", a CPU-only build")
        raise ValueError(f"--device {name!r}: torch sees no CUDA GPU ({build}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name!r}: this machine has {count} CUDA GPU(s), "
                         f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def device_of(module: nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for one without any)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    """'cpu' or 'cuda:0 (NVIDIA H100 80GB HBM3)', for logs and history.json."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)

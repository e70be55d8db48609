"""What sample.py, train.py and eval.py share: help text, one-line errors, device and dtype names.

Imports no torch at module level, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

DTYPE_NAMES = ("bf16", "fp16", "fp32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: x)" only where x says something: not for None, False, [] or a help that gives it."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run_main(main: Callable[[], int | None]) -> int:
    """Run a script's body; minissb's errors (all ValueError subclasses) become one `error: ...` line."""
    try:
        return main() or 0
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def torch_dtype(name: str):
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def torch_device(name: str):
    """'auto' -> cuda when available, else cpu; anything else must be a usable torch device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (try auto, cpu, cuda or cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device

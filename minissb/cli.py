"""What sample.py, train.py and eval.py share: help text, one-line errors, option types, device and dtype names.

Imports no torch at module level, so `--help` stays instant.

Errors reach the user as one line on stderr, never a traceback:
    error: ...    bad input or a failed write; exit status 1 (run_main) or 2 (a bad option, ArgumentParser)
    warning: ...  something worth knowing that does not stop the run
The option types (`int_range`, `float_range`) reject NaN, infinities and out-of-range values
while the command line is parsed, before anything loads or is written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

DTYPE_NAMES = ("auto", "bf16", "fp16", "fp32")
DTYPE_HELP = ("weights and compute dtype; auto = bf16 on CUDA and on CPUs with native bf16 matmuls "
              "(avx512_bf16 or AMX), else fp32 (on AVX2-only CPUs bf16 is emulated and ~2x slower)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: x)" only where x says something: not for None, False, [] or a help that gives it."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line `error: ...` (exit status 2) instead of the usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class NumberType:
    """An argparse type for a numeric option: parses the text and rejects non-finite and
    out-of-range values with one message; `problem(value)` checks an already parsed value
    the same way (for library callers, who skip argparse)."""

    def __init__(self, kind: type, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = "integer" if kind is int else "number"  # argparse names the type by it
        bounds, shown = [], (lambda x: str(x) if kind is int else f"{x:g}")
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {shown(low)}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {shown(high)}")
        self.want = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(bounds) if bounds else "")

    def problem(self, value) -> str | None:
        """None when `value` is allowed, else 'must be ..., got ...'."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (self.kind is float or isinstance(value, int))
        ok = ok and math.isfinite(value)
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value < self.high if self.high_open else value <= self.high
        return None if ok else f"must be {self.want}, got {value!r}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.want}, got {text!r}") from None
        if self.problem(value):
            raise argparse.ArgumentTypeError(f"must be {self.want}, got {text!r}")
        return value


def int_range(low: int, high: int | None = None) -> NumberType:
    """An integer in [low, high] (no upper bound when high is None)."""
    return NumberType(int, low, high)


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> NumberType:
    """A finite number between low and high, each bound inclusive unless *_open."""
    return NumberType(float, low, high, low_open, high_open)


# What to do about a failed read or write, by errno; the path comes first in the message.
OS_ERROR_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space, then rerun the same command to continue",
    errno.EDQUOT: "disk quota exceeded: free some space, then rerun the same command to continue",
    errno.EROFS: "read-only file system: choose an output path on a writable disk",
    errno.EACCES: "permission denied: choose another path or fix its permissions",
    errno.EPERM: "operation not permitted: choose another path or fix its permissions",
    errno.EISDIR: "is a directory where a file is expected: pass a file name",
    errno.ENOTDIR: "a part of this path is a file, not a directory: choose another path",
    errno.EEXIST: "exists and is not a directory: choose another path",
    errno.ENOENT: "no such file or directory",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path",
}


def os_error_line(e: OSError) -> str:
    """'<path>: <what happened and what to do>' for an OSError (the path when it names one)."""
    advice = OS_ERROR_ADVICE.get(e.errno) or (e.strerror or str(e) or type(e).__name__)
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(map(str, paths))}: {advice}" if paths else advice


class OutputPathError(ValueError):
    """An output path that cannot be written; found before anything loads."""


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Fail now, not after the model has loaded, when `path` cannot be or become a writable folder:
    it is a file, a parent of it is a file, or the nearest existing folder is read-only."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor will hold it
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is inside {probe}, which is a file"
        raise OutputPathError(f"{option} {path} {where}: pass a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable"
        raise OutputPathError(f"{option} {path}: {probe} {why}: choose an output directory you can write to")


@contextlib.contextmanager
def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run_main(main: Callable[[], int | None]) -> int:
    """Run a script's body: minissb's errors (all ValueError subclasses) and failed reads or
    writes (OSError: disk full, read-only, a file where a folder belongs) become one `error: ...`
    line, and warnings one `warning: ...` line each."""
    with _one_line_warnings():
        try:
            return main() or 0
        except ValueError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        except OSError as e:
            print(f"error: {os_error_line(e)}", file=sys.stderr)
    return 1


def cpu_has_native_bf16() -> bool:
    """True when /proc/cpuinfo lists avx512_bf16 or amx_bf16 (Linux x86); False where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype_name(name: str, device) -> str:
    """'auto' -> bf16 on CUDA or on a CPU with native bf16, else fp32; other names unchanged."""
    if name != "auto":
        return name
    return "bf16" if getattr(device, "type", str(device)) == "cuda" or cpu_has_native_bf16() else "fp32"


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

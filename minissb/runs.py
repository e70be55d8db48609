"""Run bookkeeping: what sample.py, train.py, eval.py and grpo.py share, in one place.

Read top to bottom:
  command line   ArgumentParser (one-line errors, exit 2), HelpFormatter, int_range /
                 float_range (reject NaN, infinities and out-of-range values while parsing),
                 check_output_dir (refuse an unwritable --out before anything loads), run_main
                 (a script's body: ValueError and OSError become one `error: ...` line, exit 1)
  devices        auto device and dtype names (bf16 only where the CPU has native bf16)
  files          JSONL appended one fsynced record per line, with torn-line repair; whole
                 files written atomically (temporary + fsync + rename); sha256 of inputs
  runs           one run-config check that refuses to continue a run made with other
                 arguments, and the per-problem seed every stage derives its sampling from

Errors reach the user as one line on stderr, never a traceback:
    error: ...    bad input or a failed write; exit status 1 (run_main) or 2 (a bad option)
    warning: ...  something worth knowing that does not stop the run

JSONL files written by long runs (rollouts, teacher solutions, evaluations, metrics) are
appended one record per line with a flush + fsync each time, so a killed run loses at most
the line it was writing. `read_jsonl` drops such a trailing partial line (with a warning) and
`append_jsonl` cuts it off before appending, so a resumed run never glues two records
together. That repair is for minissb's own outputs only: a user's input file with a bad
line, last line included, is an error naming file:line.

Whole files (run configs, adapters, checkpoints) go through `atomic_write`: a temporary file
next to the target, fsynced, renamed over it, with the usual permissions (0666 & ~umask, not
mkstemp's 0600). `remove_temp_files` clears the temporaries a killed or disk-full run left.

Imports no torch at module level, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

# ----------------------------------------------------------------------------- command line

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


def check_output_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """Fail now, not after the model has loaded, when `path` cannot be or become a writable folder:
    it is a file, a parent of it is a file, or the nearest existing folder is read-only."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:  # the nearest existing ancestor will hold it
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is inside {probe}, which is a file"
        raise ValueError(f"{option} {path} {where}: pass a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        why = "is on a read-only file system" if read_only else "is not writable"
        raise ValueError(f"{option} {path}: {probe} {why}: choose an output directory you can write to")


@contextlib.contextmanager
def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def run_main(main: Callable[[], object]) -> int:
    """Run a script's body: minissb's errors (ValueError) and failed reads or
    writes (OSError: disk full, read-only, a file where a folder belongs) become one `error: ...`
    line, and warnings one `warning: ...` line each."""
    with _one_line_warnings():
        try:
            status = main()
            return status if isinstance(status, int) else 0  # a script's body may return its results
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


# ----------------------------------------------------------------------------- files


class PartialLineWarning(UserWarning):
    """A JSONL file minissb appends to ended in a partial line (a killed write); it was dropped."""


def _record_json(record) -> str:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    return json.dumps(record, ensure_ascii=False)


def read_jsonl(path: str | os.PathLike, *, own_output: bool = True) -> list[dict]:
    """The JSON objects of a .jsonl file, one per non-empty line.

    own_output=True (a file minissb appends to): a last line with no newline that does not
    parse is a record cut off by a killed run: it is dropped with a PartialLineWarning.
    own_output=False (an input file): every bad line is an error. Any other bad line is a
    ValueError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} not found")
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        is_tail = n == len(lines)  # text after the last newline
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if is_tail and own_output:
                _warn_partial(path, n, raw)
                break
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line): re-save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            if is_tail and own_output:
                _warn_partial(path, n, raw)
                break
            raise ValueError(f"{path}:{n}: malformed JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _warn_partial(path: Path, n: int, raw: bytes) -> None:
    warnings.warn(f"{path}:{n}: ignoring a partial last line ({len(raw)} bytes, no newline): an interrupted write",
                  PartialLineWarning, stacklevel=3)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_file_mode() -> int:
    """The mode open() gives a new file: 0666 minus the process umask."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


TEMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Create or replace `path` whole: write(tmp_path) fills a temporary file next to it, which is
    fsynced and renamed over `path`, so a reader or a killed run never sees a torn file.

    The temporary is named .<name>.<random>.tmp (remove_temp_files clears leftovers) and
    removed again if anything fails; the file gets the usual mode, not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with names_file(path, temporary=f".{path.name}."):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        try:
            os.fchmod(fd, default_file_mode())
            os.close(fd)
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def names_file(path: str | os.PathLike, temporary: str | None = None):
    """An OSError raised inside that names no file (ENOSPC from a write does not), or only the
    temporary file of `path` (its name starts with `temporary`), names `path` instead, so the
    one-line error says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None or (temporary and Path(e.filename).name.startswith(temporary)):
            e.filename = str(path)
        raise


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries a killed or failed run left in `directory` (not below it): hidden
    .<name>...tmp files or folders (atomic_write, checkpoints) and <name>.json(l).tmp files
    (older versions' writers). Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        ours = p.name.startswith(".") or p.name.endswith((".json.tmp", ".jsonl.tmp"))
        if not (ours and p.name.endswith(TEMP_SUFFIX)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _write_lines(tmp: str, lines: Iterable[str]) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line)


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable) -> None:
    """Write all records (dicts or dataclasses) to `path` at once (atomic_write)."""
    atomic_write(path, lambda tmp: _write_lines(tmp, (_record_json(r) + "\n" for r in records)))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write one JSON document (run configs, summaries) at once (atomic_write)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"  # before the temporary exists
    atomic_write(path, lambda tmp: _write_lines(tmp, [text]))


def config_differences(stored: dict, current: dict, limit: int = 4) -> str | None:
    """'key: old there, new now; ...' for the settings that differ between two run configs, or None."""
    diffs = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if not diffs:
        return None
    return "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in diffs[:limit])


def repair_jsonl_tail(path: str | os.PathLike) -> bool:
    """Make `path` end at a line boundary before appending; True if a partial line was cut off.

    A complete JSON object that only lacks its newline gets one instead of being cut.
    """
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        # Find the start of the last line by scanning back in blocks.
        pos, start = size, 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            nl = f.read(step).rfind(b"\n")
            if nl >= 0:
                start = pos + nl + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            complete = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if complete:
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    if not complete:
        warnings.warn(f"{path}: cut off a partial last line ({size - start} bytes) left by an interrupted write", PartialLineWarning, stacklevel=3)
    return not complete


def append_jsonl(path: str | os.PathLike, records: Iterable) -> int:
    """Append records (dicts or dataclasses) one line each, flushed and fsynced; returns how many.

    Each line is written with one write call and synced before the next, so a killed run
    leaves complete records plus at most one partial line, which the next append removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with names_file(path):
        repair_jsonl_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(_record_json(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
                n += 1
    return n


# ----------------------------------------------------------------------------- runs

ADDED_IDENTITY_KEYS = ("data_sha256",)  # run-config keys that run.json files of older versions lack


def read_json(path: str | os.PathLike, fix: str = "move it away, or pass another --out") -> dict:
    """The JSON object in a file (a run config, a model's config.json, an adapter's), or a
    one-line ValueError that names the file and ends with `fix`, what to do about it."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(obj).__name__}; {fix}")
    return obj


def check_run_config(config_path: str | os.PathLike, config: dict, outputs: Iterable[str | os.PathLike],
                     ignore: Iterable[str] = ()) -> bool:
    """Refuse to continue a run made with other arguments; True when the run is new.

    config_path: the run's run.json (the caller writes `config` there once this passes).
    outputs: the files the run appends to: if one already holds records but run.json is
    missing, nothing tells whose they are, so that is refused too. `ignore`: keys that may
    differ (e.g. the seed of a greedy run). Keys a run.json of an older version lacks
    (ADDED_IDENTITY_KEYS) are not compared.
    """
    config_path, outputs = Path(config_path), [Path(p) for p in outputs]
    if not config_path.is_file():
        for existing in outputs:
            if existing.is_file() and existing.stat().st_size > 0:
                raise ValueError(f"{existing} exists but {config_path.name} does not, so its arguments are unknown: "
                                 "pass another --out, or move the old files away")
        return True
    stored = read_json(config_path)
    config = {k: v for k, v in config.items() if k in stored or k not in ADDED_IDENTITY_KEYS}
    stored, config = ({k: v for k, v in d.items() if k not in set(ignore)} for d in (stored, config))
    shown = config_differences(stored, config)
    if shown:
        raise ValueError(f"{outputs[0] if outputs else config_path.parent} was written with other arguments ({shown}): "
                         "rerun with the same arguments to continue it, or pass another --out")
    return False


def model_identity(path_or_id: str | None) -> str | None:
    """How run configs name a model, adapter or data source: a local path made absolute (a
    restart from another directory still matches), a hub id as is."""
    if path_or_id is None:
        return None
    p = Path(path_or_id).expanduser()
    return str(p.resolve()) if p.exists() else str(path_or_id)


def problem_seed(seed: int, tag: str, problem_id: str) -> int:
    """The sampling seed of one problem in one stage ("rollouts", "teacher", "eval", "grpo"):
    a function of the run seed, the stage and the problem alone, so a restart, another pool
    size or another order of problems writes the same records."""
    digest = hashlib.sha256(f"{seed}:{tag}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

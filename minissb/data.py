"""Math problems (GSM8K, MATH-500, AIME 2024) and crash-safe JSONL files.

`load_problems` reads a dataset from a local mirror of its hub repository, from a single
.jsonl/.parquet file, or from the Hugging Face hub (only the files it needs), and returns
`Problem`s with the gold final answer as a string. Answers are kept exactly as the source
writes them ("1,450,000", "025", "10,\\!080"); comparing them is the grader's job.

JSONL files written by long runs (rollouts, teacher solutions, evaluations) are appended one
record per line with a flush + fsync each time, so a killed run loses at most the line it was
writing. `read_jsonl` drops such a trailing partial line (with a warning) and `append_jsonl`
cuts it off before appending, so a resumed run never glues two records together. That repair
is for minissb's own outputs only: a user's input file (a dataset) with a bad line, last line
included, is an error naming file:line.

Whole files (run configs, adapters, checkpoints) go through `atomic_write`: a temporary file
next to the target, fsynced, renamed over it, with the usual permissions (0666 & ~umask, not
mkstemp's 0600). `remove_temp_files` clears the temporaries a killed or disk-full run left.
`file_sha256` is the content hash run configs record, so a data file edited in place is noticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


class DataError(ValueError):
    """A dataset or JSONL file could not be read; the message says what to fix."""


class PartialLineWarning(UserWarning):
    """A JSONL file ended in a half-written line (a run killed while writing); it was ignored."""


@dataclass
class Problem:
    id: str
    question: str
    gold: str  # the final answer as the dataset writes it
    dataset: str
    meta: dict = field(default_factory=dict)  # the source's other columns (solution, level, url, ...)


@dataclass(frozen=True)
class DatasetSpec:
    repo: str  # hub dataset repo id
    files: dict[str, str]  # split -> file path inside the repo
    default_split: str
    question: str  # column names in the hub files
    answer: str
    id_column: str | None  # None -> ids are "<dataset>/<split>/<row>"


DATASETS: dict[str, DatasetSpec] = {
    # Worked solution in `answer`, final answer after "#### ". Rollouts and distillation use
    # split="train"; evaluation uses "test", the default.
    "gsm8k": DatasetSpec(
        repo="openai/gsm8k",
        files={"train": "main/train-00000-of-00001.parquet", "test": "main/test-00000-of-00001.parquet"},
        default_split="test",
        question="question",
        answer="answer",
        id_column=None,
    ),
    "math500": DatasetSpec(
        repo="HuggingFaceH4/MATH-500",
        files={"test": "test.jsonl"},
        default_split="test",
        question="problem",
        answer="answer",
        id_column="unique_id",
    ),
    # The hub calls its only split "train"; it is an evaluation set all the same.
    "aime24": DatasetSpec(
        repo="HuggingFaceH4/aime_2024",
        files={"train": "data/train-00000-of-00001.parquet"},
        default_split="train",
        question="problem",
        answer="answer",
        id_column="id",
    ),
}


def _spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[dataset]


def hub_folder_name(repo: str) -> str:
    """Folder name of a local hub mirror: openai/gsm8k -> openai__gsm8k."""
    return repo.replace("/", "__")


def load_problems(
    dataset: str,
    split: str | None = None,
    source: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems of `dataset` ("gsm8k", "math500" or "aime24"), in file order.

    split: gsm8k "train" or "test" (default "test"); math500 "test"; aime24 "train" (its only split).
    source: None -> download the split's file from the hub into the HF cache;
        a directory -> a local mirror of the hub repo (e.g. shared/data/openai__gsm8k), or a
        folder holding such mirrors (e.g. shared/data);
        a .jsonl/.parquet file -> rows with the dataset's columns or generic question/answer.
    limit: keep only the first `limit` problems.
    """
    spec = _spec(dataset)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    path = data_file(dataset, split, source)
    if split is None:  # only names the ids ("gsm8k/<split>/<row>"): a single file's stem, else the default split
        split = path.stem if _as_file(source) else spec.default_split

    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    return [_to_problem(dataset, spec, row, i, split, path) for i, row in enumerate(rows)]


def _as_file(source) -> Path | None:
    return Path(source).expanduser() if source is not None and Path(source).expanduser().is_file() else None


def data_file(dataset: str, split: str | None = None, source: str | os.PathLike | None = None) -> Path:
    """The file load_problems reads for these arguments (downloaded first when source is None):
    what a run config hashes to notice a data file changed under the same name."""
    spec = _spec(dataset)
    path = _as_file(source)
    if path is not None:
        return path
    split = spec.default_split if split is None else split
    if split not in spec.files:
        raise DataError(f"{dataset} has no split {split!r}: choose one of {', '.join(spec.files)}")
    return _resolve_split_file(dataset, spec, split, source)


def _resolve_split_file(dataset: str, spec: DatasetSpec, split: str, source) -> Path:
    rel = spec.files[split]
    if source is None:
        return _download(spec.repo, rel)
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data source {root} does not exist (pass a local mirror of {spec.repo}, a .jsonl/.parquet file, or nothing to download)")
    # A folder of mirrors (shared/data) works too: pick the dataset's own subfolder.
    mirror = root / hub_folder_name(spec.repo)
    if not (root / rel).is_file() and (mirror / rel).is_file():
        root = mirror
    path = root / rel
    if not path.is_file():
        raise DataError(f"{path} not found: {root} is not a local mirror of {spec.repo} (expected {rel} inside it)")
    return path


def _download(repo: str, rel: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo, repo_type="dataset", allow_patterns=[rel])
    except Exception as e:  # offline, no network, gated repo: one line that says which
        msg = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"could not download {rel} of dataset {repo} from the Hugging Face hub: {type(e).__name__}: {msg}") from None
    path = Path(snapshot) / rel
    if not path.is_file():
        raise DataError(f"the hub repo {repo} has no file {rel}")
    return path


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, own_output=False)  # a user's file: no torn-line repair
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl or .parquet")


def _pick(row: dict, names: tuple[str, ...], what: str, path: Path, i: int):
    for name in names:
        if name in row:
            if row[name] is None:
                raise DataError(f"{path}: row {i} has a null {name!r}")
            return row[name], name
    wanted = " or ".join(repr(n) for n in dict.fromkeys(names))
    raise DataError(f"{path}: row {i} has no {what} column {wanted} (columns: {', '.join(row) or 'none'})")


def _to_problem(dataset: str, spec: DatasetSpec, row: dict, i: int, split: str, path: Path) -> Problem:
    question, q_col = _pick(row, (spec.question, "question"), "question", path, i)
    answer, a_col = _pick(row, (spec.answer, "answer", "gold"), "answer", path, i)
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{path}: row {i} has an empty or non-text {q_col!r}")
    # A number is a fine answer ("42" written as 42); a dict or list would be graded as its repr.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{path}: row {i}: {a_col!r} is a {type(answer).__name__}, expected the answer as text or a number")
    answer = str(answer)
    # Everything else goes to meta; rows written from Problem records keep their own meta.
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    meta.update((k, v) for k, v in row.items() if k not in (q_col, a_col, spec.id_column, "id", "dataset", "meta"))
    if dataset == "gsm8k":
        if "####" in answer:
            meta["solution"] = answer  # the worked solution, kept for reference
        gold = gsm8k_final_answer(answer)
        if gold is None:
            raise DataError(f"{path}: row {i}: the gsm8k answer has several lines but no '#### <final answer>' line")
    else:
        gold = answer.strip()
    if not gold:
        raise DataError(f"{path}: row {i} has an empty answer")
    id_value = next((row[c] for c in (spec.id_column, "id") if c and row.get(c) is not None), None)
    pid = str(id_value) if id_value is not None else f"{dataset}/{split}/{i}"
    return Problem(id=pid, question=question, gold=gold, dataset=dataset, meta=meta)


def gsm8k_final_answer(answer: str) -> str | None:
    """The text after GSM8K's "#### " marker; a bare one-line answer is taken as is."""
    if "####" in answer:
        return answer.rsplit("####", 1)[1].strip()
    if "\n" in answer.strip():
        return None  # a worked solution without its final-answer line
    return answer.strip()


# ----------------------------------------------------------------------------- JSONL


def _record_json(record) -> str:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        record = dataclasses.asdict(record)
    return json.dumps(record, ensure_ascii=False)


def read_jsonl(path: str | os.PathLike, *, own_output: bool = True) -> list[dict]:
    """The JSON objects of a .jsonl file, one per non-empty line.

    own_output=True (a file minissb appends to): a last line with no newline that does not
    parse is a record cut off by a killed run: it is dropped with a PartialLineWarning.
    own_output=False (an input file): every bad line is an error. Any other bad line is a
    DataError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
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
            raise DataError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line): re-save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            if is_tail and own_output:
                _warn_partial(path, n, raw)
                break
            raise DataError(f"{path}:{n}: malformed JSON ({e})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
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


__all__ = [
    "Problem",
    "DATASETS",
    "DatasetSpec",
    "DataError",
    "PartialLineWarning",
    "load_problems",
    "data_file",
    "gsm8k_final_answer",
    "read_jsonl",
    "file_sha256",
    "atomic_write",
    "names_file",
    "remove_temp_files",
    "write_jsonl_atomic",
    "write_json_atomic",
    "append_jsonl",
    "repair_jsonl_tail",
]

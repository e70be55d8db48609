"""Math problems (GSM8K, MATH-500, AIME 2024): where they are read from, and in what shape.

`load_problems` reads a dataset from a local mirror of its hub repository, from a single
.jsonl/.parquet file, or from the Hugging Face hub (only the files it needs), and returns
`Problem`s with the gold final answer as a string. Answers are kept exactly as the source
writes them ("1,450,000", "025", "10,\\!080"); comparing them is the grader's job.

The JSONL and atomic-file helpers every run uses live in minissb.runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from minissb.runs import read_jsonl


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
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
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
        raise ValueError(f"limit must be >= 0, got {limit}")
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
        raise ValueError(f"{dataset} has no split {split!r}: choose one of {', '.join(spec.files)}")
    return _resolve_split_file(dataset, spec, split, source)


def _resolve_split_file(dataset: str, spec: DatasetSpec, split: str, source) -> Path:
    rel = spec.files[split]
    if source is None:
        return _download(spec.repo, rel)
    root = Path(source).expanduser()
    if not root.exists():
        raise ValueError(f"data source {root} does not exist (pass a local mirror of {spec.repo}, a .jsonl/.parquet file, or nothing to download)")
    # A folder of mirrors (shared/data) works too: pick the dataset's own subfolder.
    mirror = root / hub_folder_name(spec.repo)
    if not (root / rel).is_file() and (mirror / rel).is_file():
        root = mirror
    path = root / rel
    if not path.is_file():
        raise ValueError(f"{path} not found: {root} is not a local mirror of {spec.repo} (expected {rel} inside it)")
    return path


def _download(repo: str, rel: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(repo, repo_type="dataset", allow_patterns=[rel])
    except Exception as e:  # offline, no network, gated repo: one line that says which
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"could not download {rel} of dataset {repo} from the Hugging Face hub: {type(e).__name__}: {msg}") from None
    path = Path(snapshot) / rel
    if not path.is_file():
        raise ValueError(f"the hub repo {repo} has no file {rel}")
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
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise ValueError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl or .parquet")


def _pick(row: dict, names: tuple[str, ...], what: str, path: Path, i: int):
    for name in names:
        if name in row:
            if row[name] is None:
                raise ValueError(f"{path}: row {i} has a null {name!r}")
            return row[name], name
    wanted = " or ".join(repr(n) for n in dict.fromkeys(names))
    raise ValueError(f"{path}: row {i} has no {what} column {wanted} (columns: {', '.join(row) or 'none'})")


def _to_problem(dataset: str, spec: DatasetSpec, row: dict, i: int, split: str, path: Path) -> Problem:
    question, q_col = _pick(row, (spec.question, "question"), "question", path, i)
    answer, a_col = _pick(row, (spec.answer, "answer", "gold"), "answer", path, i)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{path}: row {i} has an empty or non-text {q_col!r}")
    # A number is a fine answer ("42" written as 42); a dict or list would be graded as its repr.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{path}: row {i}: {a_col!r} is a {type(answer).__name__}, expected the answer as text or a number")
    answer = str(answer)
    # Everything else goes to meta; rows written from Problem records keep their own meta.
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    meta.update((k, v) for k, v in row.items() if k not in (q_col, a_col, spec.id_column, "id", "dataset", "meta"))
    if dataset == "gsm8k":
        if "####" in answer:
            meta["solution"] = answer  # the worked solution, kept for reference
        gold = gsm8k_final_answer(answer)
        if gold is None:
            raise ValueError(f"{path}: row {i}: the gsm8k answer has several lines but no '#### <final answer>' line")
    else:
        gold = answer.strip()
    if not gold:
        raise ValueError(f"{path}: row {i} has an empty answer")
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


__all__ = [
    "Problem",
    "DATASETS",
    "DatasetSpec",
    "load_problems",
    "data_file",
    "gsm8k_final_answer",
]

"""minissb.data: the three hub layouts, local files, every error, and crash-safe JSONL."""

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minissb.data import DATASETS, Problem, data_file, load_problems
from minissb.runs import (
    PartialLineWarning,
    append_jsonl,
    atomic_write,
    file_sha256,
    read_jsonl,
    remove_temp_files,
    write_json_atomic,
    write_jsonl_atomic,
)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- hub layouts in ../shared/data


@pytest.mark.parametrize(
    "dataset, split, rows",
    [("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("gsm8k", None, 1319), ("math500", None, 500), ("aime24", None, 30)],
)
def test_row_counts(data_dir, dataset, split, rows):
    problems = load_problems(dataset, split, source=data_dir)  # the folder of mirrors
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    assert all(p.dataset == dataset and p.question.strip() and p.gold for p in problems)
    mirror = data_dir / DATASETS[dataset].repo.replace("/", "__")
    assert load_problems(dataset, split, source=mirror, limit=5) == problems[:5]  # the mirror itself


def test_gsm8k(data_dir):
    train = load_problems("gsm8k", "train", source=data_dir)
    assert train[0].id == "gsm8k/train/0"
    assert train[0].question.startswith("Natalia sold clips to 48 of her friends")
    assert train[0].gold == "72"
    test = load_problems("gsm8k", "test", source=data_dir)
    golds = [p.gold for p in test]
    # Thousands separators and signs are kept as written; the grader normalises them.
    assert {"2,125", "1,450,000", "-10", "-3"} <= set(golds)
    assert test[0].gold == "18" and test[0].id == "gsm8k/test/0"
    for p in test:  # gold is the last solution line without its "#### " marker
        assert p.gold == p.meta["solution"].splitlines()[-1].removeprefix("#### ")


def test_math500(data_dir):
    problems = load_problems("math500", source=data_dir)
    first = problems[0]
    assert first.id == "test/precalculus/807.json"
    assert first.question.startswith("Convert the point $(0,3)$")
    assert first.gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["subject"] == "Precalculus" and isinstance(first.meta["level"], int)
    golds = {p.gold for p in problems}
    assert {"90^\\circ", "10,\\!080", "\\text{(C)}", "52_8"} <= golds


def test_aime24_keeps_leading_zeros(data_dir):
    problems = load_problems("aime24", source=data_dir)
    assert [p.id for p in problems] == [str(i) for i in range(60, 90)]
    assert problems[0].gold == "204"
    golds = [p.gold for p in problems]
    assert {"025", "073", "033"} <= set(golds)
    assert all(len(g) == 3 and g.isdigit() for g in golds)
    assert problems[0].meta["year"] == "2024" and problems[0].meta["url"].startswith("https://")


def test_limit(data_dir):
    assert [p.id for p in load_problems("gsm8k", "test", source=data_dir, limit=3)] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]
    assert load_problems("aime24", source=data_dir, limit=0) == []
    assert len(load_problems("aime24", source=data_dir, limit=100)) == 30


def test_hub_download_fetches_only_the_needed_file(data_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(data_dir / repo_id.replace("/", "__"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert len(load_problems("gsm8k", "train")) == 7473
    assert len(load_problems("aime24")) == 30
    assert calls == [
        ("openai/gsm8k", {"repo_type": "dataset", "allow_patterns": ["main/train-00000-of-00001.parquet"]}),
        ("HuggingFaceH4/aime_2024", {"repo_type": "dataset", "allow_patterns": ["data/train-00000-of-00001.parquet"]}),
    ]


def test_hub_errors_are_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError) as e:
        load_problems("math500")
    assert "could not download test.jsonl of dataset HuggingFaceH4/MATH-500" in one_line(e)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    with pytest.raises(ValueError, match="has no file test.jsonl"):
        load_problems("math500")


# ----------------------------------------------------------------------------- local files


def test_local_jsonl_with_dataset_columns(tmp_path):
    path = tmp_path / "mini.jsonl"
    write_jsonl_atomic(path, [
        {"problem": "What is $1+1$?", "answer": "2", "unique_id": "a/1.json", "level": 1},
        {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "unique_id": "a/2.json", "level": 2},
    ])
    problems = load_problems("math500", source=path)
    assert [(p.id, p.gold, p.meta) for p in problems] == [("a/1.json", "2", {"level": 1}), ("a/2.json", "\\frac{1}{2}", {"level": 2})]


def test_local_generic_columns(tmp_path):
    rows = [{"question": "Q1?", "answer": "Work.\n#### 1,000"}, {"question": "Q2?", "answer": "7"}]
    path = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    problems = load_problems("gsm8k", source=path)
    assert [(p.id, p.gold) for p in problems] == [("gsm8k/mine/0", "1,000"), ("gsm8k/mine/1", "7")]
    assert problems[0].meta == {"solution": "Work.\n#### 1,000"} and problems[1].meta == {}
    assert load_problems("gsm8k", "dev", source=path)[1].id == "gsm8k/dev/1"  # split only names the ids
    # AIME answers written as numbers in someone's file still become strings.
    write_jsonl_atomic(tmp_path / "a.jsonl", [{"question": "Find n.", "answer": 25, "id": 7}])
    assert load_problems("aime24", source=tmp_path / "a.jsonl") == [Problem("7", "Find n.", "25", "aime24", {})]


def test_problems_round_trip_through_jsonl(tmp_path, data_dir):
    problems = load_problems("math500", source=data_dir, limit=20)
    write_jsonl_atomic(tmp_path / "p.jsonl", problems)  # dataclasses are written as dicts
    assert load_problems("math500", source=tmp_path / "p.jsonl") == problems
    gsm = load_problems("gsm8k", "test", source=data_dir, limit=5)
    write_jsonl_atomic(tmp_path / "g.jsonl", gsm)
    assert load_problems("gsm8k", source=tmp_path / "g.jsonl") == gsm


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        load_problems("gsm8kk")
    assert one_line(e) == "unknown dataset 'gsm8kk': choose one of gsm8k, math500, aime24"


def test_unknown_split(data_dir):
    with pytest.raises(ValueError) as e:
        load_problems("gsm8k", "validation", source=data_dir)
    assert one_line(e) == "gsm8k has no split 'validation': choose one of train, test"
    with pytest.raises(ValueError, match="aime24 has no split 'test': choose one of train"):
        load_problems("aime24", "test", source=data_dir)


def test_missing_source_and_not_a_mirror(tmp_path):
    with pytest.raises(ValueError, match="does not exist") as e:
        load_problems("gsm8k", source=tmp_path / "nope")
    one_line(e)
    with pytest.raises(ValueError, match=r"test-00000-of-00001.parquet not found: .* is not a local mirror of openai/gsm8k"):
        load_problems("gsm8k", source=tmp_path)
    with pytest.raises(ValueError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_unsupported_and_corrupt_files(tmp_path):
    (tmp_path / "a.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"unsupported file type \.csv; use \.jsonl or \.parquet"):
        load_problems("gsm8k", source=tmp_path / "a.csv")
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file") as e:
        load_problems("aime24", source=tmp_path / "b.parquet")
    one_line(e)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "x", "answer": "1"}, r"row 0 has no question column 'problem' or 'question' \(columns: prompt, answer\)"),
        ({"problem": "x", "solution": "..."}, r"row 0 has no answer column 'answer' or 'gold'"),
        ({"problem": "   ", "answer": "1"}, r"row 0 has an empty or non-text 'problem'"),
        ({"problem": "x", "answer": "  "}, r"row 0 has an empty answer"),
        ({"problem": "x", "answer": None}, r"row 0 has a null 'answer'"),
    ],
)
def test_missing_or_empty_fields(tmp_path, row, match):
    write_jsonl_atomic(tmp_path / "r.jsonl", [row])
    with pytest.raises(ValueError, match=match) as e:
        load_problems("math500", source=tmp_path / "r.jsonl")
    one_line(e)


def test_gsm8k_solution_without_final_answer_line(tmp_path):
    write_jsonl_atomic(tmp_path / "g.jsonl", [{"question": "q", "answer": "step 1\nstep 2"}])
    with pytest.raises(ValueError, match=r"row 0: the gsm8k answer has several lines but no '#### <final answer>' line"):
        load_problems("gsm8k", source=tmp_path / "g.jsonl")


def test_negative_limit():
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_problems("gsm8k", limit=-1)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2,,}\n{"a": 3}\n')
    with pytest.raises(ValueError) as e:
        read_jsonl(path)
    assert one_line(e).startswith(f"{path}:3: malformed JSON")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 8 of the line\)"):
        load_problems("gsm8k", source=path)


@pytest.mark.parametrize("tail", [b'{"question": "q2", "answer": "3"', b'{"question": "\xff"}'])
def test_an_input_file_with_a_bad_last_line_is_an_error_not_a_repair(tmp_path, tail):
    # The torn-line repair is for minissb's own outputs; a user's dataset must not lose a row quietly.
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"question": "q1", "answer": "2"}\n' + tail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"in\.jsonl:2: (malformed JSON|not UTF-8)") as e:
            load_problems("gsm8k", source=path)
    one_line(e)
    with pytest.warns(PartialLineWarning):  # the same bytes as one of minissb's own outputs: repaired
        assert read_jsonl(path) == [{"question": "q1", "answer": "2"}]


@pytest.mark.parametrize("answer, kind", [({"value": 3}, "dict"), ([3], "list"), (True, "bool")])
def test_an_answer_that_is_not_text_or_a_number_is_refused(tmp_path, answer, kind):
    path = tmp_path / "in.jsonl"
    write_jsonl_atomic(path, [{"question": "q", "answer": "1"}, {"question": "q", "answer": answer}])
    with pytest.raises(ValueError, match=rf"in\.jsonl: row 1: 'answer' is a {kind}, expected the answer as text or a number") as e:
        load_problems("math500", source=path)
    one_line(e)
    write_jsonl_atomic(path, [{"question": "q", "answer": 42}, {"question": "q", "answer": 2.5}])
    assert [p.gold for p in load_problems("math500", source=path)] == ["42", "2.5"]  # numbers stay fine


def test_data_file_and_its_hash_follow_the_content(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl_atomic(path, [{"question": "q", "answer": "1"}])
    assert data_file("gsm8k", source=path) == path
    before = file_sha256(path)
    assert before == hashlib.sha256(path.read_bytes()).hexdigest()
    write_jsonl_atomic(path, [{"question": "q", "answer": "2"}])  # edited in place, same name
    assert file_sha256(path) != before
    mirror = tmp_path / "mirror" / "HuggingFaceH4__MATH-500"
    write_jsonl_atomic(mirror / "test.jsonl", [{"problem": "q", "answer": "1", "unique_id": "a"}])
    assert data_file("math500", source=tmp_path / "mirror") == mirror / "test.jsonl"


# ----------------------------------------------------------------------------- crash-safe JSONL

RECORDS = [{"id": i, "text": f"solution {i} ∑ \\boxed{{{i}}}\nsecond line"} for i in range(3)]


def test_partial_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl_atomic(path, RECORDS)
    full = path.read_bytes()
    path.write_bytes(full + b'{"id": 3, "text": "cut off he')
    with pytest.warns(PartialLineWarning, match=r"r.jsonl:4: ignoring a partial last line"):
        assert read_jsonl(path) == RECORDS
    # A complete object that only misses its newline is a record (a hand-written file).
    path.write_bytes(full + b'{"id": 3}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(path) == RECORDS + [{"id": 3}]


def test_every_cut_point_yields_the_complete_records_before_it(tmp_path):
    path = tmp_path / "r.jsonl"
    write_jsonl_atomic(path, RECORDS)
    full = path.read_bytes()
    # A record is complete once its closing brace is written; its newline may still be missing.
    ends = [i for i, b in enumerate(full) if b == ord("\n")]
    for cut in range(len(full) + 1):
        path.write_bytes(full[:cut])
        complete = sum(e <= cut for e in ends)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PartialLineWarning)
            assert read_jsonl(path) == RECORDS[:complete], cut
            # A resumed run appends after cutting the partial line: no glued records.
            append_jsonl(path, [{"id": "new"}])
        assert read_jsonl(path) == RECORDS[:complete] + [{"id": "new"}], cut


def test_append_keeps_a_complete_last_record_without_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 0}\n{"id": 1}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert append_jsonl(path, iter([{"id": 2}, Problem("p", "q", "1", "gsm8k")])) == 2
    assert read_jsonl(path) == [{"id": 0}, {"id": 1}, {"id": 2}, {"id": "p", "question": "q", "gold": "1", "dataset": "gsm8k", "meta": {}}]


def test_append_warns_when_it_cuts(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    append_jsonl(path, [{"id": 0}])  # creates the folder and file
    with open(path, "a") as f:
        f.write('{"id": 1, "te')
    with pytest.warns(PartialLineWarning, match="cut off a partial last line"):
        append_jsonl(path, [{"id": 2}])
    assert read_jsonl(path) == [{"id": 0}, {"id": 2}]


def test_write_jsonl_atomic_replaces_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "out" / "a.jsonl"
    write_jsonl_atomic(path, RECORDS)
    write_jsonl_atomic(path, RECORDS[:1])
    assert read_jsonl(path) == RECORDS[:1]
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.jsonl"]
    assert path.read_text(encoding="utf-8").count("\n") == 1  # newlines inside strings are escaped


def test_atomic_writers_respect_the_umask_and_clean_up_after_a_failure(tmp_path):
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "run.json", {"a": 1})
        write_jsonl_atomic(tmp_path / "r.jsonl", RECORDS)
    finally:
        os.umask(old)
    for name in ("run.json", "r.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name  # 0666 & ~027, not mkstemp's 0600

    def disk_full(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device", tmp)

    with pytest.raises(OSError):
        atomic_write(tmp_path / "run.json", disk_full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "run.json"]  # no temporary left behind
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}  # and the old file is intact


def test_remove_temp_files_takes_only_temporaries(tmp_path):
    (tmp_path / "results.json.tmp").write_bytes(b"")  # an older writer's name
    (tmp_path / ".run.json.abc123.tmp").write_text("{")
    (tmp_path / ".step-000004.tmp").mkdir()
    (tmp_path / ".step-000004.tmp" / "state.pt").write_bytes(b"x")
    keep = ["notes.tmp", "results.json", "step-000002", "x.jsonl"]
    for name in keep:
        (tmp_path / name).write_text("keep")
    removed = remove_temp_files(tmp_path)
    assert sorted(p.name for p in removed) == [".run.json.abc123.tmp", ".step-000004.tmp", "results.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == keep
    assert remove_temp_files(tmp_path / "absent") == []

"""sample.py and eval.py under torchrun: two gloo ranks on the CPU against one process.

The reference is always the one-process run with the same arguments: the merged pairs,
skipped and responses files must be the same bytes (same records, same order), the captured
targets the same tensors, the summary and the table the same counts, and no part file or done
note may be left. A run stopped by --limit (a larger --limit extends it) continues at the
other world size and ends where an uninterrupted one-process run ends. Rank 1's own writes
are checked in process, with a scripted engine and no process group: only its part files.
Each torchrun launch costs several seconds (two ranks importing torch and loading a model).
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors import safe_open

from minissb import dist
from minissb.ssb import RunFiles, Stage1Options, merge_summaries, read_done
from sample import stage1
from test_eval_cli import make_adapter
from test_pipeline import build_answering_model, write_problems
from test_ssb import ScriptedEngine, problems_and_script, tok  # noqa: F401 (tok is a fixture)

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]
TIMING = ("generation_seconds", "tokens_per_s", "sessions", "merged_parts")  # summary fields that may differ
SESSION = ("generated_problems", "generated_tokens", "generation_seconds", "tokens_per_s")  # results.json row fields that may


def load(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py") + "_cli", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, args: list, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(REPO / script), *map(str, args)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def listing(directory: Path) -> list[Path]:
    return sorted(p.relative_to(directory) for p in directory.rglob("*"))


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def answering(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_sample")
    return build_answering_model(root / "model"), write_problems(root / "train.jsonl", 12, "Which number do I think of, puzzle")


def sample_args(answering, out: Path, limit: int) -> list[str]:
    model, data = answering
    return [str(a) for a in ("--model", model, "--data", data, "--out", out, "--limit", limit, "--device", "cpu", "--dtype", "fp32",
                             "--max-new-tokens", 16, "--batch-size", 8, "--no-progress")]


def targets(out: Path) -> dict:
    found = {}
    for f in sorted((out.parent / "pairs.targets").glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            found[f.name] = (h.metadata(), h.get_tensor("hidden"))
    return found


def assert_same_run(got: Path, want: Path, totals: bool = True) -> None:
    """Two sample.py outputs (pairs files) hold the same run: files, records, counts, targets
    (and, with totals, the same tokens: no work was lost on the way)."""
    assert listing(got.parent) == listing(want.parent)  # no part, part summary or done note left
    for name in ("pairs.jsonl", "pairs.skipped.jsonl", "pairs.run.json"):
        assert (got.parent / name).read_bytes() == (want.parent / name).read_bytes(), name
    skip = TIMING if totals else (*TIMING, "rollout_tokens", "teacher_tokens", "tokens_generated")
    strip = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if k not in skip}  # noqa: E731
    assert strip(got.with_name("pairs.summary.json")) == strip(want.with_name("pairs.summary.json"))
    # safetensors writes its metadata in hash order, so two runs' files differ in bytes: compare the contents.
    a, b = targets(got), targets(want)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0] and torch.equal(a[name][1], b[name][1]), name


def test_sample_two_ranks_write_the_one_process_files_and_continue_at_any_world_size(answering, tmp_path):
    sample = load("sample.py")
    a, b, c, straight = (tmp_path / d / "pairs.jsonl" for d in ("a", "b", "c", "straight"))
    assert sample.main(sample_args(answering, b, 6)) == 0  # b: one process for the first 6 problems...
    run = torchrun("sample.py", sample_args(answering, a, 6))  # a: two ranks for the same 6
    assert "2 ranks" in run.stderr and "problems seen:     6" in run.stdout
    assert_same_run(a, b)
    assert json.loads(a.with_name("pairs.summary.json").read_text())["sessions"] == 1

    assert sample.main(sample_args(answering, a, 12)) == 0  # ...a continues in one process
    torchrun("sample.py", sample_args(answering, b, 12))  # ...b continues on two ranks
    assert sample.main(sample_args(answering, straight, 12)) == 0
    ids = [r["id"] for r in dist.read_all(straight)]
    assert len(ids) >= 3 and len(targets(straight)) == len(ids)  # real pairs, each with its targets
    records = ids + [r["id"] for r in dist.read_all(straight.with_name("pairs.skipped.jsonl"))]
    assert sorted(records) == sorted(f"gsm8k/train/{i}" for i in range(12))
    for out in (a, b):
        assert_same_run(out, straight)
        assert json.loads(out.with_name("pairs.summary.json").read_text())["sessions"] == 2

    # --num-pairs on two ranks: they stop once both together have enough (one extra at most), and
    # leave plain files in problem order that one process continues (the rollouts of the problems
    # in flight at the stop were dropped and are redone, so only the token totals differ).
    torchrun("sample.py", [*sample_args(answering, c, 12), "--num-pairs", 2])
    kept = [r["id"] for r in dist.read_all(c)]
    assert 2 <= len(kept) <= 3 and kept == [i for i in ids if i in kept]
    assert sorted(p.name for p in c.parent.iterdir()) == sorted(p.name for p in straight.parent.iterdir())  # no parts left
    assert sample.main(sample_args(answering, c, 12)) == 0
    assert_same_run(c, straight, totals=False)


def test_rank_one_writes_only_its_parts_and_one_process_finishes(tok, tmp_path, monkeypatch):  # noqa: F811
    # Rank 1 of 2 in this process (no process group: the barrier is a no-op), as if rank 0 was
    # killed before writing anything; then one process continues.
    problems, script = problems_and_script()
    files = RunFiles(tmp_path / "run" / "pairs.jsonl")
    monkeypatch.setattr(dist, "barrier", lambda world: None)
    part = stage1(problems, tok, ScriptedEngine(tok, script), files, Stage1Options(), "tiny", progress=False, world=dist.World(1, 2, 1))
    # Its share is every second problem (indices 1, 3, 5 of 7), none of them a pair: no pairs part either.
    assert sorted(p.name for p in files.pairs.parent.iterdir()) == ["pairs.rank1.done", "pairs.skipped.rank1.jsonl", "pairs.summary.rank1.json"]
    assert [r["id"] for r in dist.read_all(files.skipped)] == ["t/2", "t/4", "t/6"] and not dist.read_all(files.pairs)
    assert set(part) == {"part", "rollout_tokens", "teacher_tokens", "generation_seconds", "target_bytes", "target_rows"}

    summary = stage1(problems, tok, ScriptedEngine(tok, script), files, Stage1Options(), "tiny", progress=False)
    ref = RunFiles(tmp_path / "ref" / "pairs.jsonl")
    want = stage1(problems, tok, ScriptedEngine(tok, script), ref, Stage1Options(), "tiny", progress=False)
    assert sorted(p.name for p in files.pairs.parent.iterdir()) == ["pairs.jsonl", "pairs.skipped.jsonl", "pairs.summary.json"]
    assert files.pairs.read_bytes() == ref.pairs.read_bytes() and files.skipped.read_bytes() == ref.skipped.read_bytes()
    assert {k: v for k, v in summary.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}
    assert summary["sessions"] == 2  # the killed two-rank session and this one


def test_a_merge_killed_before_deleting_the_parts_counts_nothing_twice(tmp_path):
    files = RunFiles(tmp_path / "pairs.jsonl")
    records = [{"id": f"p{i}", "dataset": "gsm8k"} for i in range(4)]
    order = ["p3", "p2", "p1", "p0"]
    part, summary_part = dist.part_path(files.pairs, 1), dist.part_path(files.summary, 1)

    def leftovers():  # what rank 1 of a two-rank session leaves: its records and its totals
        part.write_text("".join(json.dumps(r) + "\n" for r in records[1::2]))
        summary_part.write_text(json.dumps({"part": "x1", "rollout_tokens": 10, "teacher_tokens": 5, "generation_seconds": 1.5}))

    files.pairs.write_text("".join(json.dumps(r) + "\n" for r in records[::2]))
    files.skipped.write_text("")
    leftovers()
    assert [r["id"] for r in dist.merge(files.pairs, order)] == order and not part.exists()
    first = merge_summaries(files, *read_done(files))
    assert first["rollout_tokens"] == 10 and first["pairs_kept"] == 4 and first["merged_parts"] == ["x1"]
    merged = files.pairs.read_bytes()

    leftovers()  # as if both merges were killed after writing, before deleting the parts
    pairs, skipped = read_done(files)
    assert [r["id"] for r in pairs] == order  # each record once
    assert merge_summaries(files, pairs, skipped) is None and not summary_part.exists()
    assert json.loads(files.summary.read_text()) == first  # the totals once
    assert dist.merge(files.pairs, order) == pairs and files.pairs.read_bytes() == merged and not part.exists()


def test_part_lines_count_what_the_other_ranks_append(tmp_path):
    out = tmp_path / "pairs.jsonl"
    dist.part_path(out, 1).write_text('{"id": "old"}\n')  # a killed session's: counted already
    count = dist.PartLines(out, dist.World(0, 3, 0))
    dist.part_path(out, 0).write_text('{"id": "mine"}\n')  # this rank's own: not counted here
    assert count.new() == 0
    with open(dist.part_path(out, 1), "a") as f:
        f.write('{"id": "a"}\n{"id": "b"}\n{"id": "c", "torn')
    dist.part_path(out, 2).write_text('{"id": "d"}\n')
    assert count.new() == 3
    with open(dist.part_path(out, 1), "a") as f:
        f.write('"}\n')
    assert count.new() == 4 and dist.PartLines(out, dist.World()).new() == 0


# ----------------------------------------------------------------------------- eval.py


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dist_eval")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(7)))
    return tiny_model_dir, problems, make_adapter(tiny_model_dir, root / "a", seed=1)


def eval_args(eval_setup, out: Path, *extra) -> list[str]:
    model, problems, adapter = eval_setup
    # Sampled, so that the per-problem seeds matter too; 2 samples each.
    return [str(a) for a in ("--model", model, "--datasets", "gsm8k", "--data", f"gsm8k={problems}", "--adapter", f"a={adapter}",
                             "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", 8, "--samples", 2, "--temperature", 1.0,
                             "--seed", 3, "--batch-size", 4, "--out", out, "--no-progress", *extra)]


def assert_same_eval(got: Path, want: Path) -> None:
    assert listing(got) == listing(want)
    for name in ("base__gsm8k.jsonl", "a__gsm8k.jsonl", "base__gsm8k.run.json", "a__gsm8k.run.json"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    rows = lambda d: [{k: v for k, v in r.items() if k not in SESSION} for r in json.loads((d / "results.json").read_text())["results"]]  # noqa: E731
    assert rows(got) == rows(want)


def test_eval_two_ranks_write_the_one_process_files_and_one_process_continues(eval_setup, tmp_path):
    evaluate = load("eval.py")
    two, one, straight = tmp_path / "two", tmp_path / "one", tmp_path / "straight"
    run = torchrun("eval.py", eval_args(eval_setup, two, "--limit", 5))
    assert "base gsm8k: 5 problems" in run.stdout and "a gsm8k: 5 problems" in run.stdout  # rank 0's line, both ranks' count
    assert run.stdout.count("wrote ") == 1  # one table, by rank 0
    assert evaluate.main(eval_args(eval_setup, one, "--limit", 5)) == 0
    assert_same_eval(two, one)

    assert evaluate.main(eval_args(eval_setup, two)) == 0  # one process does the 2 problems left
    assert evaluate.main(eval_args(eval_setup, straight)) == 0
    assert_same_eval(two, straight)
    assert [r["id"] for r in dist.read_all(two / "a__gsm8k.jsonl")] == [f"gsm8k/problems/{i}" for i in range(7)]

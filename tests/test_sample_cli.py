"""sample.py end to end on CPU: a tiny random model, local problems, SIGKILL + restart, bad input."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minissb.runs import read_jsonl
from minissb.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
# One thread: a tiny model gains nothing from more, and on a busy 2-core machine it runs ~10x faster.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_problems(path, n):
    rows = [{"question": f"Sam has {i} pens and buys {i + 2} more. How many pens does he have?", "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cli_model"), seed=3)


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def sample(*args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120, **kw)


def test_help_documents_every_option():
    out = sample("--help")
    assert out.returncode == 0
    help_text = " ".join(out.stdout.split())
    parser = load_sample_module().build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in help_text, flag
        if action.help is not None and action.dest != "help":
            assert " ".join(action.help.split())[:40] in help_text, action.dest  # every option has its text


def test_kill_and_restart_loses_and_duplicates_nothing(model_dir, tmp_path):
    n = 16
    data = write_problems(tmp_path / "problems.jsonl", n)
    out = tmp_path / "run" / "pairs.jsonl"
    # fp32: in bf16 a matmul over another set of rows can round a logit differently and flip a sample.
    args = ["--model", model_dir, "--data", data, "--out", out, "--batch-size", 4, "--max-new-tokens", 48, "--dtype", "fp32", "--no-progress"]
    skipped = out.with_name("pairs.skipped.jsonl")

    proc = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *map(str, args)], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if skipped.is_file() and skipped.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]  # still running: the kill lands mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = len(read_jsonl(skipped)) + (len(read_jsonl(out)) if out.is_file() else 0)
    assert 2 <= done_at_kill < n

    # A restart with other arguments refuses and leaves the files alone.
    before = snapshot(out.parent)
    refused = sample(*args, "--k", 3)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and refused.stderr.startswith("error: ")
    assert "num_rollouts: 4 there, 3 now" in refused.stderr
    assert snapshot(out.parent) == before

    done = sample(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    ids = [r["id"] for r in read_jsonl(out) + read_jsonl(skipped)]
    assert sorted(ids) == sorted(f"gsm8k/train/{i}" for i in range(n))  # each problem exactly once
    summary = json.loads(out.with_name("pairs.summary.json").read_text())
    assert summary["problems_seen"] == n and summary["sessions"] == 2
    assert sum(summary["skipped"].values()) + summary["pairs_kept"] == n
    assert summary["rollout_tokens"] > 0
    assert "problems seen:     16" in done.stdout and "tokens/s" in done.stdout
    config = json.loads(out.with_name("pairs.run.json").read_text())
    assert config["num_rollouts"] == 4 and config["dtype"] == "fp32" and config["model"] == str(model_dir.resolve())
    for r in read_jsonl(skipped):
        assert r["reason"] in ("all_correct", "all_wrong", "no_answer", "teacher_wrong", "truncated", "leak", "copy")
        assert r["rollouts"]["k"] == 4 and len(r["rollouts"]["answers"]) == 4

    # Record for record what an uninterrupted run writes, with another pool size too: a problem's
    # samples depend on the run seed and the problem alone, not on what shared the pool with it.
    straight = tmp_path / "straight" / "pairs.jsonl"
    other = [str(a) for a in args]
    other[other.index(str(out))] = str(straight)
    other[other.index("--batch-size") + 1] = "12"
    assert sample(*other).returncode == 0
    key = lambda path: sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(path))  # noqa: E731
    assert key(straight) == key(out)
    assert key(straight.with_name("pairs.skipped.jsonl")) == key(skipped)


@pytest.fixture
def existing_run(tmp_path):
    """An output dir with records already in it: no bad invocation may change a byte of it."""
    out = tmp_path / "old" / "pairs.jsonl"
    out.parent.mkdir()
    out.write_text('{"id": "gsm8k/x/0", "solution_ids": [1]}\n')
    out.with_name("pairs.skipped.jsonl").write_text('{"id": "gsm8k/x/1", "reason": "no_answer"}\n')
    out.with_name("pairs.run.json").write_text("{}\n")
    return out


@pytest.mark.parametrize(
    "case, message",
    [
        ("malformed", ":2: malformed JSON"),
        ("missing", "row 1 has no answer column"),
        ("dataset", "unknown dataset 'gsm9k'"),
        ("model", "does not exist"),
        ("options", "argument --k: must be an integer >= 2, got '1'"),
        ("mismatch", "was written with other arguments"),
    ],
)
def test_bad_input_is_one_line_error_and_nothing_is_lost(case, message, model_dir, existing_run, tmp_path, capsys):
    data = write_problems(tmp_path / "ok.jsonl", 3)
    args = {"--model": model_dir, "--data": data, "--out": existing_run}
    if case == "malformed":
        lines = data.read_text().splitlines()
        lines[1] = lines[1][:-5]
        data.write_text("\n".join(lines) + "\n")
    elif case == "missing":
        data.write_text('{"question": "q0", "answer": "#### 1"}\n{"question": "q1"}\n')
    elif case == "dataset":
        args["--dataset"] = "gsm9k"
    elif case == "model":
        args["--model"] = tmp_path / "no_such_model"
    elif case == "options":
        args["--k"] = 1
    before = {p: p.read_bytes() for p in existing_run.parent.iterdir()}
    argv = [str(x) for kv in args.items() for x in kv]
    if case == "options":  # refused while parsing: argparse's exit status 2
        with pytest.raises(SystemExit) as exit_info:
            load_sample_module().main(argv)
        assert exit_info.value.code == 2
    else:
        assert load_sample_module().main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert {p: p.read_bytes() for p in existing_run.parent.iterdir()} == before


def test_out_that_is_a_directory_or_under_a_file_is_one_error_line(model_dir, tmp_path):
    data = write_problems(tmp_path / "ok.jsonl", 2)
    (tmp_path / "d" / "pairs.jsonl").mkdir(parents=True)
    (tmp_path / "f").write_text("")
    for out, message in ((tmp_path / "d" / "pairs.jsonl", "is a directory"), (tmp_path / "f" / "pairs.jsonl", "is a file")):
        run = sample("--model", model_dir, "--data", data, "--out", out, "--dtype", "fp32")
        assert run.returncode == 1 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
        assert message in run.stderr

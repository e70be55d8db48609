"""The failure paths a user hits (issue 15), through the real scripts: one `error:` line, the exit
status, nothing written before lost, and a rerun of the same command that continues.

Faults that cannot be arranged from outside (a kill at a chosen step, a full disk) are injected
into a real `python train.py ...` / `python eval.py ...` process by a few lines run before the
script (`inject=`); a read-only file system is a real one, mounted in a private namespace
(skipped where `unshare` cannot do that).
"""

import errno
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minissb.lora import BaseModelMismatchWarning, apply_lora, load_adapter, save_adapter
from minissb.model import from_pretrained, load_config
from minissb.prompts import student_chat
from minissb.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TIMING = ("tokens_per_s", "step_time_s", "elapsed_s", "cuda_max_mem_gb")


def run(script, *args, inject=None, umask=None, wrap=None):
    """`python <script> args` (with `inject` run first in the same process), as a shell would."""
    argv = [str(REPO / script), *map(str, args)]
    if inject is None:
        cmd = [sys.executable, *argv]
    else:
        code = f"{inject}\nimport runpy, sys\nsys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')"
        cmd = [sys.executable, "-c", code]
    if wrap is not None:
        cmd = wrap(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300,
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def one_error_line(proc, status=1):
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("failures")
    tok = Tokenizer.from_dir(tiny_model_dir)
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as f:
        for i in range(4):
            q, sol = f"What is {i} + 3?", f"{i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}."
            f.write(json.dumps({"id": f"gsm8k/train/{i}", "question": q, "gold": str(i + 3), "student_chat": student_chat(q),
                                "teacher_chat": [{"role": "user", "content": f"{q} Hint: {i + 3}."}],
                                "solution": sol, "solution_ids": tok.encode(sol), "finish_reason": "stop"}) + "\n")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(3)))
    adapter = root / "adapter"
    model = from_pretrained(tiny_model_dir, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    save_adapter(model, adapter, base_model=str(tiny_model_dir))
    return {"root": root, "model": tiny_model_dir, "pairs": pairs, "problems": problems, "adapter": adapter}


def train_args(s, out, *extra):
    return [str(a) for a in ["--pairs", s["pairs"], "--model", s["model"], "--out", out, "--device", "cpu", "--dtype", "fp32",
            "--teacher", "online", "--lora-r", "4", "--batch-size", "1", "--epochs", "2", "--no-progress", *extra]]


def eval_args(s, out, *extra):
    return [str(a) for a in ["--model", s["model"], "--datasets", "gsm8k", "--data", f"gsm8k={s['problems']}", "--dtype", "fp32",
            "--device", "cpu", "--max-new-tokens", "6", "--out", out, "--no-progress", *extra]]


def sample_args(s, out, *extra):
    return [str(a) for a in ["--model", s["model"], "--data", s["problems"], "--dataset", "gsm8k", "--limit", "2", "--k", "2",
            "--num-pairs", "1", "--max-new-tokens", "4", "--dtype", "fp32", "--device", "cpu", "--out", out,
            "--no-progress", *extra]]


ARGS = {"train.py": train_args, "eval.py": eval_args, "sample.py": sample_args}


@pytest.fixture(scope="module")
def reference_train(setup):
    """An uninterrupted train.py run (8 steps, no checkpoint): what every restarted run must equal."""
    out = setup["root"] / "reference_train"
    proc = run("train.py", *train_args(setup, out, "--save-every", "0"))
    assert proc.returncode == 0, proc.stderr
    return out


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_adapter(a: Path, b: Path):
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------- broken model and adapter files


def broken_model(root: Path, name: str, tiny_model_dir: Path, break_it) -> Path:
    path = root / name
    if not path.exists():
        shutil.copytree(tiny_model_dir, path)
        break_it(path)
    return path


def truncate_weights(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def random_weights(path):
    (path / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy().tobytes())


def edit_config(change):
    def apply(path):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(change(cfg)))
    return apply


BROKEN = {
    "truncated": (truncate_weights, r"model.safetensors: not a readable safetensors file .*truncated or corrupt"),
    "random": (random_weights, r"model.safetensors: not a readable safetensors file"),
    "string_number": (edit_config(lambda c: {**c, "hidden_size": "64"}), r"config.json: hidden_size must be an integer, got '64'"),
    "list_config": (edit_config(lambda c: [c]), r"config.json: expected a JSON object, got a list"),
    "zero_heads": (edit_config(lambda c: {**c, "num_key_value_heads": 0}), r"config.json: num_key_value_heads must be a finite number > 0"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_model_files_are_one_error_in_the_library(tmp_path, tiny_model_dir, kind):
    break_it, message = BROKEN[kind]
    path = broken_model(tmp_path, kind, tiny_model_dir, break_it)
    with pytest.raises(ValueError, match=message) as e:
        from_pretrained(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("script, kind", [("train.py", "truncated"), ("eval.py", "random"), ("sample.py", "truncated"),
                                          ("train.py", "string_number"), ("eval.py", "list_config"), ("sample.py", "list_config")])
def test_broken_model_files_are_one_error_line_in_every_script(setup, tiny_model_dir, script, kind):
    break_it, message = BROKEN[kind]
    model = broken_model(setup["root"], kind, tiny_model_dir, break_it)
    out = setup["root"] / f"out-{script}-{kind}"
    args = [a if a != str(setup["model"]) else str(model) for a in map(str, ARGS[script](setup, out / "pairs.jsonl" if script == "sample.py" else out))]
    line = one_error_line(run(script, *args))
    assert str(model) in line and re.search(message, line), line


def test_broken_adapter_files_are_one_error_line(setup, tmp_path):
    for name, damage in [("truncated", lambda b: b[: len(b) // 3]), ("random", lambda b: bytes(reversed(b)))]:
        adapter = tmp_path / name
        shutil.copytree(setup["adapter"], adapter)
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
        with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
            load_adapter(from_pretrained(setup["model"], dtype=torch.float32), adapter)
    out = tmp_path / "eval"
    line = one_error_line(run("eval.py", *eval_args(setup, out, "--adapter", tmp_path / "truncated")))
    assert f"{tmp_path / 'truncated' / 'adapter_model.safetensors'}: not a readable safetensors file" in line
    assert not out.exists()  # found before the base model was evaluated
    (tmp_path / "truncated" / "adapter_config.json").write_text("[1, 2]")
    line = one_error_line(run("eval.py", *eval_args(setup, out, "--adapter", tmp_path / "truncated")))
    assert "adapter_config.json: expected a JSON object, got a list" in line


def test_load_config_checks_types_and_keeps_good_configs(tiny_model_dir):
    cfg = load_config(tiny_model_dir)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.tie_word_embeddings) == (64, 2, True)


# ----------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py"])
def test_an_output_path_under_a_file_is_one_error_line(setup, tmp_path, script):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    out = blocker / "sub" / ("pairs.jsonl" if script == "sample.py" else "run")
    line = one_error_line(run(script, *ARGS[script](setup, out)))
    assert "a_file" in line
    assert blocker.read_text() == "mine\n"  # untouched
    if script != "sample.py":  # train.py and eval.py say so before the model loads
        assert "which is a file: pass a directory" in line
        line = one_error_line(run(script, *ARGS[script](setup, blocker)))
        assert line == f"error: --out {blocker} is a file: pass a directory"


def _read_only_mount(folder: Path):
    def wrap(cmd):
        script = f'mount -t tmpfs -o ro tmpfs "{folder}" && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, "sh", *cmd]
    return wrap


@pytest.fixture(scope="module")
def read_only_ok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ro_probe")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(_read_only_mount(folder)(["true"]), capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {probe.stderr.decode().strip()}")


@pytest.mark.parametrize("script", ["train.py", "eval.py", "sample.py"])
def test_an_output_on_a_read_only_file_system_is_one_error_line(setup, tmp_path, read_only_ok, script):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / ("pairs.jsonl" if script == "sample.py" else "run")
    line = one_error_line(run(script, *ARGS[script](setup, out), wrap=_read_only_mount(ro)))
    assert "read-only file system" in line and str(ro) in line


# ----------------------------------------------------------------------------- kills and full disks


KILL_AT_STEP_3 = """
import os, signal, minissb.training as d
real = d.lr_at
def lr_at(step, *args):
    if step == 2:  # steps 1 and 2 are in metrics.jsonl, no checkpoint yet
        os.kill(os.getpid(), signal.SIGKILL)
    return real(step, *args)
d.lr_at = lr_at
"""


def full_disk_for(fragment: str, after: int = 0) -> str:
    """fsync of a file whose path holds `fragment` fails with ENOSPC (a write's error names no file), after `after` successes."""
    return f"""
import errno, os
real, seen = os.fsync, []
def fsync(fd):
    if {fragment!r} in os.readlink(f"/proc/self/fd/{{fd}}"):
        seen.append(fd)
        if len(seen) > {after}:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(fd)
os.fsync = fsync
"""


def test_train_killed_before_its_first_checkpoint_reruns_to_the_same_result(setup, reference_train, tmp_path):
    out = tmp_path / "run"
    args = train_args(setup, out, "--save-every", "0")
    proc = run("train.py", *args, inject=KILL_AT_STEP_3)
    assert proc.returncode == -9, proc.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2] and (out / "run.json").is_file()
    proc = run("train.py", *[a for a in args if a != "--no-progress"])  # the same command: starts over
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoint of the earlier run (it stopped before writing one): starting over" in proc.stdout
    assert metrics(out) == metrics(reference_train)
    assert same_adapter(out / "adapter", reference_train / "adapter")


def test_train_after_a_full_disk_mid_checkpoint_reruns_and_cleans_up(setup, reference_train, tmp_path):
    out = tmp_path / "run"
    args = train_args(setup, out, "--save-every", "3", "--keep-checkpoints", "0")
    # The first checkpoint (step 3) is written; the second (step 6) runs out of space half way.
    proc = run("train.py", *args, inject=full_disk_for(".step-000006.tmp"))
    line = one_error_line(proc)
    assert ".step-000006.tmp" in line and "no space left on the device" in line and "rerun the same command" in line
    assert temporaries(out) and [d.name for d in (out / "checkpoints").iterdir() if not d.name.startswith(".")] == ["step-000003"]
    kept = snapshot(out / "checkpoints" / "step-000003")
    proc = run("train.py", *[a for a in args if a != "--no-progress"])  # the same command: continues from step 3
    assert proc.returncode == 0, proc.stderr
    assert "resuming from step 3 of 8" in proc.stdout
    assert not temporaries(out)
    assert snapshot(out / "checkpoints" / "step-000003") == kept
    assert metrics(out) == metrics(reference_train)
    assert same_adapter(out / "adapter", reference_train / "adapter")


def test_eval_after_a_full_disk_names_the_file_and_reruns(setup, tmp_path):
    straight = tmp_path / "straight"
    assert run("eval.py", *eval_args(setup, straight)).returncode == 0
    out = tmp_path / "eval"
    (out).mkdir()
    (out / "results.json.tmp").write_bytes(b"")  # what an older version left after a full disk
    line = one_error_line(run("eval.py", *eval_args(setup, out), inject=full_disk_for("base__gsm8k.jsonl", after=1)))
    assert line == f"error: {out / 'base__gsm8k.jsonl'}: no space left on the device: free some space, then rerun the same command to continue"
    assert len((out / "base__gsm8k.jsonl").read_text().splitlines()) == 2  # what was fsynced stays
    proc = run("eval.py", *eval_args(setup, out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "base__gsm8k.jsonl").read_bytes() == (straight / "base__gsm8k.jsonl").read_bytes()
    assert not temporaries(out)


# ----------------------------------------------------------------------------- options


BAD_NUMBERS = [
    ("train.py", "--temperature", "nan"), ("train.py", "--kd-weight", "nan"), ("train.py", "--lora-alpha", "0"),
    ("train.py", "--lora-alpha", "nan"), ("train.py", "--lr", "inf"), ("train.py", "--max-grad-norm", "nan"),
    ("train.py", "--save-every", "-1"), ("train.py", "--keep-checkpoints", "-1"), ("train.py", "--lora-dropout", "1"),
    ("train.py", "--seed", "-3"), ("train.py", "--micro-batch-size", "0"),
    ("eval.py", "--temperature", "nan"), ("eval.py", "--temperature", "inf"), ("eval.py", "--top-p", "2"),
    ("eval.py", "--top-p", "nan"), ("eval.py", "--top-p", "0"), ("eval.py", "--top-k", "-5"), ("eval.py", "--limit", "0"),
    ("eval.py", "--max-new-tokens", "0"), ("eval.py", "--samples", "0"),
]


def script_module(script):
    spec = importlib.util.spec_from_file_location(f"{script[:-3]}_cli_failures", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, option, value", BAD_NUMBERS)
def test_a_bad_number_is_refused_while_parsing(setup, tmp_path, capsys, script, option, value):
    with pytest.raises(SystemExit) as exit_info:
        script_module(script).build_parser().parse_args(ARGS[script](setup, tmp_path / "out", option, value))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: argument {option}: must be ") and repr(value) in lines[0], lines


@pytest.mark.parametrize("script, option, value", [("train.py", "--lora-alpha", "0"), ("eval.py", "--top-k", "-5")])
def test_a_bad_number_stops_the_script_before_anything_is_written(setup, tmp_path, script, option, value):
    out = tmp_path / "out"
    line = one_error_line(run(script, *ARGS[script](setup, out, option, value)), status=2)
    assert line.startswith(f"error: argument {option}: must be ")
    assert not out.exists()


def test_eval_refuses_a_dataset_named_twice(setup, tmp_path):
    line = one_error_line(run("eval.py", *eval_args(setup, tmp_path / "o"), "--datasets", "gsm8k,gsm8k"))
    assert line == "error: --datasets names gsm8k twice: list each dataset once"
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- run identity and warnings


def eval_cli():
    return script_module("eval.py")


def test_a_greedy_rerun_ignores_the_seed_but_a_sampled_one_does_not(setup, tmp_path, capsys):
    cli, out = eval_cli(), tmp_path / "eval"
    assert cli.main(eval_args(setup, out, "--limit", "2")) == 0
    before = (out / "base__gsm8k.jsonl").read_bytes()
    assert cli.main(eval_args(setup, out, "--seed", "7")) == 0  # greedy: the seed cannot matter, so it continues
    assert (out / "base__gsm8k.jsonl").read_bytes().startswith(before)
    capsys.readouterr()
    sampled = tmp_path / "sampled"
    assert cli.main(eval_args(setup, sampled, "--temperature", "0.7", "--limit", "1")) == 0
    capsys.readouterr()
    assert cli.main(eval_args(setup, sampled, "--temperature", "0.7", "--seed", "7")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "seed: 0 there, 7 now" in err and err.count("\n") == 1


def test_a_data_file_edited_in_place_is_another_run(setup, tmp_path, capsys):
    cli, out = eval_cli(), tmp_path / "eval"
    data = tmp_path / "problems.jsonl"
    shutil.copy(setup["problems"], data)
    args = lambda: [a if not a.startswith("gsm8k=") else f"gsm8k={data}" for a in map(str, eval_args(setup, out))]  # noqa: E731
    assert cli.main(args()) == 0
    assert json.loads((out / "base__gsm8k.run.json").read_text())["data_sha256"]
    capsys.readouterr()
    before = snapshot(out)
    data.write_text(data.read_text().replace("What is 1 + 1?", "What is 1 + 2?"))  # same name, new content
    assert cli.main(args()) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data_sha256:" in err and err.count("\n") == 1
    assert snapshot(out) == before


def test_an_adapter_for_another_base_model_with_the_same_shapes_warns(setup, tmp_path, capsys):
    other = tmp_path / "Other-Model-7B"
    shutil.copytree(setup["model"], other)  # the same shapes under another name
    model = from_pretrained(other, dtype=torch.float32)
    with pytest.warns(BaseModelMismatchWarning, match=rf"trained on base model {setup['model']}, but is loaded into {other}"):
        load_adapter(model, setup["adapter"], base_model=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(from_pretrained(setup["model"]), setup["adapter"], base_model=setup["model"])  # the same model: quiet
    proc = run("eval.py", *eval_args(setup, tmp_path / "eval", "--no-base", "--adapter", setup["adapter"], "--limit", "1"))
    assert proc.returncode == 0, proc.stderr
    proc = run("eval.py", *[a if a != str(setup["model"]) else str(other) for a in
                            map(str, eval_args(setup, tmp_path / "eval2", "--no-base", "--adapter", setup["adapter"], "--limit", "1"))])
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and str(setup["model"]) in warned[0] and str(other) in warned[0], proc.stderr


# ----------------------------------------------------------------------------- input data


@pytest.mark.parametrize("content, message", [
    (b'{"question": "q1", "answer": "2"}\n{"question": "q2", "answ', r"in\.jsonl:2: malformed JSON"),
    (b'{"question": "q1", "answer": "2"}\n{"question": "q\xff", "answer": "3"}\n', r"in\.jsonl:2: not UTF-8 text"),
    (b'{"question": "q1", "answer": {"value": 2}}\n', r"in\.jsonl: row 0: 'answer' is a dict"),
])
def test_a_bad_input_data_file_is_one_error_line(setup, tmp_path, content, message):
    data = tmp_path / "in.jsonl"
    data.write_bytes(content)
    args = [a if not a.startswith("gsm8k=") else f"gsm8k={data}" for a in map(str, eval_args(setup, tmp_path / "o"))]
    line = one_error_line(run("eval.py", *args))
    assert re.search(message, line), line
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- permissions


def test_written_files_get_the_usual_mode(setup, tmp_path):
    out = tmp_path / "run"
    proc = run("train.py", *train_args(setup, out, "--save-every", "4", "--max-steps", "4"), umask=0o027)
    assert proc.returncode == 0, proc.stderr
    files = [out / "adapter" / "adapter_model.safetensors", out / "adapter" / "adapter_config.json", out / "run.json",
             out / "metrics.jsonl", *(out / "checkpoints" / "step-000004").rglob("*.*")]
    ev = tmp_path / "eval"
    proc = run("eval.py", *eval_args(setup, ev, "--limit", "1"), umask=0o027)
    assert proc.returncode == 0, proc.stderr
    files += [ev / "results.json", ev / "base__gsm8k.run.json", ev / "base__gsm8k.jsonl"]
    modes = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files if f.is_file()}
    assert len(modes) >= 9 and set(modes.values()) == {"0o640"}, modes  # 0666 & ~027, not mkstemp's 0600


def test_os_error_lines_name_the_file_and_say_what_to_do():
    from minissb.runs import os_error_line

    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == \
        "/mnt/x: read-only file system: choose an output path on a writable disk"
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the device")
    assert os_error_line(OSError(errno.EIO, "Input/output error", "/d/f")) == "/d/f: Input/output error"

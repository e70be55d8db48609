"""train.py as a user runs it: a subprocess on the tiny model, its outputs, --help, and bad input."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minissb.lora import load_adapter, lora_modules
from minissb.model import from_pretrained
from minissb.prompts import student_chat
from minissb.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
# No network, and one thread each: the tiny model gains nothing from more, and the suite runs beside others.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_train(*args, cwd=None):
    return subprocess.run([sys.executable, str(TRAIN), *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def write_pairs(path, tok, solutions):
    with open(path, "w") as f:
        for i, solution in enumerate(solutions):
            question = f"What is {i} + 3?"
            f.write(json.dumps({
                "id": f"gsm8k/train/{i}", "dataset": "gsm8k", "question": question, "gold": str(i + 3),
                "student_chat": student_chat(question),
                "teacher_chat": [{"role": "user", "content": f"{question} Hint: it is {i + 3}."}],
                "solution": solution, "solution_ids": tok.encode(solution), "finish_reason": "stop",
                "rollouts": {"k": 4, "n_correct": 2, "n_wrong": 2, "n_no_answer": 0, "answers": ["1", "2", "3", "4"],
                             "correct_index": 0, "wrong_index": 1, "wrong_answer": "2"},
                "model": "tiny",
            }) + "\n")
    return path


def one_error_line(proc):
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    pairs = write_pairs(tmp_path / "pairs.jsonl", tok, [f"{i} + 3 = {i + 3}. The answer is \\boxed{{{i + 3}}}." for i in range(5)])
    out = tmp_path / "run"
    plot = importlib.util.find_spec("matplotlib") is not None
    proc = run_train("--pairs", pairs, "--model", tiny_model_dir, "--out", out, "--device", "cpu", "--dtype", "fp32",
                     "--teacher", "online", "--epochs", "2", "--batch-size", "2", "--micro-batch-size", "1", "--lora-r", "4",
                     "--save-every", "2", "--grad-checkpointing", *(["--plot"] if plot else []))
    assert proc.returncode == 0, proc.stderr
    assert "5 pairs, 3 steps/epoch x 2 epochs -> 6 steps" in proc.stdout + proc.stderr

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]
    for m in lines:
        assert {"loss", "kl", "ce", "grad_norm", "lr", "tokens_per_s", "completion_len"} <= m.keys()
        assert all(isinstance(m[k], (int, float)) and m[k] == m[k] for k in ("loss", "kl", "ce", "grad_norm", "lr"))
    assert (out / "checkpoints" / "step-000006" / "state.pt").is_file()
    assert json.loads((out / "run.json").read_text())["total_steps"] == 6

    # The adapter is a PEFT directory that loads back into the base model, and training moved it.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 32)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = load_adapter(from_pretrained(tiny_model_dir, dtype=torch.float32), out / "adapter")
    assert all(m.lora_B.abs().sum() > 0 for _, m in lora_modules(model))
    if plot:
        assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def train_module():
    sys.path.insert(0, str(REPO))
    try:
        import train
    finally:
        sys.path.remove(str(REPO))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train
    torch.set_num_threads(before)


def test_help_documents_every_option(train_module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = [a for a in train_module.build_parser()._actions if a.option_strings]
    assert len(options) > 30
    for action in options:
        assert action.help and len(action.help) > 5, action.option_strings
        assert action.option_strings[-1] in text
    for default in ("Qwen/Qwen2.5-3B-Instruct", "0.0002", "(default: 32)", "(default: 2.0)", "(default: 3)", "(default: 4)"):
        assert default in text  # the paper's settings are the defaults


def main_error(train_module, capsys, *args):
    """Run train.main in-process (the same path as the script, without a new interpreter) -> its error line."""
    assert train_module.main([*map(str, args), "--no-progress"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_input_gives_one_error_line(tmp_path, tiny_model_dir, train_module, capsys):
    tok = Tokenizer.from_dir(tiny_model_dir)
    common = ("--model", tiny_model_dir, "--device", "cpu", "--dtype", "fp32", "--teacher", "online")
    good = write_pairs(tmp_path / "good.jsonl", tok, ["4 = 4. \\boxed{4}"] * 3)

    # One real process: the exit status and stderr a shell sees.
    bad = tmp_path / "bad.jsonl"
    lines = good.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    assert "bad.jsonl:2: malformed JSON" in one_error_line(run_train("--pairs", bad, "--out", tmp_path / "b", *common))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "is empty" in main_error(train_module, capsys, "--pairs", empty, "--out", tmp_path / "a", *common)

    long = write_pairs(tmp_path / "long.jsonl", tok, ["1 + 1 = 2. " * 40 + "\\boxed{2}"])
    msg = main_error(train_module, capsys, "--pairs", long, "--out", tmp_path / "c", "--max-seq-len", "200", *common)
    assert "long.jsonl:1 (id gsm8k/train/0)" in msg and "--max-seq-len 200" in msg and "--truncate" in msg

    # A learning rate of 1e30 blows the adapter up within a couple of steps.
    msg = main_error(train_module, capsys, "--pairs", good, "--out", tmp_path / "d", "--lr", "1e30", "--epochs", "3",
                     "--batch-size", "1", "--warmup-ratio", "0", *common)
    assert "non-finite" in msg and "at step" in msg and "gsm8k/train/" in msg

    assert "holds no training run to continue" in main_error(train_module, capsys, "--pairs", good, "--out", tmp_path / "e",
                                                             "--resume", *common)
    assert "--micro-batch-size" in main_error(train_module, capsys, "--pairs", good, "--out", tmp_path / "f",
                                              "--micro-batch-size", "8", *common)

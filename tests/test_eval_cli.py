"""eval.py: options, a base + adapters run on a tiny model, resuming, and one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minissb.data import DATASETS
from minissb.evaluate import DEFAULT_MAX_NEW_TOKENS
from minissb.lora import apply_lora, save_adapter
from minissb.model import Qwen2Config, Qwen2ForCausalLM, from_pretrained, init_weights

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
eval_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eval_cli)


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "eval.py"), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def make_adapter(model_dir, out, seed, scale=0.3):
    """A LoRA adapter with random (non-zero) B, so it changes the model's outputs."""
    model = from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, out, base_model=str(model_dir))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("eval_cli")
    problems = root / "problems.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    adapter_a = make_adapter(tiny_model_dir, root / "a", seed=1)
    adapter_b = make_adapter(tiny_model_dir, root / "b", seed=2)
    return {"model": tiny_model_dir, "problems": problems, "a": adapter_a, "b": adapter_b}


def base_args(setup, out, *extra):
    return ["--model", str(setup["model"]), "--datasets", "gsm8k", "--data", f"gsm8k={setup['problems']}", "--dtype", "fp32",
            "--device", "cpu", "--max-new-tokens", "8", "--out", str(out), "--no-progress", *map(str, extra)]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_help_documents_every_option():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for action in eval_cli.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in out.stdout
        assert action.help, f"{action.option_strings} has no help text"
    assert "gsm8k 1024, math500 2048, aime24 4096" in " ".join(out.stdout.split())
    # eval.py keeps literal copies so that --help needs no torch: they must match minissb's.
    assert eval_cli.DATASET_NAMES == tuple(DATASETS) and eval_cli.DEFAULT_MAX_NEW_TOKENS == DEFAULT_MAX_NEW_TOKENS


def test_base_and_adapter_table_files_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_cli.main(base_args(setup, out, "--adapter", setup["a"], "--limit", "3")) == 0
    printed = capsys.readouterr().out
    assert "base gsm8k: 3 problems" in printed and "a gsm8k: 3 problems" in printed
    assert "pass@1 % [95% CI]" in printed and "95% Wilson score interval" in printed
    assert len(read_jsonl(out / "base__gsm8k.jsonl")) == 3 and len(read_jsonl(out / "a__gsm8k.jsonl")) == 3
    first = {r["model"]: r for r in json.loads((out / "results.json").read_text())["results"]}

    # Without --limit the same command continues with the 2 problems left, in each file.
    assert eval_cli.main(base_args(setup, out, "--adapter", setup["a"])) == 0
    printed = capsys.readouterr().out
    assert "base gsm8k: 2 problems" in printed and "a gsm8k: 2 problems" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["interval"].startswith("95% Wilson")
    rows = {r["model"]: r for r in results["results"]}
    assert set(rows) == {"base", "a"} and rows["base"]["adapter"] is None
    for label, row in rows.items():
        records = read_jsonl(out / f"{label}__gsm8k.jsonl")
        assert [r["id"] for r in records] == [f"gsm8k/problems/{i}" for i in range(5)]
        assert row["problems"] == 5 and row["max_new_tokens"] == 8
        assert row["accuracy"] == sum(r["responses"][0]["correct"] for r in records) / 5
        assert row["mean_tokens"] == sum(r["responses"][0]["tokens"] for r in records) / 5
        assert all(1 <= r["responses"][0]["tokens"] <= 8 for r in records)
    assert rows["a"]["delta_vs_base"] == pytest.approx(rows["a"]["accuracy"] - rows["base"]["accuracy"])
    assert json.loads((out / "a__gsm8k.run.json").read_text())["adapter"] == str(setup["a"])
    # The generation numbers cover both sessions: the first session's 3 problems, the second's 2.
    for label, row in rows.items():
        tokens = sum(r["responses"][0]["tokens"] for r in read_jsonl(out / f"{label}__gsm8k.jsonl"))
        assert row["generated_problems"] == 5 and row["generated_tokens"] == tokens
        assert row["generation_seconds"] > first[label]["generation_seconds"] > 0

    # Everything done: a third run only reads the files and prints the same table; results.json
    # keeps the speed the earlier sessions measured.
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert eval_cli.main(base_args(setup, out, "--adapter", setup["a"])) == 0
    printed = capsys.readouterr().out
    assert " problems, " not in printed and "base" in printed
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_each_adapter_is_evaluated_on_the_base_weights(setup, tmp_path, capsys):
    # Sampling, so that small changes of the logits show up in the responses.
    sampled = ("--samples", "2", "--temperature", "1.0", "--seed", "3", "--limit", "3")
    both = tmp_path / "both"
    assert eval_cli.main(base_args(setup, both, "--adapter", setup["a"], "--adapter", setup["b"], *sampled)) == 0
    assert "avg@2" in capsys.readouterr().out
    only_b = tmp_path / "only_b"
    assert eval_cli.main(base_args(setup, only_b, "--no-base", "--adapter", setup["b"], *sampled)) == 0

    texts = lambda path: [[s["text"] for s in r["responses"]] for r in read_jsonl(path)]  # noqa: E731
    assert all(len(t) == 2 for t in texts(both / "b__gsm8k.jsonl"))
    # b after base and a gives exactly what b alone gives: a's merge did not leak into b's weights.
    assert texts(both / "b__gsm8k.jsonl") == texts(only_b / "b__gsm8k.jsonl")
    # ...and the adapters do change the model.
    assert texts(both / "a__gsm8k.jsonl") != texts(both / "base__gsm8k.jsonl")
    assert not (only_b / "base__gsm8k.jsonl").exists()
    rows = json.loads((both / "results.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["base", "a", "b"] and all(r["samples"] == 2 for r in rows)


def test_changed_generation_arguments_refuse(setup, tmp_path, capsys):
    out = tmp_path / "eval"
    assert eval_cli.main(base_args(setup, out, "--limit", "1")) == 0
    capsys.readouterr()
    assert eval_cli.main(base_args(setup, out, "--limit", "1", "--temperature", "0.5")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "temperature: 0.0 there, 0.5 now" in err and err.count("\n") == 1


def test_unknown_dataset_is_a_one_line_error(tmp_path):
    out = run_cli("--model", tmp_path, "--datasets", "gsm8k,mathh500", "--out", tmp_path / "o")
    assert out.returncode == 1
    assert out.stderr.strip() == "error: unknown dataset 'mathh500': choose from gsm8k, math500, aime24"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "gsm8k=missing.jsonl"], "does not exist"),
        (["--data", "gsm8k"], "write DATASET=PATH"),
        (["--samples", "4"], "set --temperature"),
        (["--no-base"], "--no-base needs at least one --adapter"),
        (["--adapter", "no_such_adapter"], "does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(setup, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert eval_cli.main(base_args(setup, tmp_path / "o", *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # nothing written


def test_adapter_for_another_base_model_is_refused_before_any_work(setup, tmp_path, capsys):
    cfg = Qwen2Config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    other = init_weights(Qwen2ForCausalLM(cfg))
    apply_lora(other, r=4)
    save_adapter(other, tmp_path / "other")
    assert eval_cli.main(base_args(setup, tmp_path / "o", "--adapter", tmp_path / "other")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "different base model" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()  # the base model was not evaluated first

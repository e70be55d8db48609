"""The SSB pipeline end to end on CPU: sample.py -> train.py -> eval.py, each as a subprocess.

A model with random weights almost never writes a \\boxed{} answer, so stage 1 would find no
problem with both a right and a wrong rollout and write no pair. The model here is a tiny
random Qwen2 whose output head is set by hand so that it answers every prompt with
"\\boxed{1}" or "\\boxed{2}", equally likely: its attention and MLP outputs are zeroed (every
decoder layer passes its input through), so the logits depend on the last token only, and the
head maps each token of that answer to the next one. Problems whose gold is 1 or 2 then give
mixed rollouts, a teacher that is right half the time, and real pairs - with no network,
no ../shared and no scripted generator: all three CLIs run as they would on Qwen2.5.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

from minissb.model import from_pretrained, save_pretrained
from minissb.testing import build_tiny_model
from minissb.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def build_answering_model(out: Path) -> Path:
    """A 1-layer tiny Qwen2 (random weights, untied head) that writes \\boxed{1} or \\boxed{2}, then <|im_end|>."""
    build_tiny_model(out, layers=1, tied=False, seed=0)
    tok = Tokenizer.from_dir(out)
    model = from_pretrained(out, dtype=torch.float32)
    newline = tok.encode("\n")  # the last token of every generation prompt ("<|im_start|>assistant\n")
    one, two = tok.encode(r"\boxed{1}"), tok.encode(r"\boxed{2}")  # \ boxed { 1 }
    assert len(newline) == 1 and len(one) == len(two) == 5 and one[:3] == two[:3] and one[4] == two[4]
    follows = {  # token -> the tokens that may come next, equally likely
        newline[0]: [one[0]],
        one[0]: [one[1]],
        one[1]: [one[2]],
        one[2]: [one[3], two[3]],  # "{" -> "1" or "2"
        one[3]: [one[4]],
        two[3]: [one[4]],
        one[4]: [tok.im_end_id],  # "}" -> end of turn
    }
    with torch.no_grad():
        for layer in model.model.layers:  # residual blocks add nothing: hidden = norm(embedding)
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        sources = list(follows)
        hidden = model.model.norm(model.model.embed_tokens.weight[sources]).double().T  # (D, S), independent columns
        target = torch.full((model.config.vocab_size, len(sources)), -30.0, dtype=torch.float64)  # (V, S) logits
        for j, s in enumerate(sources):
            target[follows[s], j] = 0.0
        model.lm_head.weight.copy_((target @ torch.linalg.pinv(hidden)).float())  # head @ hidden = target
    save_pretrained(model, out)
    return out


def write_problems(path: Path, n: int, stem: str) -> Path:
    path.write_text("".join(json.dumps({"question": f"{stem} {i}?", "answer": str(1 + i % 2)}) + "\n" for i in range(n)))
    return path


def run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.mark.slow
def test_sample_train_eval(tmp_path):
    model = build_answering_model(tmp_path / "model")
    train_data = write_problems(tmp_path / "train.jsonl", 8, "Which number do I think of, puzzle")
    test_data = write_problems(tmp_path / "test.jsonl", 6, "Guess my number, round")
    common = ["--model", model, "--device", "cpu", "--no-progress"]

    # Stage 1: K=4 rollouts per problem at T=0.8, teacher at T=0.4 (the paper's settings).
    run("sample.py", *common, "--dtype", "fp32", "--dataset", "gsm8k", "--data", train_data,
        "--out", "runs/pairs.jsonl", "--max-new-tokens", "16", cwd=tmp_path)
    pairs = [json.loads(line) for line in (tmp_path / "runs/pairs.jsonl").read_text().splitlines()]
    skipped = [json.loads(line) for line in (tmp_path / "runs/pairs.skipped.jsonl").read_text().splitlines()]
    assert pairs, "stage 1 kept no pair"
    assert len(pairs) + len(skipped) == 8
    for p in pairs:
        assert p["solution"] == rf"\boxed{{{p['gold']}}}" and p["finish_reason"] == "stop"
        assert p["rollouts"]["n_correct"] >= 1 and p["rollouts"]["n_wrong"] >= 1

    # Stage 2: the teacher's hidden states, one file per kept pair, S+1 rows each.
    targets = sorted((tmp_path / "runs/pairs.targets").glob("*.safetensors"))
    assert len(targets) == len(pairs)

    # Stage 3: LoRA distillation from the captured targets (the default), then the online teacher.
    train_args = ["--dtype", "fp32", "--pairs", "runs/pairs.jsonl", "--batch-size", "2", "--epochs", "1", "--lora-r", "4", "--lora-alpha", "8"]
    run("train.py", *common, *train_args, "--out", "runs/train", cwd=tmp_path)
    run("train.py", *common, *train_args, "--out", "runs/train-online", "--teacher", "online", cwd=tmp_path)
    captured_m = [json.loads(line) for line in (tmp_path / "runs/train/metrics.jsonl").read_text().splitlines()]
    online_m = [json.loads(line) for line in (tmp_path / "runs/train-online/metrics.jsonl").read_text().splitlines()]
    assert [round(m["loss"], 4) for m in captured_m] == [round(m["loss"], 4) for m in online_m]
    adapter = tmp_path / "runs/train/adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()

    # Stage 4: base model and the trained adapter, greedy, on held-out problems.
    out = run("eval.py", *common, "--dtype", "fp32", "--adapter", adapter, "--datasets", "gsm8k",
              "--data", f"gsm8k={test_data}", "--max-new-tokens", "16", "--out", "runs/eval", cwd=tmp_path)
    assert "pass@1" in out.stdout
    results = json.loads((tmp_path / "runs/eval/results.json").read_text())["results"]
    assert [(r["model"], r["dataset"], r["problems"]) for r in results] == [("base", "gsm8k", 6), ("adapter", "gsm8k", 6)]
    base_records = [json.loads(line) for line in (tmp_path / "runs/eval/base__gsm8k.jsonl").read_text().splitlines()]
    # Greedy decoding follows the same chain for every prompt: one answer, right on half the golds.
    answers = {r["responses"][0]["answer"] for r in base_records}
    assert len(answers) == 1 and answers <= {"1", "2"}
    assert results[0]["accuracy"] == 0.5 and results[0]["mean_tokens"] == 5
    adapter_records = [json.loads(line) for line in (tmp_path / "runs/eval/adapter__gsm8k.jsonl").read_text().splitlines()]
    assert results[1]["accuracy"] == sum(r["responses"][0]["correct"] for r in adapter_records) / 6


def run_pipeline(tmp_path, model, out: str, launch: str = "python") -> Path:
    train_data = write_problems(tmp_path / "train.jsonl", 8, "Which number do I think of, puzzle")
    test_data = write_problems(tmp_path / "test.jsonl", 4, "Guess my number, round")
    common = "--device cpu --dtype fp32 --no-progress"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MODEL=str(model), OUT=out,
               LAUNCH=launch,
               SAMPLE_ARGS=f"{common} --data {train_data} --max-new-tokens 16",
               TRAIN_ARGS=f"{common} --batch-size 2 --epochs 1 --lora-r 4 --lora-alpha 8",
               GRPO_ARGS=f"{common} --data {train_data} -G 4 --max-new-tokens 16 --lora-r 4 --lora-alpha 8",
               EVAL_ARGS=f"{common} --datasets gsm8k --data gsm8k={test_data} --max-new-tokens 16")
    done = subprocess.run(["bash", str(REPO / "pipeline.sh")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / out


@pytest.mark.slow
def test_pipeline_script_runs_ssb_grpo_and_one_table(tmp_path):
    """pipeline.sh, the README's one command, on the answering model: every step runs and the
    table has base, SSB and GRPO rows (the model is not meant to learn anything here); then the
    same under torchrun with two gloo ranks gives the same pairs, adapters and table."""
    model = build_answering_model(tmp_path / "model")
    one = run_pipeline(tmp_path, model, "runs/p")
    results = json.loads((one / "eval/results.json").read_text())["results"]
    assert [r["model"] for r in results] == ["base", "ssb", "grpo"]
    assert all(r["problems"] == 4 for r in results)
    # The same command again: every step finds its work done; no pair, adapter or response changes.
    before = {f: f.read_bytes() for f in one.rglob("*") if f.is_file()}
    run_pipeline(tmp_path, model, "runs/p")
    after = {f: f.read_bytes() for f in one.rglob("*") if f.is_file()}
    changed = sorted(str(f.relative_to(one)) for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    assert changed == []

    if not torch.distributed.is_available():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = run_pipeline(tmp_path, model, "runs/p2", f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port {port}")
    assert (two / "pairs.jsonl").read_bytes() == (one / "pairs.jsonl").read_bytes()
    assert (two / "eval/ssb__gsm8k.jsonl").read_bytes() == (one / "eval/ssb__gsm8k.jsonl").read_bytes()
    for run in ("ssb", "grpo"):
        a, b = (load_file(d / run / "adapter/adapter_model.safetensors") for d in (one, two))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
        assert json.loads((two / run / "run.json").read_text())["world_size"] == 2
    rows = json.loads((two / "eval/results.json").read_text())["results"]
    assert [(r["model"], r["accuracy"]) for r in rows] == [(r["model"], r["accuracy"]) for r in results]

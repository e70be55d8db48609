"""train.py under torchrun: two gloo ranks on the CPU against one process with the same global batch.

The reference is the one-process run: every step's LoRA gradients (taken as AdamW steps),
the metrics and the final adapter must match it in float32, rank 1 must write nothing, and a
run stopped at one world size must continue at another. The tiny model and pairs of
test_distill.py; each two-rank run costs a few seconds (mostly importing torch twice).
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
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import minissb.dist

from minissb.training import TIMING_FIELDS
from test_distill import config, metrics, sharp_model_dir, tok, write_pairs  # noqa: F401 (fixtures)
from test_grpo import answering_model  # noqa: F401 (fixture)
from train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="this torch build has no torch.distributed with the gloo backend"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_gradients(store: list):
    """Patch AdamW.step to keep a copy of every gradient it is about to apply."""
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        store.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return real(self, *args, **kwargs)

    torch.optim.AdamW.step = step


def _rank_main(rank: int, world: int, port: int, cfg, grads_file: str):
    """One torchrun rank, spawned: train.py's train(cfg), or grpo.py's for a GRPOConfig."""
    import grpo
    from minissb.grpo import GRPOConfig

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    grads = []
    record_gradients(grads)
    real_shard = minissb.dist.shard_base

    def shard_and_check(model, world, device):  # the base really is split: each rank holds half a layer's weights
        real_shard(model, world, device)
        w = model.model.layers[0].mlp.up_proj.weight
        assert isinstance(w, DTensor) and w.to_local().shape[0] * 2 == w.shape[0]
        Path(f"{grads_file}.sharded{rank}").touch()

    minissb.dist.shard_base = shard_and_check
    (grpo.train if isinstance(cfg, GRPOConfig) else train)(cfg)
    torch.save(grads, f"{grads_file}.rank{rank}")
    torch.distributed.destroy_process_group()


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def strip(lines):
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in lines]


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_two_ranks_take_the_one_process_steps(tmp_path, tok, sharp_model_dir, monkeypatch, fsdp):
    pairs = write_pairs(tmp_path / "pairs.jsonl", tok)
    # 5 pairs, batch 4: steps of 4 pairs (2 per rank) and of 1 pair (rank 0 has none: it adds
    # zeros, and under FSDP runs a weight-0 micro-batch to keep in step); micro-batch 1
    # accumulates within a rank. FSDP: the base layers sharded, recomputed in the backward.
    # lr: the paper's 2e-4. AdamW divides by sqrt(v), so where a gradient element is ~0 a float32
    # rounding difference in it moves the weight by up to ~lr (at lr 1e-2: 9e-6 seen in one of 1,024).
    kw = dict(batch_size=4, micro_batch_size=1, epochs=2, lr=2e-4)
    one, two = tmp_path / "one", tmp_path / "two"
    grads_one = []
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", torch.optim.AdamW.step)  # undone after the block
        record_gradients(grads_one)
        train(config(pairs, one, sharp_model_dir, **kw))
    two_kw = dict(kw, fsdp=True, grad_checkpointing=True) if fsdp else kw
    mp.spawn(_rank_main, args=(2, free_port(), config(pairs, two, sharp_model_dir, **two_kw), str(tmp_path / "grads")), nprocs=2)

    grads_r0, grads_r1 = (torch.load(tmp_path / f"grads.rank{r}") for r in (0, 1))
    assert all((tmp_path / f"grads.sharded{r}").exists() == fsdp for r in (0, 1))
    assert len(grads_one) == len(grads_r0) == len(grads_r1) == 4
    for step, (g1, g_r0, g_r1) in enumerate(zip(grads_one, grads_r0, grads_r1)):
        for a, b, c in zip(g1, g_r0, g_r1):
            torch.testing.assert_close(b, c, rtol=0, atol=0)  # the ranks apply the very same gradient
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda s: f"step {step + 1}: {s}")
    assert any(g.abs().sum() > 0 for g in grads_one[0])

    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    for x, y in zip(strip(metrics(one)), strip(metrics(two))):
        assert x.keys() == y.keys()
        for key in x:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), key
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and json.loads((one / "run.json").read_text())["world_size"] == 1
    # Rank 0 alone wrote: the same files as one process (no per-rank copies, no duplicated metrics lines).
    assert sorted(p.relative_to(two) for p in two.rglob("*")) == sorted(p.relative_to(one) for p in one.rglob("*"))
    assert len(metrics(two)) == 4


def torchrun_train(nproc: int, cfg_args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(REPO / "train.py"), *cfg_args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_two_rank_run_continues_in_one_process_and_back(tmp_path, tok, sharp_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", tok)
    kw = dict(batch_size=2, epochs=2, lr=2e-4, save_every=2)  # 3 steps/epoch, 6 steps
    straight = tmp_path / "straight"
    train(config(pairs, straight, sharp_model_dir, **kw))

    args = ["--pairs", str(pairs), "--model", str(sharp_model_dir), "--teacher", "online", "--device", "cpu", "--dtype", "fp32",
            "--lora-r", "8", "--lora-alpha", "16", "--batch-size", "2", "--epochs", "2", "--lr", "2e-4", "--save-every", "2",
            "--warmup-ratio", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    # a: two ranks stop after step 2, one process finishes; b: one process stops, two ranks finish.
    done = torchrun_train(2, [*args, "--out", str(a), "--stop-after-steps", "2", "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((a / "run.json").read_text())["world_size"] == 2 and not (a / "adapter").exists()
    train(config(pairs, a, sharp_model_dir, **kw))
    train(config(pairs, b, sharp_model_dir, stop_after_steps=2, **kw))
    done = torchrun_train(2, [*args, "--out", str(b)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((b / "run.json").read_text())["world_size"] == 2
    assert (done.stdout + done.stderr).count("resuming from step 2 of 6") == 1  # rank 0 alone talks

    want = adapter(straight)
    for out in (a, b):
        got = adapter(out)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        assert [m["step"] for m in metrics(out)] == list(range(1, 7))
        for x, y in zip(strip(metrics(straight)), strip(metrics(out))):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- grpo.py


def test_two_grpo_ranks_take_the_one_process_steps(tmp_path, answering_model, monkeypatch):
    import grpo
    from test_grpo import metrics as grpo_metrics, run_config, strip as grpo_strip, write_problems

    data = write_problems(tmp_path / "train.jsonl", 6, "Which number do I think of, puzzle")
    # 3 questions a step (ranks sample 1 and 2), groups of 4, micro-batches of 3 rollouts, two inner
    # steps and a KL; the paper-scale lr keeps both runs' samples the same token for token.
    kw = dict(questions_per_step=3, group_size=4, micro_batch_size=3, inner_steps=2, beta=0.1, epochs=2, max_steps=0,
              lr=2e-4, save_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    grads_one = []
    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", torch.optim.AdamW.step)
        record_gradients(grads_one)
        grpo.train(run_config(one, answering_model, data, **kw))
    mp.spawn(_rank_main, args=(2, free_port(), run_config(two, answering_model, data, **kw), str(tmp_path / "grads")),
             nprocs=2)

    grads_r0, grads_r1 = (torch.load(tmp_path / f"grads.rank{r}") for r in (0, 1))
    assert len(grads_one) == len(grads_r0) == len(grads_r1) > 0
    for step, (g1, g_r0, g_r1) in enumerate(zip(grads_one, grads_r0, grads_r1)):
        for a, b, c in zip(g1, g_r0, g_r1):
            torch.testing.assert_close(b, c, rtol=0, atol=0)
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda s: f"optimizer step {step + 1}: {s}")
    a, b = adapter(one), adapter(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    x, y = grpo_strip(grpo_metrics(one)), grpo_strip(grpo_metrics(two))
    assert [m["reward_mean"] for m in x] == [m["reward_mean"] for m in y]  # the same samples
    for mx, my in zip(x, y):
        for key in ("loss", "kl", "grad_norm", "completion_len", "train_tokens"):
            assert (mx[key] is None) == (my[key] is None) and (mx[key] is None or my[key] == pytest.approx(mx[key], rel=1e-5, abs=1e-7)), key
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert sorted(p.relative_to(two) for p in two.rglob("*")) == sorted(p.relative_to(one) for p in one.rglob("*"))


def test_fsdp_without_torchrun_is_one_error_line(tmp_path, tok, sharp_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", tok)
    with pytest.raises(ValueError, match=r"--fsdp shards the base over torchrun's ranks: launch with torchrun"):
        train(config(pairs, tmp_path / "run", sharp_model_dir, fsdp=True))
    assert not (tmp_path / "run").exists()

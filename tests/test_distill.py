"""minissb.distill: sequences, gradients, overfitting, accumulation, resume, offline targets, bad input.

Everything runs on the tiny random Qwen2 (2 layers, hidden 64) on the CPU, in float32.
"""

import json
import re
import shutil
import sys

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import minissb.distill as distill
import minissb.training as training
from minissb.distill import (
    NonFiniteLossError,
    TrainConfig,
    build_examples,
    collate,
    epoch_order,
    load_pairs,
    micro_batch_loss,
)
from minissb.training import TIMING_FIELDS, enable_gradient_checkpointing, lr_at
from train import train
from minissb.lora import adapters_disabled, apply_lora, lora_modules, lora_parameters
from minissb.model import from_pretrained, init_weights, save_pretrained
from minissb.prompts import SYSTEM_PROMPT, student_chat
from minissb.testing import build_tiny_model
from minissb.tokenizer import Tokenizer

PROBLEMS = [
    ("Tom has 12 apples and gives 5 away. How many are left?", "12 - 5 = 7 apples are left. The answer is \\boxed{7}."),
    ("A baker makes 24 muffins a day. How many does she make in 7 days?", "24 * 7 = 168 muffins, so \\boxed{168}."),
    ("What is 3 + 4?", "3 + 4 = 7. \\boxed{7}"),
    ("Find x if 2x = 8.", "Divide both sides by 2: x = 4. Therefore x = \\boxed{4}."),
    ("How many legs do 3 cats have?", "Each cat has 4 legs, so 3 * 4 = 12 legs. \\boxed{12}"),
]


def hinted_chat(question, solution):
    # A short stand-in for prompts.teacher_chat (whose instructions are ~450 tiny-tokenizer tokens):
    # the trainer treats any chat the same way, and short prompts keep the tests fast.
    hint = f"{question}\n\nA right attempt: {solution}\nA wrong attempt: the answer is \\boxed{{5}}."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": hint}]


def write_pairs(path, tok, n=len(PROBLEMS)):
    """A pairs file in sample.py's format, with solution_ids from `tok`."""
    with open(path, "w") as f:
        for i, (question, solution) in enumerate(PROBLEMS[:n]):
            record = {
                "id": f"gsm8k/train/{i}", "dataset": "gsm8k", "question": question, "gold": "7",
                "student_chat": student_chat(question),
                "teacher_chat": hinted_chat(question, solution),
                "solution": solution, "solution_ids": tok.encode(solution), "finish_reason": "stop",
                "rollouts": {"k": 4, "n_correct": 1, "n_wrong": 3, "n_no_answer": 0, "answers": ["7", "5", "5", "6"],
                             "correct_index": 0, "wrong_index": 1, "wrong_answer": "5"},
                "model": "tiny",
            }
            f.write(json.dumps(record) + "\n")
    return path


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with init std 0.2 instead of 0.02: peaked, context-dependent distributions, so the
    teacher (hinted prompt) and the student (bare question) really disagree and KL starts well above 0."""
    path = build_tiny_model(tmp_path_factory.mktemp("sharp_model"))
    model = from_pretrained(path, dtype=torch.float32)
    save_pretrained(init_weights(model, std=0.2, seed=1), path)
    return path


@pytest.fixture(scope="module")
def tok(sharp_model_dir):
    return Tokenizer.from_dir(sharp_model_dir)


@pytest.fixture()
def pairs_file(tmp_path, tok):
    return write_pairs(tmp_path / "pairs.jsonl", tok)


def config(pairs, out, model, **kw) -> TrainConfig:
    base = dict(pairs=str(pairs), out=str(out), model=str(model), teacher="online", device="cpu", dtype="fp32", lora_r=8,
                lora_alpha=16, batch_size=2, epochs=1, warmup_ratio=0.0, save_every=0, progress=False)
    return TrainConfig(**{**base, **kw})


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def examples_for(pairs, tok, model, **kw):
    args = dict(vocab_size=model.config.vocab_size, max_seq_len=4096, truncate=False, online_teacher=True,
                pairs_path=str(pairs))
    return build_examples(load_pairs(pairs), tok, **{**args, **kw})


def lora_model(model_dir, seed=0):
    """The tiny model with LoRA whose B is random, so the student differs from the teacher and A gets gradients."""
    model = from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, r=8, alpha=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


# ----------------------------------------------------------------------------- sequences


def test_sequences_follow_the_stage_contract(pairs_file, tok, sharp_model_dir):
    model = from_pretrained(sharp_model_dir, dtype=torch.float32)
    examples = examples_for(pairs_file, tok, model)
    pairs = [rec for _, rec in load_pairs(pairs_file)]
    for ex, pair in zip(examples, pairs):
        s_prompt = tok.encode_chat(pair["student_chat"], add_generation_prompt=True)
        t_prompt = tok.encode_chat(pair["teacher_chat"], add_generation_prompt=True)
        completion = pair["solution_ids"] + [tok.im_end_id]
        # The student sees the chat template with the system prompt, as at inference.
        assert tok.decode(s_prompt).startswith("<|im_start|>system\nYou are a patient math tutor")
        assert tok.decode(s_prompt).endswith("<|im_start|>assistant\n")
        assert ex.student_ids == s_prompt + completion and ex.teacher_ids == t_prompt + completion
        assert (ex.student_start, ex.teacher_start) == (len(s_prompt) - 1, len(t_prompt) - 1)  # P - 1
        assert ex.labels == completion and ex.n == len(pair["solution_ids"]) + 1  # S + 1 positions
        # Position start + j predicts labels[j], the next input token.
        for ids, start in ((ex.student_ids, ex.student_start), (ex.teacher_ids, ex.teacher_start)):
            assert [ids[start + j + 1] for j in range(ex.n - 1)] == ex.labels[:-1]

    batch = collate([(ex.student_ids, ex.student_start, ex.n) for ex in examples], tok.pad_id, "cpu")
    lengths = [len(ex.student_ids) for ex in examples]
    assert batch.ids.shape == (len(examples), max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths  # right padding
    assert (batch.ids[~batch.attention_mask] == tok.pad_id).all()
    assert batch.loss_mask.sum().item() == sum(ex.n for ex in examples)
    assert not (batch.loss_mask & ~batch.attention_mask).any()
    # No padding at all -> no mask, so attention keeps SDPA's causal fast path.
    same = collate([(examples[0].student_ids, examples[0].student_start, examples[0].n)] * 2, tok.pad_id, "cpu")
    assert same.attention_mask is None


def test_too_long_pairs_error_or_truncate(pairs_file, tok, sharp_model_dir):
    model = from_pretrained(sharp_model_dir, dtype=torch.float32)
    full = examples_for(pairs_file, tok, model)
    longest_prompt = max(len(ex.teacher_ids) - ex.n for ex in full)
    limit = longest_prompt + 5
    with pytest.raises(ValueError, match=rf"pairs\.jsonl:\d \(id gsm8k/train/\d\): the teacher .*--max-seq-len {limit}.*--truncate"):
        examples_for(pairs_file, tok, model, max_seq_len=limit)
    cut = examples_for(pairs_file, tok, model, max_seq_len=limit, truncate=True)
    for ex, ref in zip(cut, full):
        assert max(len(ex.student_ids), len(ex.teacher_ids)) <= limit
        assert ex.labels == ref.labels[: ex.n] and ex.truncated == (ex.n < ref.n)
        assert len(ex.student_ids) - ex.student_start == len(ex.teacher_ids) - ex.teacher_start  # still aligned
    assert sum(ex.truncated for ex in cut) >= 1
    with pytest.raises(ValueError, match="prompt alone"):
        examples_for(pairs_file, tok, model, max_seq_len=10, truncate=True)


# ----------------------------------------------------------------------------- loss and gradients


def reference_loss(model, examples, T):
    """T^2 * KL(teacher || student), token mean, from full logits of each pair run alone (no padding)."""
    total, count = 0.0, 0
    for ex in examples:
        s_logits = model(torch.tensor([ex.student_ids]))[0, ex.student_start : ex.student_start + ex.n]  # (n, V)
        with torch.no_grad(), adapters_disabled(model):
            t_logits = model(torch.tensor([ex.teacher_ids]))[0, ex.teacher_start : ex.teacher_start + ex.n]
        p_log, q_log = F.log_softmax(t_logits / T, -1), F.log_softmax(s_logits / T, -1)
        total = total + (p_log.exp() * (p_log - q_log)).sum()
        count += ex.n
    return T**2 * total / count


def test_gradients_reach_only_lora_and_match_a_full_logits_reference(pairs_file, tok, sharp_model_dir):
    model = lora_model(sharp_model_dir)
    examples = examples_for(pairs_file, tok, model)
    cfg = config(pairs_file, "unused", sharp_model_dir)
    res, n_input = micro_batch_loss(model, examples, cfg, tok.pad_id)  # one padded batch of 5
    res.loss.backward()
    assert n_input == sum(len(ex.student_ids) + len(ex.teacher_ids) for ex in examples)
    assert res.n_tokens == sum(ex.n for ex in examples)

    lora = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    got = {id(p): p.grad.clone() for p in lora_parameters(model)}

    model.zero_grad(set_to_none=True)
    ref = reference_loss(model, examples, cfg.temperature)
    ref.backward()
    assert res.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert res.kl.item() * cfg.temperature**2 == pytest.approx(ref.item(), rel=1e-5)
    for p in lora_parameters(model):
        torch.testing.assert_close(got[id(p)], p.grad, rtol=1e-4, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients(pairs_file, tok, sharp_model_dir):
    grads = []
    for checkpointing in (False, True):
        model = lora_model(sharp_model_dir)
        if checkpointing:
            enable_gradient_checkpointing(model)
        examples = examples_for(pairs_file, tok, model)[:3]
        res, _ = micro_batch_loss(model, examples, config(pairs_file, "unused", sharp_model_dir), tok.pad_id)
        res.loss.backward()
        grads.append([p.grad for p in lora_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def capture_from_online(pairs_file, tok, model_dir):
    """Targets as sample.py would store them, made here from the online teacher's rows (fp32)."""
    from minissb.distill import online_teacher_hidden
    from minissb.targets import CapturedTargets

    base = from_pretrained(model_dir, dtype=torch.float32)
    store = CapturedTargets(pairs_file.with_name("pairs.targets"))
    store.open_for_writing(str(Path(model_dir).resolve()), torch.float32, torch.float32, base.config.hidden_size, [])
    for ex, (_, rec) in zip(examples_for(pairs_file, tok, base), load_pairs(pairs_file)):
        rows, _ = online_teacher_hidden(base, [ex], tok.pad_id)
        store.write(rec["id"], rec["solution_ids"], rows)


def test_training_with_captured_targets_follows_the_online_curve(tmp_path, pairs_file, tok, sharp_model_dir):
    capture_from_online(pairs_file, tok, sharp_model_dir)
    train(config(pairs_file, tmp_path / "online", sharp_model_dir, epochs=2))
    train(config(pairs_file, tmp_path / "captured", sharp_model_dir, epochs=2, teacher="captured"))
    on, cap = metrics(tmp_path / "online"), metrics(tmp_path / "captured")
    assert len(on) == len(cap) == 6
    for a, b in zip(on, cap):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    missing = tmp_path / "other.jsonl"
    shutil.copy(pairs_file, missing)
    with pytest.raises(ValueError, match="not found"):
        train(config(missing, tmp_path / "c", sharp_model_dir, teacher="captured"))


# ----------------------------------------------------------------------------- the loop


def test_overfitting_two_pairs_drives_kl_towards_zero(tmp_path, tok, sharp_model_dir):
    pairs = write_pairs(tmp_path / "pairs.jsonl", tok, n=2)
    train(config(pairs, tmp_path / "run", sharp_model_dir, epochs=20, lr=3e-2))
    kl = [m["kl"] for m in metrics(tmp_path / "run")]
    assert len(kl) == 20 and kl[0] > 0.1
    assert kl[-1] < 0.1 * kl[0], kl


def test_micro_batches_accumulate_to_the_full_batch(tmp_path, pairs_file, sharp_model_dir):
    lines = []
    for micro in (4, 1):
        out = tmp_path / f"micro{micro}"
        train(config(pairs_file, out, sharp_model_dir, batch_size=4, micro_batch_size=micro, max_steps=1))
        lines.append(metrics(out)[0])
    for key in ("loss", "kl", "ce", "grad_norm"):
        assert lines[1][key] == pytest.approx(lines[0][key], rel=1e-5), key
    assert lines[0]["train_tokens"] == lines[1]["train_tokens"]


def test_resume_matches_an_uninterrupted_run(tmp_path, pairs_file, sharp_model_dir):
    # 5 pairs, batch 2: 3 steps/epoch (the last one partial), 2 epochs; dropout makes the RNG matter.
    kw = dict(epochs=2, lr=1e-2, lora_dropout=0.1, save_every=2, keep_checkpoints=2, warmup_ratio=0.2)
    train(config(pairs_file, tmp_path / "straight", sharp_model_dir, **kw))

    run = tmp_path / "resumed"
    summary = train(config(pairs_file, run, sharp_model_dir, stop_after_steps=4, **kw))
    assert summary["adapter"] is None and len(metrics(run)) == 4
    # A kill after step 4 was logged but before its checkpoint: the newest checkpoint is step 2.
    shutil.rmtree(run / "checkpoints" / "step-000004")
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(ValueError, match="other settings \\(--lr: 0.01 there, 0.02 now\\)"):
        train(config(pairs_file, run, sharp_model_dir, **{**kw, "lr": 2e-2}))  # would mix two runs
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before  # refused before writing
    train(config(pairs_file, run, sharp_model_dir, **kw))  # the same command again continues from step 2

    def strip(lines):
        return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in lines]

    straight, resumed = metrics(tmp_path / "straight"), metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 7))  # lines 3-4 of the first attempt were dropped
    assert strip(resumed) == strip(straight)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it did train
    assert [d.name for d in sorted((run / "checkpoints").iterdir())] == ["step-000004", "step-000006"]
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(pairs_file.read_text().splitlines()[:4]) + "\n")
    with pytest.raises(ValueError, match="pairs file changed"):
        train(config(changed, run, sharp_model_dir, resume=True, **kw))


def _strip_timing(lines):
    return [{k: v for k, v in m.items() if k not in TIMING_FIELDS} for m in lines]


def test_a_run_stopped_before_its_first_checkpoint_starts_over_when_rerun(tmp_path, pairs_file, sharp_model_dir, monkeypatch):
    # save_every=0: no checkpoint; a non-finite loss at step 3 stops the run the way a kill would,
    # leaving run.json and two metrics lines. Rerun, the same command starts over cleanly (and so
    # does one with a changed option: nothing is lost), and ends exactly where a clean run ends.
    kw = dict(epochs=2, lr=1e-2, lora_dropout=0.1)
    train(config(pairs_file, tmp_path / "straight", sharp_model_dir, **kw))
    real, calls = distill.kd_loss, []

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    run = tmp_path / "run"
    monkeypatch.setattr(distill, "kd_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*lower --lr \(0.01\)"):
        train(config(pairs_file, run, sharp_model_dir, **kw))
    assert [m["step"] for m in metrics(run)] == [1, 2] and not (run / "checkpoints").exists()
    calls.clear()
    with pytest.raises(NonFiniteLossError, match=r"at step 3 .*lower --lr \(0.02\)"):
        train(config(pairs_file, run, sharp_model_dir, **{**kw, "lr": 2e-2}))  # another --lr: nothing to lose
    assert [m["step"] for m in metrics(run)] == [1, 2]  # started over: no line of the first attempt
    monkeypatch.setattr(distill, "kd_loss", real)
    train(config(pairs_file, run, sharp_model_dir, resume=True, **kw))  # --resume with no checkpoint: starts over
    assert _strip_timing(metrics(run)) == _strip_timing(metrics(tmp_path / "straight"))
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run is something to lose: other settings are refused, and nothing is written.
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    with pytest.raises(ValueError, match=r"holds a training run with other settings \(--epochs: 2 there, 3 now\)"):
        train(config(pairs_file, run, sharp_model_dir, **{**kw, "epochs": 3}))
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before
    # The same command again, with no checkpoint to continue from: the run is done, not started over
    # (a rerun pipeline must not retrain the adapter its evaluation read).
    again = train(config(pairs_file, run, sharp_model_dir, **kw))
    assert again["adapter"] == str(run / "adapter") and again["last"] == metrics(run)[-1]
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before
    with pytest.raises(ValueError, match=r"--resume: .* holds no training run to continue"):
        train(config(pairs_file, tmp_path / "nothing", sharp_model_dir, resume=True))


def test_leftover_temporaries_are_removed_at_the_next_start(tmp_path, pairs_file, sharp_model_dir):
    run = tmp_path / "run"
    kw = dict(save_every=1, max_steps=2)
    train(config(pairs_file, run, sharp_model_dir, stop_after_steps=1, **kw))
    # What a kill or a full disk mid-write leaves: a half checkpoint and half files.
    (run / "checkpoints" / ".step-000002.tmp" / "adapter").mkdir(parents=True)
    (run / "checkpoints" / ".step-000002.tmp" / "state.pt").write_bytes(b"half")
    (run / ".run.json.k3j2.tmp").write_bytes(b"")
    (run / ".metrics.jsonl.x9.tmp").write_text("{")
    train(config(pairs_file, run, sharp_model_dir, **kw))
    assert not [f for f in run.rglob("*") if f.name.endswith(".tmp")]
    assert [m["step"] for m in metrics(run)] == [1, 2]


def test_disk_full_while_checkpointing_names_the_file_and_loses_nothing(tmp_path, pairs_file, sharp_model_dir, monkeypatch):
    run = tmp_path / "run"
    kw = dict(save_every=1, max_steps=3)
    train(config(pairs_file, run, sharp_model_dir, stop_after_steps=1, **kw))
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file() and f.name != "metrics.jsonl"}
    real_write = training._torch_save

    def full(obj, path):  # torch.save's own report of ENOSPC is an opaque RuntimeError: check ours is an OSError
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(training, "_torch_save", full)
    with pytest.raises(OSError) as e:
        train(config(pairs_file, run, sharp_model_dir, **kw))
    assert e.value.errno == 28 and e.value.filename.endswith("state.pt")
    monkeypatch.setattr(training, "_torch_save", real_write)
    kept = {f: f.read_bytes() for f in run.rglob("*") if f in before}
    assert kept.keys() == before.keys() and all(kept[f] == before[f] for f in before if f.name != "run.json")
    train(config(pairs_file, run, sharp_model_dir, **kw))  # rerun: continues from step 1, cleans the half checkpoint
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    assert not [f for f in run.rglob("*") if f.name.endswith(".tmp")]


def test_torch_save_reports_a_failed_write_as_the_oserror(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    target = tmp_path / "state.pt"
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: Full(real_open(path, *a, **k)) if str(path) == str(target) else real_open(path, *a, **k))
    with pytest.raises(OSError) as e:
        training._torch_save({"a": torch.zeros(1000)}, target)
    assert e.value.errno == 28 and e.value.filename == str(target)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "--temperature must be a finite number > 0, got nan"),
    ("kd_weight", float("nan"), "--kd-weight must be a finite number >= 0"),
    ("lora_alpha", 0.0, "--lora-alpha must be a finite number > 0, got 0.0"),
    ("lora_alpha", float("nan"), "--lora-alpha must be a finite number > 0"),
    ("lr", float("inf"), "--lr must be a finite number > 0, got inf"),
    ("max_grad_norm", float("nan"), "--max-grad-norm must be a finite number, got nan"),
    ("save_every", -1, "--save-every must be an integer >= 0, got -1"),
    ("keep_checkpoints", -1, "--keep-checkpoints must be an integer >= 0"),
    ("lora_dropout", 1.0, "--lora-dropout must be a finite number >= 0 and < 1"),
])
def test_bad_numbers_are_refused_before_anything_loads(tmp_path, pairs_file, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(config(pairs_file, tmp_path / "run", tmp_path / "no_model_needed", **{field: value}))
    assert not (tmp_path / "run").exists()


def test_a_pairs_file_with_bad_utf8_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(VALID.encode() + b"\n" + VALID.replace('"v"', '"w\xff"').encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: not UTF-8 text \(byte \d+ of the line\)"):
        load_pairs(path)


def test_epoch_order_and_schedule():
    orders = [epoch_order(10, seed=3, epoch=e) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert orders[0] != orders[1] and epoch_order(10, seed=3, epoch=1) == orders[1]
    assert epoch_order(10, seed=4, epoch=0) != orders[0]
    lrs = [lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then monotone cosine decay
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # towards lr * min_lr_ratio


# ----------------------------------------------------------------------------- bad input


VALID = json.dumps({"id": "v", "student_chat": student_chat("q"), "teacher_chat": student_chat("t"), "solution_ids": [5, 6]})


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        (VALID + "\n\nnot json\n", r"pairs\.jsonl:3: malformed JSON"),
        (VALID + "\n[1, 2]\n", r"pairs\.jsonl:2: expected a JSON object"),
        (VALID.replace('"solution_ids": [5, 6]', '"solution_ids": [5, 6], "finish_reason": "length"'), "cut off"),
        ('{"id": "a", "student_chat": [{"role": "user", "content": "q"}], "teacher_chat": [{"role": "user", "content": "t"}]}\n',
         r"pairs\.jsonl:1 \(id a\): 'solution_ids'"),
        ('{"id": "a", "student_chat": "q", "teacher_chat": [], "solution_ids": [1]}\n', r":1 \(id a\): 'student_chat'"),
    ],
)
def test_bad_pairs_files_name_the_problem(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_pairs(path)


def test_duplicate_ids_and_out_of_vocab_tokens(tmp_path, pairs_file, tok, sharp_model_dir):
    lines = pairs_file.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    with pytest.raises(ValueError, match=r"dup\.jsonl:3 \(id gsm8k/train/0\): duplicate id, first seen on line 1"):
        load_pairs(dup)
    rec = json.loads(lines[1])
    rec["solution_ids"] = [5, 100_000]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 .*token id 100000, outside the model's vocabulary of 512"):
        train(config(bad, tmp_path / "run", sharp_model_dir))


def test_non_finite_loss_aborts_naming_the_step_and_pairs(tmp_path, pairs_file, sharp_model_dir, monkeypatch):
    calls = []
    real = distill.kd_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(distill, "kd_loss", poisoned)
    cfg = config(pairs_file, tmp_path / "run", sharp_model_dir)
    order = epoch_order(5, cfg.seed, 0)
    ids = ", ".join(f"gsm8k/train/{i}" for i in order[2:4])
    with pytest.raises(NonFiniteLossError, match=rf"non-finite loss \(nan\) at step 2 \(epoch 1\), pairs {ids}"):
        train(cfg)
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]


def test_bf16_base_model_with_float32_adapter(tmp_path, pairs_file, sharp_model_dir):
    losses = []
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        train(config(pairs_file, out, sharp_model_dir, dtype=dtype, max_steps=2, lr=1e-2))
        losses.append([m["loss"] for m in metrics(out)])
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert all(t.dtype == torch.float32 for t in adapter.values())  # the optimiser's master weights
    # bf16 activations change the loss by about bf16's precision, not more.
    for a, b in zip(*losses):
        assert b == pytest.approx(a, rel=1e-2)


def test_plot_needs_matplotlib_and_says_so(tmp_path, pairs_file, sharp_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ValueError, match=r"pip install 'minissb\[plot\]'"):
        train(config(pairs_file, tmp_path / "run", sharp_model_dir, plot=True))  # before any training
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="needs matplotlib"):
        training.plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png")


def test_flat_student_input_is_the_originals(pairs_file, tok, sharp_model_dir):
    model = from_pretrained(sharp_model_dir, dtype=torch.float32)
    flat = examples_for(pairs_file, tok, model, student_input="flat")
    chat = examples_for(pairs_file, tok, model)
    for (_, rec), f, c in zip(load_pairs(pairs_file), flat, chat):
        text = " ".join(m["content"] for m in rec["student_chat"]).strip()  # system + " " + question, no template
        assert f.student_ids == tok.encode(text) + rec["solution_ids"] and f.student_start == len(tok.encode(text)) - 1
        assert f.labels == rec["solution_ids"] and f.n == c.n - 1  # no end of turn trained
        assert f.teacher_ids == c.teacher_ids[:-1]  # the teacher keeps its chat template


def test_linear_schedule_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from minissb.training import lr_at

    for total, warmup in ((192, 0), (30, 3)):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
        sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [lr_at(s, total, 2e-4, warmup, 0.0, "linear") for s in range(total)]
        # transformers' step 0 of a warmup is lr * 0 / warmup (an update that does nothing); ours
        # starts at lr / warmup. Past the warmup both are lr * (total - step) / (total - warmup).
        assert ours[warmup:] == pytest.approx(ref[warmup:], rel=1e-9, abs=1e-15)

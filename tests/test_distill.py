"""minissb.distill: sequences, gradients, overfitting, accumulation, resume, offline targets, bad input.

Everything runs on the tiny random Qwen2 (2 layers, hidden 64) on the CPU, in float32.
"""

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import minissb.distill as distill
from minissb.distill import (
    NonFiniteLossError,
    TrainConfig,
    TrainError,
    build_examples,
    collate,
    enable_gradient_checkpointing,
    epoch_order,
    load_pairs,
    lr_at,
    micro_batch_loss,
    train,
    TIMING_FIELDS,
)
from minissb.lora import adapters_disabled, apply_lora, lora_modules, lora_parameters
from minissb.model import from_pretrained, init_weights, save_pretrained
from minissb.prompts import SYSTEM_PROMPT, student_chat
from minissb.targets import write_targets
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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's matmuls are far too small to share between threads; one thread avoids spin-waits.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    base = dict(pairs=str(pairs), out=str(out), model=str(model), device="cpu", dtype="fp32", lora_r=8,
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
    with pytest.raises(TrainError, match=rf"pairs\.jsonl:\d \(id gsm8k/train/\d\): the teacher .*--max-seq-len {limit}.*--truncate"):
        examples_for(pairs_file, tok, model, max_seq_len=limit)
    cut = examples_for(pairs_file, tok, model, max_seq_len=limit, truncate=True)
    for ex, ref in zip(cut, full):
        assert max(len(ex.student_ids), len(ex.teacher_ids)) <= limit
        assert ex.labels == ref.labels[: ex.n] and ex.truncated == (ex.n < ref.n)
        assert len(ex.student_ids) - ex.student_start == len(ex.teacher_ids) - ex.teacher_start  # still aligned
    assert sum(ex.truncated for ex in cut) >= 1
    with pytest.raises(TrainError, match="prompt alone"):
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


def test_online_and_offline_full_targets_give_the_same_loss(tmp_path, pairs_file, tok, sharp_model_dir):
    base = from_pretrained(sharp_model_dir, dtype=torch.float32)
    write_targets(base, tok, pairs_file, mode="full", temperature=2.0, progress=False)
    model = lora_model(sharp_model_dir)
    examples = examples_for(pairs_file, tok, model)[:4]
    cfg = config(pairs_file, "unused", sharp_model_dir)
    offline = distill.OfflineTeacher(pairs_file.with_name("pairs.targets"), 2.0, model.config.vocab_size,
                                     [ex.id for ex in examples])
    assert offline.mode == "full"
    online_res, _ = micro_batch_loss(model, examples, cfg, tok.pad_id)
    offline_res, _ = micro_batch_loss(model, examples, cfg, tok.pad_id, offline)
    assert online_res.n_tokens == offline_res.n_tokens
    assert online_res.kl.item() > 0.05  # a real disagreement, not two zeros
    # Stored logits are bf16 (8 significant bits): the losses agree to that precision, not to float32's.
    assert offline_res.loss.item() == pytest.approx(online_res.loss.item(), rel=1e-2)
    assert offline_res.ce.item() == pytest.approx(online_res.ce.item(), rel=1e-6)  # same student


def test_offline_topk_trains_and_refuses_another_temperature(tmp_path, pairs_file, tok, sharp_model_dir):
    base = from_pretrained(sharp_model_dir, dtype=torch.float32)
    write_targets(base, tok, pairs_file, mode="topk", k=16, temperature=1.0, progress=False)
    with pytest.raises(TrainError, match=r"temperature 1\.0.*--temperature is 2\.0"):
        train(config(pairs_file, tmp_path / "a", sharp_model_dir, teacher="offline"))
    summary = train(config(pairs_file, tmp_path / "b", sharp_model_dir, teacher="offline", temperature=1.0))
    assert summary["adapter"] and math.isfinite(metrics(tmp_path / "b")[-1]["kl"])
    missing = tmp_path / "other.jsonl"
    shutil.copy(pairs_file, missing)
    with pytest.raises(TrainError, match="not found"):
        train(config(missing, tmp_path / "c", sharp_model_dir, teacher="offline", temperature=1.0))


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
    with pytest.raises(TrainError, match="--resume"):
        train(config(pairs_file, run, sharp_model_dir, **kw))  # refuses to overwrite the run
    with pytest.raises(TrainError, match="--lr is 0.02"):
        train(config(pairs_file, run, sharp_model_dir, resume=True, **{**kw, "lr": 2e-2}))
    train(config(pairs_file, run, sharp_model_dir, resume=True, **kw))

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
    with pytest.raises(TrainError, match="pairs file changed"):
        train(config(changed, run, sharp_model_dir, resume=True, **kw))


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
    with pytest.raises(TrainError, match=message):
        load_pairs(path)


def test_duplicate_ids_and_out_of_vocab_tokens(tmp_path, pairs_file, tok, sharp_model_dir):
    lines = pairs_file.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join([lines[0], lines[1], lines[0]]) + "\n")
    with pytest.raises(TrainError, match=r"dup\.jsonl:3 \(id gsm8k/train/0\): duplicate id, first seen on line 1"):
        load_pairs(dup)
    rec = json.loads(lines[1])
    rec["solution_ids"] = [5, 100_000]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(TrainError, match=r"bad\.jsonl:2 .*token id 100000, outside the model's vocabulary of 512"):
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
    with pytest.raises(TrainError, match=r"pip install 'minissb\[plot\]'"):
        train(config(pairs_file, tmp_path / "run", sharp_model_dir, plot=True))  # before any training
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(TrainError, match="needs matplotlib"):
        distill.plot_metrics(tmp_path / "m.jsonl", tmp_path / "m.png")

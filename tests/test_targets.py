"""Offline teacher targets: alignment with the solution tokens, storage, resume, top-k error."""

import json

import pytest
import torch

from minissb import prompts
from minissb.loss import kd_loss, topk_targets
from minissb.model import from_pretrained
from minissb.targets import TargetReader, TargetsError, teacher_sequence, teacher_targets, write_targets
from minissb.tokenizer import Tokenizer

T = 2.0
SHARPEN = 16.0  # scales the final norm: a random tiny model is near uniform, a trained LM is peaked


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return from_pretrained(tiny_model_dir, dtype=torch.float32)


def make_pair(tok, i, solution):
    question = f"Tom has {i} apples and buys {i + 3} more. How many apples does he have?"
    chat = prompts.teacher_chat(question, f"{i} + {i + 3} = {2 * i + 3}. \\boxed{{{2 * i + 3}}}", f"{i} - 3 = {i - 3}. \\boxed{{{i - 3}}}")
    return {"id": f"gsm8k/train/{i}", "teacher_chat": chat, "student_chat": prompts.student_chat(question), "solution_ids": tok.encode(solution)}


@pytest.fixture(scope="module")
def pairs(tok):
    return [
        make_pair(tok, 4, "He adds: 4 + 7 = 11 apples. \\boxed{11}"),
        make_pair(tok, 12, "Buying adds apples, so 12 + 15 = 27.\nThe answer is \\boxed{27}."),
        make_pair(tok, 5, "5 + 8 = 13"),
    ]


def reference_rows(model, tok, pair):
    """Full forward over [prompt | solution | <|im_end|>], rows P-1 .. P+S-1, straight from logits."""
    ids, P, S = teacher_sequence(tok, pair)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]  # (P+S+1, V)
    return logits[P - 1 : P + S], P, S


def test_targets_align_with_the_solution_tokens(model, tok, pairs):
    # Three pairs of different lengths in one right-padded batch, LM head in chunks of 3 rows.
    full = teacher_targets(model, tok, pairs, mode="full", chunk_size=3)
    topk = teacher_targets(model, tok, pairs, mode="topk", k=8, temperature=T, chunk_size=5)
    for pair, f, t in zip(pairs, full, topk):
        ref, P, S = reference_rows(model, tok, pair)
        assert f["logits"].shape == (S + 1, model.config.vocab_size) and f["logits"].dtype == torch.bfloat16
        torch.testing.assert_close(f["logits"].float(), ref, rtol=1e-2, atol=2e-3)
        # the check can fail: rows shifted by one position are far off
        assert not torch.allclose(f["logits"][1:].float(), ref[:-1], rtol=1e-2, atol=2e-3)
        ref_lp, ref_ids = torch.log_softmax(ref / T, dim=-1).topk(8, dim=-1)
        torch.testing.assert_close(t["logprobs"], ref_lp, rtol=1e-5, atol=1e-5)
        assert torch.equal(t["ids"], ref_ids) and t["ids"].dtype == torch.int64

        # Independently of any slicing: row 0 is what the prompt alone predicts (the first
        # solution token), row S is what prompt + whole solution predicts (<|im_end|>).
        prompt = tok.encode_chat(pair["teacher_chat"], add_generation_prompt=True)
        with torch.no_grad():
            first = model(torch.tensor([prompt]))[0, -1]
            last = model(torch.tensor([prompt + pair["solution_ids"]]))[0, -1]
        torch.testing.assert_close(t["logprobs"][0], torch.log_softmax(first / T, -1).topk(8).values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t["logprobs"][S], torch.log_softmax(last / T, -1).topk(8).values, rtol=1e-5, atol=1e-5)
        assert len(prompt) == P


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_write_read_and_resume(model, tok, pairs, tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    stats = write_targets(model, tok, path, mode="topk", k=8, temperature=T, model_name="tiny", shard_pairs=1, progress=False)
    out = tmp_path / "pairs.targets"
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"mode": "topk", "k": 8, "temperature": T, "vocab_size": model.config.vocab_size, "model": "tiny", "pairs_file": "pairs.jsonl", "count": 3}
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "targets-00000.safetensors", "targets-00001.safetensors", "targets-00002.safetensors"]
    tokens = sum(len(p["solution_ids"]) + 1 for p in pairs)
    assert stats["tokens"] == tokens and stats["bytes_per_token"] >= 8 * (4 + 8)  # float32 + int64 per kept entry
    expected = teacher_targets(model, tok, pairs, mode="topk", k=8, temperature=T)
    reader = TargetReader(out)
    for pair, want in zip(pairs, expected):
        got = reader.get(pair["id"])
        assert set(got) == {"logprobs", "ids"}
        torch.testing.assert_close(got["logprobs"], want["logprobs"])
        assert torch.equal(got["ids"], want["ids"])

    # A kill loses at most the shard being written: drop one, leave a half-written tmp, rerun.
    (out / "targets-00001.safetensors").unlink()
    (out / "targets-00003.safetensors.tmp").write_bytes(b"half a shard")
    stats = write_targets(model, tok, path, mode="topk", k=8, temperature=T, model_name="tiny", shard_pairs=1, progress=False)
    assert stats["new_tokens"] == len(pairs[1]["solution_ids"]) + 1  # only the lost pair is recomputed
    reader = TargetReader(out)
    assert len(reader) == 3 and not list(out.glob("*.tmp"))
    torch.testing.assert_close(reader.get(pairs[1]["id"])["logprobs"], expected[1]["logprobs"])

    with pytest.raises(TargetsError, match="k: 8 there, 4 now"):
        write_targets(model, tok, path, mode="topk", k=4, temperature=T, model_name="tiny", progress=False)
    with pytest.raises(TargetsError, match="no targets for pair"):
        reader.get("gsm8k/train/999")


def test_full_mode_storage(model, tok, pairs, tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", pairs[:2])
    stats = write_targets(model, tok, path, mode="full", temperature=T, model_name="tiny", batch_size=2, progress=False)
    V = model.config.vocab_size
    assert stats["full_float32_bytes_per_token"] == 4 * V
    assert 2 * V <= stats["bytes_per_token"] < 2 * V + 200  # bf16 logits plus the safetensors header
    got = TargetReader(tmp_path / "p.targets").get(pairs[0]["id"])
    ref, _, _ = reference_rows(model, tok, pairs[0])
    torch.testing.assert_close(got["logits"].float(), ref, rtol=1e-2, atol=2e-3)


def test_bad_pairs_file_is_refused(model, tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "teacher_chat": []}\n')
    with pytest.raises(TargetsError, match="record 1 has no solution_ids"):
        write_targets(model, tok, bad, progress=False)
    with pytest.raises(TargetsError, match="not found"):
        write_targets(model, tok, tmp_path / "missing.jsonl", progress=False)


def test_sparse_topk_kl_error_shrinks_with_k(model, tok, pairs, tiny_model_dir, tmp_path, capsys):
    """KL(teacher || student) from stored top-k targets vs from full logits, for a few k.

    A random tiny model is almost uniform, unlike a trained LM; its final norm is scaled up
    (SHARPEN) so a few tokens hold most of the mass, as in a real model.
    """
    from minissb.testing import build_tiny_model

    teacher = from_pretrained(tiny_model_dir, dtype=torch.float32)
    student = from_pretrained(build_tiny_model(tmp_path / "student", seed=1, with_tokenizer=False), dtype=torch.float32)
    for m in (teacher, student):
        m.model.norm.weight.data.mul_(SHARPEN)
    V = teacher.config.vocab_size
    full = torch.cat([reference_rows(teacher, tok, p)[0] for p in pairs])  # (N, V) float32 logits
    hidden = []
    with torch.no_grad():
        for p in pairs:
            ids = tok.encode_chat(p["student_chat"], add_generation_prompt=True)
            seq = ids + p["solution_ids"] + [tok.im_end_id]
            hidden.append(student.hidden_states(torch.tensor([seq]))[0, len(ids) - 1 : len(seq) - 1])
    hidden = torch.cat(hidden)  # (N, D), the student's rows at the same solution positions
    weight = student.lm_head.weight
    kl_full = kd_loss(hidden, weight, teacher_logits=full, temperature=T).kl.item()
    kl_bf16 = kd_loss(hidden, weight, teacher_logits=full.bfloat16().float(), temperature=T).kl.item()  # full mode's storage
    rows, errors = [f"full bf16 logits: KL {kl_bf16:.5f} vs float32 {kl_full:.5f}  relative error {(kl_full - kl_bf16) / kl_full:+.4f}"], {}
    for k in (1, 4, 16, 64, V):
        lp, ids = topk_targets(full, k, T)  # what topk mode stores (alignment is tested above)
        kl_k = kd_loss(hidden, weight, topk_logprobs=lp, topk_ids=ids, temperature=T).kl.item()
        mass = lp.exp().sum(-1).mean().item()
        errors[k] = (kl_full - kl_k) / kl_full
        rows.append(f"k={k:>4}  teacher mass kept {mass:6.3f}  KL {kl_k:.5f} vs full {kl_full:.5f}  relative error {errors[k]:+.4f}")
    with capsys.disabled():
        print("\nsparse top-k targets on a tiny peaked model (T=2):\n" + "\n".join(rows))
    ks = sorted(errors)
    assert all(errors[a] >= errors[b] - 1e-4 for a, b in zip(ks, ks[1:]))  # more tokens kept, less error
    assert errors[1] > 0.01 and abs(errors[V]) < 1e-4  # k=1 loses information; k=V is exact
    assert all(e > -1e-4 for e in errors.values())  # the bucketed KL never exceeds the full KL

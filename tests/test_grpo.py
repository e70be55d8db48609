"""GRPO (minissb/grpo.py, grpo.py): advantages, the clipped loss, the KL, gradients against float64,
merged sampling, resume, --match-ssb, bad input, and grpo.py -> eval.py as subprocesses.

Everything runs on tiny random Qwen2 models on the CPU in float32. The end-to-end runs use a
hand-wired 1-layer model that answers \\boxed{1} or \\boxed{2} with equal probability (so half of
a group is right) and whose head separates the two answers along a direction only the adapter
can move the hidden state into (so GRPO has a gradient to follow).
"""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minissb.grpo as G
from minissb.data import Problem, load_problems
from minissb.engine import Engine
from minissb.lora import adapters_disabled, apply_lora, lora_modules, merge_lora, unmerge_lora
from minissb.model import from_pretrained, save_pretrained
from minissb.prompts import student_chat
from minissb.runs import file_sha256
from minissb.testing import build_tiny_model
from minissb.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import grpo  # the script, for in-process runs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory) -> Path:
    """A 1-layer tiny Qwen2 that writes \\boxed{1} or \\boxed{2}, equally likely, then <|im_end|>.

    Attention and MLP outputs are zeroed (hidden = norm(embedding)), the head maps each token of
    the answer to the next one; "1" and "2" get the same logit at every state the base model
    reaches, and opposite weights along a direction u orthogonal to all of them: an adapter that
    moves the hidden state along u makes one answer likelier."""
    out = tmp_path_factory.mktemp("answering")
    build_tiny_model(out, layers=1, tied=False, seed=0)
    tok = Tokenizer.from_dir(out)
    model = from_pretrained(out, dtype=torch.float32)
    newline, one, two = tok.encode("\n"), tok.encode(r"\boxed{1}"), tok.encode(r"\boxed{2}")
    assert len(newline) == 1 and len(one) == len(two) == 5 and one[:3] == two[:3] and one[4] == two[4]
    follows = {newline[0]: [one[0]], one[0]: [one[1]], one[1]: [one[2]], one[2]: [one[3], two[3]],
               one[3]: [one[4]], two[3]: [one[4]], one[4]: [tok.im_end_id]}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        sources = list(follows)
        hidden = model.model.norm(model.model.embed_tokens.weight[sources]).double().T  # (D, S)
        target = torch.full((model.config.vocab_size, len(sources)), -30.0, dtype=torch.float64)
        for j, s in enumerate(sources):
            target[follows[s], j] = 0.0
        head = target @ torch.linalg.pinv(hidden)  # head @ hidden = target
        u = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u -= hidden @ (torch.linalg.pinv(hidden) @ u)  # orthogonal to every reachable state
        head[one[3]] += 3 * u / u.norm()
        head[two[3]] -= 3 * u / u.norm()
        model.lm_head.weight.copy_(head.float())
    save_pretrained(model, out)
    return out


def write_problems(path: Path, n: int, stem: str) -> Path:
    path.write_text("".join(json.dumps({"question": f"{stem} {i}?", "answer": str(1 + i % 2)}) + "\n" for i in range(n)))
    return path


@pytest.fixture()
def tiny_lora(tiny_model_dir):
    """(float32 model with a LoRA whose B is random, its float64 twin with the same adapter, tokenizer)."""
    tok = Tokenizer.from_dir(tiny_model_dir)
    model = apply_lora(from_pretrained(tiny_model_dir, dtype=torch.float32), r=4, alpha=8, seed=0)
    model64 = apply_lora(from_pretrained(tiny_model_dir, dtype=torch.float64), r=4, alpha=8, seed=0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for (_, m), (_, m64) in zip(lora_modules(model), lora_modules(model64)):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
            m64.lora_A.copy_(m.lora_A)
            m64.lora_B.copy_(m.lora_B)
    return model, model64, tok


def make_rollouts(tok, advantages=(1.2, -0.4, 0.7, -1.5, 0.3), lengths=(5, 9, 3, 7, 4)):
    questions = ["What is 3 + 4?", "Tom has 12 apples and gives 5 away. How many are left?", "Find x if 2x = 8."]
    g = torch.Generator().manual_seed(5)
    rollouts = []
    for i, (a, n) in enumerate(zip(advantages, lengths)):
        prompt = tok.encode_chat(student_chat(questions[i % 3]), add_generation_prompt=True)
        completion = torch.randint(0, tok.vocab_size - 3, (n,), generator=g).tolist()
        rollouts.append(G.Rollout(f"p{i % 3}", prompt, completion, "length", 0.0, False, a))
    return rollouts


DELTAS = (0.3, -0.3, 0.05, -0.1, 0.0, 0.25)  # log pi_theta - log pi_old, cycling over tokens: inside and outside the clip


def old_offsets(n: int) -> torch.Tensor:
    return torch.tensor([DELTAS[t % len(DELTAS)] for t in range(n)], dtype=torch.float64)


# ----------------------------------------------------------------------------- advantages and weights


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1.1, 0.1, 0.0, 1.1]], dtype=torch.float64)
    adv, equal = G.group_advantages(rewards)
    assert equal.tolist() == [False, True, True, False, False]
    s0 = math.sqrt(4 * 0.25 / 3)  # Bessel: sum of squared deviations / (G - 1)
    s3 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    m4 = 2.3 / 4
    s4 = math.sqrt(sum((x - m4) ** 2 for x in (1.1, 0.1, 0.0, 1.1)) / 3)
    want = [[0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), -0.5 / (s0 + 1e-4), 0.5 / (s0 + 1e-4)], [0] * 4, [0] * 4,
            [0.75 / (s3 + 1e-4)] + [-0.25 / (s3 + 1e-4)] * 3, [(x - m4) / (s4 + 1e-4) for x in (1.1, 0.1, 0.0, 1.1)]]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    adv, equal = G.group_advantages(rewards, scale_by_std=False)  # Dr. GRPO
    want = [[0.5, -0.5, -0.5, 0.5], [0] * 4, [0] * 4, [0.75, -0.25, -0.25, -0.25], [x - m4 for x in (1.1, 0.1, 0.0, 1.1)]]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="G >= 2"):
        G.group_advantages(torch.ones(3, 1))


def test_token_weights_normalise_by_tokens_or_by_sequences():
    torch.testing.assert_close(G.token_weights([2, 3], "token"), torch.full((5,), 0.2))
    torch.testing.assert_close(G.token_weights([2, 3], "sequence"), torch.tensor([1 / 4, 1 / 4, 1 / 6, 1 / 6, 1 / 6]))


def test_reward_counts_a_right_answer_and_optionally_a_box():
    p = Problem("gsm8k/train/0", "q", "18", "gsm8k")
    assert G.reward("so it is \\boxed{18}", True, p) == (1.0, True)
    assert G.reward("so it is \\boxed{17}", True, p, format_reward=0.1) == (0.1, False)
    assert G.reward("The answer is 18", True, p, format_reward=0.1) == (1.0, True)  # right, but no box
    assert G.reward("The answer is 18", False, p) == (0.0, False)  # cut off: only a closed box counts, as in eval.py


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_clipped_ratio_below_at_and_above_the_clip_range(adv):
    eps = 0.2
    # ratios: far below, inside, 1, inside, far above; then exactly 1 - eps and 1 + eps
    lp = torch.tensor([-0.4, -0.1, 0.0, 0.1, 0.4, 0.18, -0.2], dtype=torch.float64, requires_grad=True)
    ratio = lp.detach().exp()
    hi, lo = ratio[5].item() - 1, 1 - ratio[6].item()  # exact: clip ranges whose edges are these ratios
    for eps_, at in ((eps, None), (hi, 5), (lo, 6)):
        lp.grad = None
        A = torch.full((7,), adv, dtype=torch.float64)
        parts = G.grpo_loss(lp, torch.zeros(7, dtype=torch.float64), A, torch.ones(7, dtype=torch.float64), eps_)
        parts.loss.backward()
        for t, r in enumerate(ratio.tolist()):
            outside = (adv > 0 and r > 1 + eps_) or (adv < 0 and r < 1 - eps_)
            want_grad = 0.0 if outside else -r * adv  # d/dlp of -rho A is -rho A; a clipped token is flat
            assert lp.grad[t].item() == pytest.approx(want_grad, abs=1e-12), (t, r, eps_)
        value = sum(-min(r * adv, min(max(r, 1 - eps_), 1 + eps_) * adv) for r in ratio.tolist())
        assert parts.loss.item() == pytest.approx(value, abs=1e-12)
        n_out = sum((adv > 0 and r > 1 + eps_) or (adv < 0 and r < 1 - eps_) for r in ratio.tolist())
        assert parts.clipped == n_out
        if at is not None:  # at the edge the token still learns and is not counted as clipped
            assert lp.grad[at].item() == pytest.approx(-ratio[at].item() * adv, abs=1e-12)


def test_on_policy_ratio_is_one_and_the_loss_is_the_plain_policy_gradient():
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([1.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.tensor([0.25] * 4, dtype=torch.float64)
    parts = G.grpo_loss(lp, lp.detach(), A, w)
    parts.loss.backward()
    assert parts.loss.item() == pytest.approx(-(w * A).sum().item()) and parts.clipped == 0
    torch.testing.assert_close(lp.grad, -(w * A))  # the gradient of -sum w A log pi


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_loss_and_gradients_match_a_float64_computation_of_the_objective(tiny_lora, norm):
    model, model64, tok = tiny_lora
    rollouts = make_rollouts(tok)
    cfg = G.GRPOConfig(micro_batch_size=2, loss_chunk_size=4, beta=0.05, clip_eps=0.2, loss_norm=norm)
    micro = G.micro_batches(rollouts, cfg, tok.pad_id, "cpu")  # 3 micro-batches, 4-position LM-head chunks
    for mb in micro:  # pi_old: the current log-probs shifted per token, so that some ratios leave the clip range
        with torch.no_grad():
            lp = G.completion_logprobs(model, mb.batch)
        mb.old = lp - torch.cat([old_offsets(len(r.completion_ids)) for r in mb.rollouts]).float()
    stats = G.accumulate_gradients(model, micro, cfg)

    # The GRPO objective written out in float64: each rollout alone (no padding), full logits.
    order = [r for mb in micro for r in mb.rollouts]
    n_total = sum(len(r.completion_ids) for r in order)
    loss64, kl64, clipped = 0.0, 0.0, 0
    for r in order:
        ids = torch.tensor([r.prompt_ids + r.completion_ids[:-1]])
        P, n = len(r.prompt_ids), len(r.completion_ids)
        y = torch.tensor(r.completion_ids)
        lp = model64(ids)[0, P - 1 : P - 1 + n].log_softmax(-1).gather(-1, y[:, None])[:, 0]
        with torch.no_grad(), adapters_disabled(model64):
            ref = model64(ids)[0, P - 1 : P - 1 + n].log_softmax(-1).gather(-1, y[:, None])[:, 0]
        ratio = torch.exp(lp - (lp.detach() - old_offsets(n)))
        surrogate = torch.minimum(ratio * r.advantage, ratio.clamp(0.8, 1.2) * r.advantage)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        per_token = -surrogate + 0.05 * kl
        loss64 = loss64 + (per_token.sum() / n_total if norm == "token" else per_token.mean() / len(order))
        kl64 += kl.sum().item()
        clipped += int((((ratio < 0.8) & (torch.tensor(r.advantage) < 0)) | ((ratio > 1.2) & (torch.tensor(r.advantage) > 0))).sum())
    loss64.backward()

    assert stats["loss"] == pytest.approx(loss64.item(), rel=1e-5, abs=1e-7)
    assert stats["kl_sum"] / stats["tokens"] == pytest.approx(kl64 / n_total, rel=1e-4)
    assert stats["clipped"] == clipped and 0 < clipped < n_total
    assert stats["tokens"] == n_total
    for (name, m32), (_, m64) in zip(lora_modules(model), lora_modules(model64)):
        for p32, p64 in ((m32.lora_A, m64.lora_A), (m32.lora_B, m64.lora_B)):
            assert p32.grad is not None and p64.grad.abs().max() > 0, name
            torch.testing.assert_close(p32.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)


def test_only_lora_parameters_get_gradients(tiny_lora):
    model, _, tok = tiny_lora
    cfg = G.GRPOConfig(beta=0.1)
    G.accumulate_gradients(model, G.micro_batches(make_rollouts(tok), cfg, tok.pad_id, "cpu"), cfg)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_kl_term_against_a_direct_computation(tiny_lora, tiny_model_dir):
    model, _, tok = tiny_lora
    rollouts = make_rollouts(tok)
    base = from_pretrained(tiny_model_dir, dtype=torch.float64)  # the reference, loaded on its own: no adapter at all
    cfg = G.GRPOConfig(beta=0.5, micro_batch_size=8)
    [mb] = G.micro_batches(rollouts, cfg, tok.pad_id, "cpu")
    ref = G.reference_logprobs(model, mb.batch, cfg)
    with torch.no_grad():
        lp = G.completion_logprobs(model, mb.batch)
    want_ref, want_kl = [], []
    for r in mb.rollouts:
        ids, P, n = torch.tensor([r.prompt_ids + r.completion_ids[:-1]]), len(r.prompt_ids), len(r.completion_ids)
        with torch.no_grad():
            logits = base(ids)[0, P - 1 : P - 1 + n]
        want_ref.append(logits.log_softmax(-1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0])
    want_ref = torch.cat(want_ref)
    torch.testing.assert_close(ref.double(), want_ref, rtol=0, atol=1e-5)
    d = want_ref - lp.double()
    want_kl = d.exp() - d - 1  # k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0
    assert (want_kl >= 0).all() and want_kl.sum() > 0
    w = torch.full((len(lp),), 1.0 / len(lp))
    A = torch.zeros(len(lp))
    with_kl = G.grpo_loss(lp, lp, A, w, beta=0.5, ref_logprobs=ref)
    assert with_kl.kl_sum == pytest.approx(want_kl.sum().item(), rel=1e-4)
    assert with_kl.loss.item() == pytest.approx(0.5 * want_kl.mean().item(), rel=1e-4)  # A = 0: the KL term alone
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        G.grpo_loss(lp, lp, A, w, beta=0.5)
    with torch.no_grad():  # a zero adapter is the reference itself: KL 0
        for _, m in lora_modules(model):
            m.lora_B.zero_()
        zero = G.grpo_loss(G.completion_logprobs(model, mb.batch), lp, A, w, beta=0.5, ref_logprobs=ref)
    assert zero.kl_sum == pytest.approx(0.0, abs=1e-9)


def test_micro_batches_and_chunks_do_not_change_the_gradient(tiny_lora):
    model, _, tok = tiny_lora
    grads = []
    for micro_size, chunk in ((1, 2), (8, 256)):
        cfg = G.GRPOConfig(micro_batch_size=micro_size, loss_chunk_size=chunk)
        model.zero_grad(set_to_none=True)
        G.accumulate_gradients(model, G.micro_batches(make_rollouts(tok), cfg, tok.pad_id, "cpu"), cfg)
        grads.append([p.grad.clone() for _, m in lora_modules(model) for p in (m.lora_A, m.lora_B)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- sampling


def test_merged_sampling_gives_the_unmerged_tokens_and_restores_the_base_exactly(tiny_lora, tiny_model_dir):
    model, _, tok = tiny_lora
    problems = [Problem(f"p{i}", q, "7", "gsm8k") for i, q in enumerate(["What is 3 + 4?", "Find x if 2x = 8."])]
    prompt_ids = {p.id: tok.encode_chat(student_chat(p.question), add_generation_prompt=True) for p in problems}
    engine = Engine(model, 8, 160, stop_ids=tok.stop_ids, tokenizer=tok)
    cfg = G.GRPOConfig(group_size=4, max_new_tokens=12, questions_per_step=2)
    before = {n: m.weight.clone() for n, m in lora_modules(model)}
    runs = []
    for copy in (G.base_weight_copy(model), None):  # merged, then through the LoRA branch
        with G.sampling_weights(model, copy):
            assert all(m.merged == (copy is not None) for _, m in lora_modules(model))
            runs.append([[r.completion_ids for r in g] for g in G.sample_groups(engine, problems, prompt_ids, 3, cfg)])
        assert not any(m.merged for _, m in lora_modules(model))
        assert all(torch.equal(m.weight, before[n]) for n, m in lora_modules(model))  # bit for bit
    assert runs[0] == runs[1] and len(runs[0]) == 2 and all(len(g) == 4 for g in runs[0])
    assert len({tuple(c) for g in runs[0] for c in g}) > 1  # sampled, not one greedy answer

    # In bf16 a merge + unmerge alone moves some base weights by an ulp; the copy puts them back.
    bf = from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    apply_lora(bf, r=4, alpha=8, seed=0)
    with torch.no_grad():
        for (_, m), (_, src) in zip(lora_modules(bf), lora_modules(model)):
            m.lora_B.copy_(src.lora_B * 10)
    w0 = {n: m.weight.clone() for n, m in lora_modules(bf)}
    merge_lora(bf)
    unmerge_lora(bf)
    assert not all(torch.equal(m.weight, w0[n]) for n, m in lora_modules(bf))
    copy = {n: w.clone() for n, w in w0.items()}
    with G.sampling_weights(bf, copy):
        pass
    assert all(torch.equal(m.weight, w0[n]) for n, m in lora_modules(bf))


# ----------------------------------------------------------------------------- whole runs


def run_config(out, model, data, **kw):
    base = dict(out=str(out), model=str(model), data=str(data), device="cpu", dtype="fp32", group_size=4,
                questions_per_step=2, max_new_tokens=8, lora_r=4, lora_alpha=8.0, lr=5e-2, progress=False)
    return G.GRPOConfig(**{**base, **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def strip(lines):
    return [{k: v for k, v in m.items() if k not in G.GRPO_TIMING_FIELDS} for m in lines]


def test_resume_equals_an_uninterrupted_run(tmp_path, answering_model):
    data = write_problems(tmp_path / "train.jsonl", 6, "Which number do I think of, puzzle")
    # 3 steps per epoch x 2 epochs; two inner steps (the clip acts), a KL, dropout (the RNG matters).
    kw = dict(epochs=2, max_steps=0, inner_steps=2, beta=0.1, lora_dropout=0.1, save_every=2, keep_checkpoints=2)
    grpo.train(run_config(tmp_path / "straight", answering_model, data, **kw))
    run = tmp_path / "resumed"
    summary = grpo.train(run_config(run, answering_model, data, stop_after_steps=4, **kw))
    assert summary["adapter"] is None and len(metrics(run)) == 4
    shutil.rmtree(run / "checkpoints" / "step-000004")  # killed after step 4 was logged, before its checkpoint
    with pytest.raises(ValueError, match=r"other settings \(--beta: 0.1 there, 0.2 now\)"):
        grpo.train(run_config(run, answering_model, data, **{**kw, "beta": 0.2}))
    grpo.train(run_config(run, answering_model, data, **kw))  # the same command again continues from step 2

    straight, resumed = metrics(tmp_path / "straight"), metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    assert strip(resumed) == strip(straight)
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained
    before = {f: f.read_bytes() for f in run.rglob("*") if f.is_file()}
    again = grpo.train(run_config(run, answering_model, data, **kw))  # finished: a rerun trains and writes nothing
    assert again["adapter"] == str(run / "adapter") and again["last"] == resumed[-1]
    assert {f: f.read_bytes() for f in run.rglob("*") if f.is_file()} == before
    assert any(m["clip_frac"] for m in straight if m["clip_frac"] is not None)  # the second inner step clipped
    assert all(m["kl"] is not None for m in straight if m["loss"] is not None)
    assert straight[0]["completion_len"] == 6  # \boxed{1} or \boxed{2}, then <|im_end|>, before any update
    for m in straight:
        assert 0 <= m["accuracy"] <= 1 and m["frac_all_equal"] in (0, 0.5, 1)
        assert (m["loss"] is None) == (m["frac_all_equal"] == 1)  # a step whose groups are all equal has no update


@pytest.mark.parametrize("no_std", [False, True])
def test_grpo_learns_to_give_the_rewarded_answer(tmp_path, answering_model, no_std):
    # Every gold is 2: the base model is right half the time, and GRPO should push it to "2".
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": f"Say two, please {i}?", "answer": "2"}) + "\n" for i in range(8)))
    grpo.train(run_config(tmp_path / "run", answering_model, data, group_size=8, questions_per_step=4, max_steps=4, epochs=2,
                          lr=1e-2, min_lr_ratio=1.0, no_std=no_std, save_every=0))
    rewards = [m["reward_mean"] for m in metrics(tmp_path / "run")]
    assert 0.2 < rewards[0] < 0.8 and rewards[-1] >= 0.9, rewards


def test_match_ssb_trains_on_the_ssb_problems_for_its_steps(tmp_path, answering_model):
    data = write_problems(tmp_path / "train.jsonl", 6, "Which number do I think of, puzzle")
    problems = load_problems("gsm8k", split="train", source=data)
    ssb = tmp_path / "ssb"
    ssb.mkdir()
    pairs = ssb / "pairs.jsonl"
    chosen = [problems[i] for i in (4, 1, 2)]
    pairs.write_text("".join(json.dumps({"id": p.id, "question": p.question, "gold": p.gold,
                                         "student_chat": student_chat(p.question)}) + "\n" for p in chosen))
    (ssb / "pairs.summary.json").write_text(json.dumps({"generation_seconds": 12.5}))
    train_dir = ssb / "train"
    train_dir.mkdir()
    (train_dir / "run.json").write_text(json.dumps({
        "config": {"pairs": str(pairs), "batch_size": 2, "epochs": 2, "seed": 0, "model": str(answering_model),
                   "lora_r": 4, "lora_alpha": 8.0, "dtype": "fp32"},
        "data_sha256": file_sha256(pairs), "n_pairs": 3, "total_steps": 4}))
    # Two processes: elapsed_s restarts at the resume, so the wall-clock is 2.5 + 1.9 s.
    (train_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "elapsed_s": e}) + "\n"
                                                     for i, e in enumerate([1.0, 2.5, 0.7, 1.9])))

    with pytest.raises(ValueError, match="drop --questions-per-step"):
        G.check_config(run_config(tmp_path / "x", answering_model, data, match_ssb=str(train_dir)))
    cfg = run_config(tmp_path / "run", answering_model, data, match_ssb=str(train_dir), questions_per_step=None)
    summary = grpo.train(cfg)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["n_problems"], info["total_steps"], info["config"]["questions_per_step"], info["config"]["epochs"]) == (3, 4, 2, 2)
    assert "GRPO" in summary["wall_clock"] and "SSB train.py 4.4 s (4 steps) after 12.5 s of sample.py" in summary["wall_clock"]
    assert len(metrics(tmp_path / "run")) == 4
    # Step by step the same problems as train.py's (same epoch order formula, same seed).
    ids = [p.id for p in chosen]
    for step in range(4):
        epoch, index = divmod(step, 2)
        order = G.epoch_order(3, 0, epoch)
        want = [ids[i] for i in order[index * 2 : (index + 1) * 2]]
        assert [p.id for p in G.step_problems(chosen, step, 2, 0)[0]] == want

    assert G.ssb_mismatches(G.read_ssb_run(train_dir), G.GRPOConfig(model=str(answering_model), lora_r=8, lora_alpha=8.0,
                                                                   dtype="fp32"), "Another prompt.") == [
        "--lora-r is 8 here but 4 in the SSB run",
        "the system prompt differs from the one in the SSB run's pairs (pass the --system-prompt-file sample.py read)"]
    pairs.write_text(pairs.read_text() + "\n")
    with pytest.raises(ValueError, match="changed since that run trained on it"):
        G.read_ssb_run(train_dir)


def main_error(capsys, *args) -> str:
    assert grpo.main([*map(str, args), "--no-progress"]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_gives_one_error_line(tmp_path, answering_model, capsys):
    data = write_problems(tmp_path / "train.jsonl", 4, "Puzzle")
    common = ("--model", answering_model, "--device", "cpu", "--dtype", "fp32", "--data", data)
    for args, message in ((("--group-size", "1"), "--group-size/-G: must be an integer >= 2, got '1'"),
                          (("--temperature", "0"), "--temperature: must be a finite number > 0, got '0'"),
                          (("--clip-eps", "nan"), "--clip-eps: must be a finite number > 0 and < 1, got 'nan'")):
        with pytest.raises(SystemExit) as e:
            grpo.main([*args, "--out", str(tmp_path / "a")])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert "no run.json of a train.py run" in main_error(capsys, *common, "--out", tmp_path / "b", "--match-ssb", tmp_path)
    assert "drop --epochs" in main_error(capsys, *common, "--out", tmp_path / "b", "--match-ssb", tmp_path, "--epochs", "2")
    assert "--batch-size 2 is smaller than --group-size 4" in main_error(capsys, *common, "--out", tmp_path / "c", "-G", "4",
                                                                         "--batch-size", "2")
    assert "holds no training run to continue" in main_error(capsys, *common, "--out", tmp_path / "d", "--resume")
    assert "missing.jsonl" in main_error(capsys, *common[:-1], tmp_path / "missing.jsonl", "--out", tmp_path / "e")
    (tmp_path / "file").write_text("")
    assert "is a file" in main_error(capsys, *common, "--out", tmp_path / "file")


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        grpo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    options = [a for a in grpo.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 40
    for action in options:
        assert action.help and len(action.help) > 5 and action.option_strings[-1] in text, action.option_strings
    for default in ("(default: 8)", "(default: 512)", "(default: 1e-05)", "(default: 0.2)", "(default: 32)", "default: 4", "default: 192"):
        assert default in " ".join(text.split()), default


def test_grpo_then_eval_as_subprocesses(tmp_path, answering_model):
    train_data = write_problems(tmp_path / "train.jsonl", 4, "Which number do I think of, puzzle")
    test_data = write_problems(tmp_path / "test.jsonl", 4, "Guess my number, round")
    plot = importlib.util.find_spec("matplotlib") is not None
    common = ["--model", str(answering_model), "--device", "cpu", "--dtype", "fp32"]
    proc = subprocess.run([sys.executable, str(REPO / "grpo.py"), *common, "--data", str(train_data), "--out", "runs/grpo",
                           "-G", "4", "--questions-per-step", "2", "--max-new-tokens", "8", "--max-steps", "2", "--lora-r", "4",
                           "--lr", "5e-2", *(["--plot"] if plot else [])],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout, proc.stderr)
    assert "4 problems, 2 questions x 4 completions per step" in proc.stdout + proc.stderr
    assert "adapter saved to runs/grpo/adapter" in proc.stdout + proc.stderr
    run = tmp_path / "runs/grpo"
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert {"reward_mean", "accuracy", "frac_all_equal", "completion_len", "kl", "clip_frac", "loss", "grad_norm", "lr",
                "tokens_per_s", "step_time_s", "elapsed_s"} <= m.keys()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("LORA", 4, str(answering_model))
    if plot:
        assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *common, "--no-progress", "--adapter", "grpo=runs/grpo/adapter",
                           "--datasets", "gsm8k", "--data", f"gsm8k={test_data}", "--max-new-tokens", "8", "--out", "runs/eval"],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "runs/eval/results.json").read_text())["results"]
    assert [(r["model"], r["dataset"], r["problems"]) for r in results] == [("base", "gsm8k", 4), ("grpo", "gsm8k", 4)]

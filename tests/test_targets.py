"""Captured teacher targets: the engine's hidden states against the online teacher, storage, refusals.

The chain that makes --teacher captured exact: the rows the engine returns while the teacher
writes its solution equal the online teacher's final hidden states at the trained positions
(a full forward over [hinted prompt | solution | <|im_end|>], through distill's own online
code), and a training step fed from the stored rows has the online step's loss and gradients.
"""

import json

import pytest
import torch

from minissb import distill, prompts
from minissb.distill import TrainConfig, build_examples, load_pairs, micro_batch_loss, online_teacher_hidden
from minissb.engine import Engine, Request
from minissb.lora import apply_lora, lora_modules, lora_parameters
from minissb.model import from_pretrained, init_weights, save_pretrained
from minissb.targets import CapturedTargets
from minissb.testing import build_tiny_model
from minissb.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # std 0.2: peaked distributions, so teacher and student disagree and sampling is not uniform noise.
    path = build_tiny_model(tmp_path_factory.mktemp("targets_model"))
    save_pretrained(init_weights(from_pretrained(path, dtype=torch.float32), std=0.2, seed=1), path)
    return path


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_dir(model_dir)


QUESTIONS = ["Tom has 4 apples and buys 7 more. How many?", "What is 3 times 5?", "A box holds 6 eggs. How many in 4 boxes?"]


def teacher_chat(q):
    # A short hinted chat (the real template is ~450 tiny-tokenizer tokens): any chat works the same way.
    return [{"role": "system", "content": prompts.SYSTEM_PROMPT},
            {"role": "user", "content": f"{q}\nA right attempt: \\boxed{{11}}\nA wrong attempt: \\boxed{{5}}"}]


def generate_pairs(model, tok, stop_after=(9, 14, 5)):
    """Teacher solutions sampled by the engine with hidden states, each made to stop at a chosen
    step (its token there becomes the stop token of a second, identical run)."""
    pairs, hidden = [], []
    for i, (q, n) in enumerate(zip(QUESTIONS, stop_after)):
        ids = tok.encode_chat(teacher_chat(q), add_generation_prompt=True)
        req = dict(prompt=ids, max_new_tokens=24, temperature=0.9, top_k=40, seed=i, return_hidden=True)
        free = next(Engine(model, 2, 64 + len(ids)).run([Request(**req)])).completions[0]
        stop = free.token_ids[n]
        if stop in free.token_ids[:n]:
            continue  # would stop earlier; the test needs a few solutions, not all
        comp = next(Engine(model, 2, 64 + len(ids), stop_ids=[stop]).run([Request(**req)])).completions[0]
        assert comp.finish_reason == "stop" and comp.token_ids == free.token_ids[:n]
        pairs.append({"id": f"gsm8k/train/{i}", "dataset": "gsm8k", "question": q, "gold": "11",
                      "student_chat": prompts.student_chat(q), "teacher_chat": teacher_chat(q),
                      "solution": tok.decode(comp.token_ids), "solution_ids": comp.token_ids, "finish_reason": "stop",
                      "model": "tiny"})
        hidden.append(comp.hidden)
    assert len(pairs) >= 2
    return pairs, hidden


def write_run(tmp_path, model, tok, model_name, pairs, hidden, dtype=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    store = CapturedTargets(tmp_path / "pairs.targets")
    store.open_for_writing(model_name, model.dtype, dtype or model.dtype, model.config.hidden_size, [])
    for p, h in zip(pairs, hidden):
        store.write(p["id"], p["solution_ids"], h if dtype is None else h.to(dtype))
    return path, store


def examples(path, tok, model):
    return build_examples(load_pairs(path), tok, vocab_size=model.config.vocab_size, max_seq_len=4096, truncate=False,
                          online_teacher=True, pairs_path=str(path))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_captured_rows_equal_the_online_teacher(tmp_path, model_dir, tok, dtype, atol):
    # bf16: the engine's single-query decode attention and the full forward's SDPA round
    # differently. The hidden states are RMS-normed (mean |entry| 0.8, largest ~4, where one
    # bf16 ulp is 2^-6); measured max |diff| 0.0625 (float32: 5.4e-6), so 0.1 allows ~4 ulps.
    model = from_pretrained(model_dir, dtype=dtype)
    pairs, hidden = generate_pairs(model, tok)
    path, _ = write_run(tmp_path, model, tok, "tiny", pairs, hidden)
    exs = examples(path, tok, model)
    online, _ = online_teacher_hidden(model, exs, tok.pad_id)  # (N, D)
    captured = torch.cat(hidden)
    assert captured.shape == online.shape == (sum(len(p["solution_ids"]) + 1 for p in pairs), model.config.hidden_size)
    diff = (captured.float() - online.float()).abs().max().item()
    print(f"{dtype}: max |captured - online| = {diff:.2e} (mean |entry| {online.float().abs().mean().item():.2f})")
    assert diff <= atol, diff
    # Off by one is caught: every row shifted one position down is far away.
    first = hidden[0].float()
    P_rows = online[: first.shape[0]].float()
    assert (first[1:] - P_rows[:-1]).abs().max().item() > 20 * atol
    # And directly, without distill's code: row 0 is the prompt's last position, row S the last solution token's.
    prompt = tok.encode_chat(pairs[0]["teacher_chat"], add_generation_prompt=True)
    with torch.no_grad():
        full = model.hidden_states(torch.tensor([prompt + pairs[0]["solution_ids"]]))[0]
    torch.testing.assert_close(first[[0, -1]], full[[len(prompt) - 1, -1]].float(), atol=atol, rtol=0)


def lora_model(model_dir):
    model = from_pretrained(model_dir, dtype=torch.float32)
    apply_lora(model, r=8, alpha=16, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return model


def test_a_step_from_captured_targets_equals_the_online_step(tmp_path, model_dir, tok):
    base = from_pretrained(model_dir, dtype=torch.float32)
    pairs, hidden = generate_pairs(base, tok)
    path, _ = write_run(tmp_path, base, tok, str(model_dir.resolve()), pairs, hidden)
    cfg = TrainConfig(pairs=str(path), model=str(model_dir), device="cpu", dtype="fp32", lora_r=8, lora_alpha=16)
    results = {}
    for mode in ("online", "captured"):
        model = lora_model(model_dir)
        exs = examples(path, tok, model)
        captured = distill.CapturedTeacher(tmp_path / "pairs.targets", str(model_dir), torch.float32, model.config.hidden_size, load_pairs(path)) if mode == "captured" else None
        res, n_input = micro_batch_loss(model, exs, cfg, tok.pad_id, captured)
        res.loss.backward()
        results[mode] = (res, n_input, [p.grad.clone() for p in lora_parameters(model)])
    (on, on_n, on_g), (cap, cap_n, cap_g) = results["online"], results["captured"]
    assert on.kl.item() > 0.05  # a real disagreement, not two zeros
    assert cap.loss.item() == pytest.approx(on.loss.item(), rel=1e-5)
    for a, b in zip(on_g, cap_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # float32 sums in another order: ~1e-7 apart
    assert cap_n < on_n  # no teacher tokens went through the model


def test_refusals_name_the_problem(tmp_path, model_dir, tok):
    base = from_pretrained(model_dir, dtype=torch.float32)
    pairs, hidden = generate_pairs(base, tok)
    path, store = write_run(tmp_path, base, tok, str(model_dir.resolve()), pairs, hidden)
    loaded = load_pairs(path)
    D = base.config.hidden_size

    def teacher(model=str(model_dir), dtype=torch.float32, recs=loaded, where=tmp_path / "pairs.targets"):
        return distill.CapturedTeacher(where, model, dtype, D, recs)

    teacher()  # the good case
    with pytest.raises(ValueError, match="captured with model"):
        teacher(model="Qwen/Qwen2.5-3B-Instruct")
    with pytest.raises(ValueError, match="teacher_dtype 'float32'"):
        teacher(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not found"):
        teacher(where=tmp_path / "nowhere")
    other = [(n, {**r, "id": "gsm8k/train/99"}) for n, r in loaded]
    with pytest.raises(ValueError, match="no targets for pair gsm8k/train/99"):
        teacher(recs=other)
    # A pairs file whose solution changed under the same id: its rows belong to another solution.
    changed = [(n, {**r, "solution_ids": r["solution_ids"][:-1]}) for n, r in loaded]
    t = teacher(recs=changed)
    exs = build_examples(changed, tok, vocab_size=base.config.vocab_size, max_seq_len=4096, truncate=False,
                         online_teacher=False, pairs_path=str(path))
    with pytest.raises(ValueError, match="another solution"):
        t.rows(exs[0])
    # Rows whose count is not S + 1 are refused when written.
    with pytest.raises(AssertionError):
        store.write("x", [1, 2, 3], torch.zeros(3, D))
    # A torn or garbage file is one line naming it, not a SafetensorError traceback.
    for f in (tmp_path / "pairs.targets").glob("*.safetensors"):
        f.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="cannot read the targets of pair"):
        store.read(pairs[0]["id"], pairs[0]["solution_ids"])


def test_bf16_storage_halves_the_bytes_and_stays_within_rounding(tmp_path, model_dir, tok):
    base = from_pretrained(model_dir, dtype=torch.float32)
    pairs, hidden = generate_pairs(base, tok)
    _, f32 = write_run(tmp_path / "a", base, tok, "tiny", pairs, hidden)
    _, b16 = write_run(tmp_path / "b", base, tok, "tiny", pairs, hidden, dtype=torch.bfloat16)
    (bytes32, rows, per32), (bytes16, rows16, per16) = f32.bytes_per_token(), b16.bytes_per_token()
    D = base.config.hidden_size
    assert rows == rows16 == sum(len(p["solution_ids"]) + 1 for p in pairs)
    assert 4 * D <= per32 and 2 * D <= per16 < per32  # headers: a few hundred bytes per file
    for p, h in zip(pairs, hidden):
        torch.testing.assert_close(b16.read(p["id"], p["solution_ids"]).float(), h, atol=0.02, rtol=2**-8)

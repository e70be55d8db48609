"""minissb.engine and generate(): the slot pool against full forwards, transformers and itself.

The model is a tiny random Qwen2 with larger-than-usual weights (std 0.3) so that greedy
decoding does not collapse onto one repeated token and argmaxes are not near-ties. The
references: an uncached full forward (logits, hidden states, greedy tokens), transformers'
generate and logits processors, and the engine run with other pool sizes and other traffic.
"""

import numpy as np
import pytest
import torch

from minissb.engine import (
    Completion,
    Engine,
    Request,
    apply_repetition_penalty,
    sample_tokens,
    top_k_mask,
    top_p_mask,
    uniforms,
)
from minissb.generate import generate, prompt_seed
from minissb.model import Qwen2Config, Qwen2ForCausalLM, init_weights, save_pretrained

VOCAB = 256
CFG = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    return init_weights(Qwen2ForCausalLM(Qwen2Config(**CFG)), std=0.3, seed=0).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = random_prompts((3, 11, 7, 1))
# 8 stop tokens: sampled rows end at scattered steps, and some run to max_new_tokens.
STOPS = list(range(0, VOCAB, 32))


def full_forward(model, ids):
    """(logits, final normed hidden states) of one uncached forward over a single sequence."""
    seq = torch.tensor([ids])
    with torch.no_grad():
        hidden = model.hidden_states(seq)[0]
        return model.lm_head(hidden).float(), hidden


def reference_greedy(model, prompt, max_new, stops=()):
    """Greedy decoding the slow way: a full forward over everything so far, every step."""
    out = []
    for _ in range(max_new):
        tok = int(full_forward(model, prompt + out)[0][-1].argmax())
        if tok in stops:
            break
        out.append(tok)
    return out


def run_engine(model, requests, num_slots, max_len=64, stops=STOPS, **kwargs):
    """{tag: [(token_ids, finish_reason, stop_id) per sample]} for the engine's outputs."""
    engine = Engine(model, num_slots, max_len, stop_ids=stops, **kwargs)
    return {o.request.tag: [(c.token_ids, c.finish_reason, c.stop_id) for c in o.completions] for o in engine.run(requests)}


def sampled(model, prompts, num_slots, seed, max_new_tokens, stops=STOPS, **request):
    """generate()'s requests (prompt i seeded with prompt_seed(seed, i)) through a pool of num_slots: all completions."""
    requests = [Request(p, max_new_tokens, seed=prompt_seed(seed, i), **request) for i, p in enumerate(prompts)]
    return [c for o in Engine(model, num_slots, 64, stop_ids=stops).run(requests) for c in o.completions]


# ----------------------------------------------------------------------------- against references


def test_cached_decoding_matches_full_forward(model):
    # Sampled rows of ragged prompts, K samples sharing a prefill, a pool too small for all:
    # each token's log-prob must be that of a plain forward over prompt + tokens so far.
    outs = sampled(model, PROMPTS, 3, 0, 16, num_samples=2, temperature=1.0, return_logprobs=True)
    assert {c.finish_reason for c in outs} == {"stop", "length"}
    for c in outs:
        generated = c.token_ids + ([c.stop_id] if c.finish_reason == "stop" else [])
        assert len(c.logprobs) == len(generated)
        logits, _ = full_forward(model, PROMPTS[c.prompt_index] + generated)
        P = len(PROMPTS[c.prompt_index])
        ref = logits.log_softmax(-1)[torch.arange(P - 1, P - 1 + len(generated)), torch.tensor(generated)]
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_hidden_states_equal_a_full_forward(model):
    outs = sampled(model, PROMPTS, 4, 3, 20, num_samples=2, temperature=1.0, return_hidden=True)
    assert {c.finish_reason for c in outs} == {"stop", "length"}
    for c in outs:
        P = len(PROMPTS[c.prompt_index])
        stopped = c.finish_reason == "stop"
        assert c.hidden.shape == (len(c.token_ids) + stopped, CFG["hidden_size"])
        # Rows are positions P-1 .. P-1+rows-1 of [prompt, tokens]: the stop token's own
        # position is never fed, so the full forward runs over prompt + token_ids only.
        _, ref = full_forward(model, PROMPTS[c.prompt_index] + c.token_ids)
        # rtol too: on an AMD EPYC (Zen 4) one of 1,280 entries differed by 1.06e-5 at a value of 0.85
        # (the cached and the full forward multiply different shapes); an Intel Xeon stayed under 1e-5.
        torch.testing.assert_close(c.hidden, ref[P - 1 : P - 1 + c.hidden.shape[0]], atol=1e-5, rtol=1e-5)
    # A one-row shift is caught by the same comparison.
    c = max(outs, key=lambda c: len(c.token_ids))
    P = len(PROMPTS[c.prompt_index])
    _, ref = full_forward(model, PROMPTS[c.prompt_index] + c.token_ids)
    assert not torch.allclose(c.hidden[1:], ref[P - 1 : P - 2 + c.hidden.shape[0]], atol=1e-3)


def test_greedy_equals_full_forward_greedy_for_any_pool(model):
    prompts = random_prompts((3, 11, 7, 1, 5, 9, 2), seed=4)
    stops = STOPS[:3]
    ref = {i: [(t := reference_greedy(model, p, 24, stops), "stop" if len(t) < 24 else "length")] for i, p in enumerate(prompts)}
    for slots in (1, 3, 8):
        got = run_engine(model, [Request(p, 24, tag=i) for i, p in enumerate(prompts)], slots, stops=stops)
        assert {i: [(t, f)] for i, [(t, f, _)] in got.items()} == ref
    assert len({len(t) for [(t, _)] in ref.values()}) > 2  # rows end at different steps


def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_pretrained(model, tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = generate(model, PROMPTS, max_new_tokens=20)  # a pool of 4
    pool_of_2 = run_engine(model, [Request(p, 20, tag=i) for i, p in enumerate(PROMPTS)], 2, stops=())
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)
        assert ours[i].token_ids == pool_of_2[i][0][0] == ref[0, len(p):].tolist()


def test_repetition_penalty_equals_transformers_processor():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    history = torch.randint(0, 300, (5, 40), generator=g)
    seen = torch.zeros(5, 300, dtype=torch.bool).scatter(1, history, True)
    for penalty in (1.05, 1.3, 0.8):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, torch.full((5,), penalty)), ref, atol=0, rtol=0)


def test_repetition_penalty_in_the_engine_covers_prompt_and_generated_tokens(model):
    # Greedy with a penalty, the slow way: penalise every token of prompt + generated so far.
    prompt, penalty = PROMPTS[1], 1.5
    ref = []
    for _ in range(12):
        logits = full_forward(model, prompt + ref)[0][-1:]
        seen = torch.zeros(1, VOCAB, dtype=torch.bool)
        seen[0, torch.tensor(prompt + ref)] = True
        ref.append(int(apply_repetition_penalty(logits, seen, torch.tensor([penalty])).argmax()))
    got = run_engine(model, [Request(prompt, 12, repetition_penalty=penalty, tag=0), Request(PROMPTS[0], 12, tag=1)], 2, stops=())
    assert got[0][0][0] == ref
    assert got[0][0][0] != reference_greedy(model, prompt, 12)  # the penalty did change the output


# ----------------------------------------------------------------------------- scheduling invariance


def mixed_requests(n=9):
    """Ragged prompts, K = 1..3, different temperatures, filters, caps and seeds."""
    prompts = random_prompts([1 + (5 * i) % 13 for i in range(n)], seed=7)
    return [
        Request(p, max_new_tokens=10 + 7 * (i % 4), num_samples=1 + i % 3, temperature=(0.0, 0.7, 1.0, 1.3)[i % 4],
                top_k=(None, 40, 8)[i % 3], top_p=(None, 0.9)[i % 2], seed=100 + i, tag=i)
        for i, p in enumerate(prompts)
    ]


def test_sampled_completions_do_not_depend_on_the_pool(model):
    runs = [run_engine(model, mixed_requests(), slots) for slots in (3, 4, 8, 32)]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    # A K=1 pool-of-one run of every sample on its own: sample j is the j-th stream of its seed.
    alone = run_engine(model, [Request(**{**r.__dict__, "num_samples": 1}) for r in mixed_requests()], 1)
    assert all(runs[0][i][0] == alone[i][0] for i in alone)
    lengths = [len(t) for outs in runs[0].values() for t, _, _ in outs]
    assert len(set(lengths)) > 5 and {f for outs in runs[0].values() for _, f, _ in outs} == {"stop", "length"}


def test_requests_added_while_others_decode_change_nothing(model):
    base = run_engine(model, mixed_requests(), 4)
    engine = Engine(model, 4, 64, stop_ids=STOPS)
    extra = random_prompts((4, 6, 9), seed=9)
    got, added = {}, 0
    for out in engine.run(mixed_requests()):
        got[out.request.tag] = [(c.token_ids, c.finish_reason, c.stop_id) for c in out.completions]
        if added < len(extra):  # a follow-up request jumps the queue while the rest decode
            engine.add(Request(extra[added], 15, num_samples=2, temperature=1.0, seed=added, tag=f"x{added}"))
            added += 1
    assert {k: v for k, v in got.items() if not str(k).startswith("x")} == base
    assert len(got) == len(base) + len(extra)


def test_same_seed_same_samples_other_seed_other_samples(model):
    kwargs = dict(temperature=1.0, top_p=0.9, num_samples=2)
    a = generate(model, PROMPTS, max_new_tokens=12, seed=11, **kwargs)
    d = generate(model, PROMPTS, max_new_tokens=12, seed=12, **kwargs)
    # generate() is one request per prompt seeded with prompt_seed: a pool of 3 samples the same
    b = sorted(sampled(model, PROMPTS, 3, 11, 12, stops=(), **kwargs), key=lambda c: (c.prompt_index, c.sample_index))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in d]
    assert len({tuple(c.token_ids) for c in a[:2]}) > 1  # the K samples of a prompt do differ


def test_one_prefill_per_prompt_and_a_shrinking_pool(model):
    calls = []
    original = model.hidden_states

    def counting(ids, attention_mask=None, *args, **kwargs):
        kind = "decode" if attention_mask is not None and attention_mask.dim() == 4 else "prefill"
        calls.append((kind, tuple(ids.shape)))
        return original(ids, attention_mask, *args, **kwargs)

    model.hidden_states = counting
    try:
        engine = Engine(model, 12, 64, stop_ids=list(range(0, VOCAB, 16)))
        list(engine.run(Request(p, 40, num_samples=3, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)))
    finally:
        del model.hidden_states  # back to the class method
    # One prefill per prompt, over exactly its own tokens (no padding), not one per sample.
    assert [shape for kind, shape in calls if kind == "prefill"] == [(1, len(p)) for p in PROMPTS]
    decode_rows = [shape[0] for kind, shape in calls if kind == "decode"]
    assert decode_rows[0] == 12 and min(decode_rows) < 12  # the draining pool runs fewer rows
    assert decode_rows == sorted(decode_rows, reverse=True)  # and never grows again


def test_uniforms_are_counter_based_and_uniform():
    keys = np.arange(4000, dtype=np.uint64) * np.uint64(7919)
    steps = np.arange(4000, dtype=np.uint64) % np.uint64(5)
    u = uniforms(keys, steps)
    assert u.dtype == torch.float32 and bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u[10:20], uniforms(keys[10:20], steps[10:20]))  # a row's draw depends on its key and step only
    assert abs(float(u.mean()) - 0.5) < 0.02 and len(set(u.tolist())) > 3990


# ----------------------------------------------------------------------------- sampling math


def test_top_k_and_top_p_masks_match_transformers_warpers():
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 50, 300):
        ref = TopKLogitsWarper(k)(None, logits.clone()) > float("-inf")
        assert torch.equal(top_k_mask(logits, k), ref) and (top_k_mask(logits, k).sum(-1) == k).all()
    for p in (0.01, 0.3, 0.9, 0.999):
        ref = TopPLogitsWarper(p)(None, logits.clone()) > float("-inf")
        assert torch.equal(top_p_mask(logits, p), ref)


def test_top_p_mask_is_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    assert top_p_mask(logits, 0.5).tolist() == [[True, False, False, False], [False, False, False, True]]
    assert top_p_mask(logits, 0.51).tolist() == [[True, True, False, False], [False, False, True, True]]
    assert top_p_mask(logits, 0.9).tolist() == [[True, True, True, False], [False, True, True, True]]
    assert top_p_mask(logits, 1e-9).sum().item() == 2  # never empty: the top token always stays


def test_samples_never_leave_the_allowed_set_and_follow_its_probabilities():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(3)) * 2
    n = 40_000
    temperature, k, p = 0.7, 8, 0.8
    allowed = top_k_mask(logits / temperature, k) & top_p_mask((logits / temperature).masked_fill(~top_k_mask(logits, k), float("-inf")), p)
    draws = sample_tokens(logits.expand(n, -1), torch.rand(n, generator=torch.Generator().manual_seed(4)), temperature, k, p)
    assert allowed[0, draws].all()
    assert 1 < allowed.sum() < k  # both filters bite
    expected = (logits / temperature).masked_fill(~allowed, float("-inf")).softmax(-1)[0]
    observed = torch.bincount(draws, minlength=40).float() / n
    assert (observed - expected).abs().max() < 0.01


def test_per_row_settings_equal_each_row_alone():
    g = torch.Generator().manual_seed(5)
    logits, u = torch.randn(6, 90, generator=g) * 2, torch.rand(6, generator=g)
    temps, ks, ps = [0.0, 0.5, 1.0, 1.0, 2.0, 0.8], [None, 5, 0, 30, 90, 1], [None, 0.9, 0.5, None, 0.99, 1.0]
    together = sample_tokens(logits, u, temps, ks, ps)
    for i in range(6):
        assert together[i] == sample_tokens(logits[i : i + 1], u[i : i + 1], temps[i], ks[i] or None, ps[i])[0]


def test_bf16_logits_sample_as_their_float32_values():
    # sample_tokens picks candidates on the raw bf16 logits and upcasts only those: the tokens
    # must be those of the float32 values, ties included (bf16 logits tie often).
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(16, 3000, generator=g) * 3).to(torch.bfloat16)
    u = torch.rand(16, generator=g)
    temps, ks, ps = [0.0, 0.8] * 8, [None, 50, 0, 7] * 4, [None, None, 0.8, 0.95] * 4
    assert torch.equal(sample_tokens(logits, u, temps, ks, ps), sample_tokens(logits.float(), u, temps, ks, ps))
    assert torch.equal(sample_tokens(logits, u, 0.0), logits.float().argmax(-1))  # first of tied maxima


def test_greedy_is_argmax_and_ignores_noise():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_tokens(logits, torch.rand(5), 0.0, top_k=3, top_p=0.5), logits.argmax(-1))


# ----------------------------------------------------------------------------- formats, dtypes, errors


class StopAfter(torch.nn.Module):
    """An LM head that makes `stop_id` the argmax from its (after+1)-th call on."""

    def __init__(self, head, stop_id, after):
        super().__init__()
        self.head, self.stop_id, self.after, self.calls = head, stop_id, after, 0

    def forward(self, hidden):
        logits = self.head(hidden)
        self.calls += 1
        if self.calls > self.after:
            logits[..., self.stop_id] = 1e4
        return logits


def test_text_and_default_stop_ids_come_from_the_tokenizer(tiny_model_dir):
    from minissb.model import from_pretrained
    from minissb.tokenizer import Tokenizer

    tiny = from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = Tokenizer.from_dir(tiny_model_dir)
    prompt = tok.encode_chat([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    free = generate(tiny, [prompt], max_new_tokens=8, tokenizer=tok)[0]
    assert free.text == tok.decode(free.token_ids) and free.finish_reason == "length"
    tiny.lm_head = StopAfter(tiny.lm_head, tok.im_end_id, after=3)  # prefill + 2 decode steps, then <|im_end|>
    out = generate(tiny, [prompt], max_new_tokens=8, tokenizer=tok)[0]  # stop_ids default: the tokenizer's
    assert (out.token_ids, out.finish_reason, out.stop_id) == (free.token_ids[:3], "stop", tok.im_end_id)
    assert out.text == tok.decode(free.token_ids[:3])


def test_bfloat16_on_cpu_runs(model):
    bf16 = init_weights(Qwen2ForCausalLM(Qwen2Config(**CFG)), std=0.3, seed=0).to(torch.bfloat16).eval()
    outs = sampled(bf16, PROMPTS, 3, 0, 10, num_samples=2, temperature=0.8, top_k=20, return_logprobs=True, return_hidden=True)
    assert len(outs) == 8 and all(isinstance(c, Completion) for c in outs)
    for c in outs:
        assert all(0 <= t < VOCAB for t in c.token_ids) and all(t not in STOPS for t in c.token_ids)
        assert all(lp <= 0 and lp > -1e4 for lp in c.logprobs)
        assert c.hidden.dtype == torch.bfloat16
    greedy = generate(bf16, PROMPTS[:1], max_new_tokens=1)[0]
    with torch.no_grad():
        assert greedy.token_ids == [bf16(torch.tensor(PROMPTS[:1]))[0, -1].float().argmax().item()]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[[1, 2], []]), "empty"),
        (dict(prompts=[[1, VOCAB]]), "outside the model's vocabulary"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_arguments_raise_a_clear_error(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, args.pop("prompts"), **args)


def test_num_samples_below_one_is_a_programming_mistake(model):
    with pytest.raises(AssertionError, match="num_samples"):
        generate(model, [[1, 2, 3]], max_new_tokens=4, num_samples=0)


def test_engine_refuses_what_does_not_fit(model):
    engine = Engine(model, 2, 16)
    with pytest.raises(ValueError, match="max_len 16"):
        engine.add(Request([1] * 10, max_new_tokens=7))
    with pytest.raises(ValueError, match=r"num_samples must be in \[1, 2\]"):
        engine.add(Request([1], max_new_tokens=4, num_samples=3))

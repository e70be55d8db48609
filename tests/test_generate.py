"""minissb.generate: cache-vs-full-forward logits, batching invariances, sampling masks, seeds.

The model is a tiny random Qwen2 with larger-than-usual weights (std 0.3) so that greedy
decoding does not collapse onto one repeated token and argmaxes are not near-ties.
"""

import pytest
import torch

from minissb.generate import Completion, GenerationError, generate, sample_tokens, top_k_mask, top_p_mask
from minissb.model import KVCache, Qwen2Config, Qwen2ForCausalLM, init_weights, save_pretrained

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices gain nothing from threads, and on a busy machine every small op of a
    # 2-thread pool can wait a scheduler slice at its barrier: thousands of ops per test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return init_weights(Qwen2ForCausalLM(Qwen2Config(**CFG)), std=0.3, seed=0).eval()


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = random_prompts((3, 11, 7, 1))
# 8 stop tokens: sampled rows end at scattered steps, and some run to max_new_tokens.
STOPS = list(range(0, VOCAB, 32))


def full_forward_logprobs(model, prompt, generated):
    """log p(generated[t] | prompt + generated[:t]) from one uncached forward over the sequence."""
    seq = torch.tensor([prompt + generated])
    with torch.no_grad():
        logp = model(seq)[0].float().log_softmax(-1)  # (T, V)
    rows = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(generated))
    return logp[rows, torch.tensor(generated, dtype=torch.long)]


# ----------------------------------------------------------------------------- cache and batching


def test_cached_decoding_matches_full_forward(model):
    # Sampled rows of a ragged batch, K samples sharing a prefill, compaction at every finish:
    # each step's logits must be those of a plain forward over prompt + tokens so far.
    outs = generate(model, PROMPTS, max_new_tokens=16, temperature=1.0, num_samples=2, stop_ids=STOPS,
                    seed=0, compact_fraction=0.0, return_logprobs=True)
    assert {c.finish_reason for c in outs} == {"stop", "length"}
    for c in outs:
        generated = c.token_ids + ([c.stop_id] if c.finish_reason == "stop" else [])
        assert len(c.logprobs) == len(generated)
        ref = full_forward_logprobs(model, PROMPTS[c.prompt_index], generated)
        torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=0)


def test_ragged_batch_greedy_equals_each_prompt_alone(model):
    batched = generate(model, PROMPTS, max_new_tokens=24)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], max_new_tokens=24)[0]
        assert batched[i].token_ids == alone.token_ids
        assert len(set(alone.token_ids)) > 5  # a real sequence, not one token repeated
    assert [(c.prompt_index, c.sample_index, c.finish_reason) for c in batched] == [(i, 0, "length") for i in range(4)]


def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_pretrained(model, tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ours = generate(model, PROMPTS, max_new_tokens=20)
    for i, p in enumerate(PROMPTS):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)
        assert ours[i].token_ids == ref[0, len(p):].tolist()


def test_num_samples_share_one_prefill(model):
    calls = []
    original = model.hidden_states

    def counting(ids, *args, **kwargs):
        calls.append(tuple(ids.shape))
        return original(ids, *args, **kwargs)

    model.hidden_states = counting
    try:
        shared = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, num_samples=3, seed=5, compact_fraction=None)
    finally:
        del model.hidden_states  # back to the class method
    # One prefill per distinct prompt (over its own tokens, no padding), not one per sample.
    assert calls[:4] == [(1, len(p)) for p in PROMPTS]
    assert calls[4:] == [(12, 1)] * 5  # then 12 rows decode together
    # Same rows as prompts repeated K times, since row r always gets the r-th uniform of each draw.
    repeated = generate(model, [p for p in PROMPTS for _ in range(3)], max_new_tokens=6, temperature=1.0, seed=5)
    assert [c.token_ids for c in shared] == [c.token_ids for c in repeated]
    assert [(c.prompt_index, c.sample_index) for c in shared] == [(i, j) for i in range(4) for j in range(3)]
    assert len({tuple(c.token_ids) for c in shared[:3]}) > 1  # the K samples do differ


def test_batch_compaction_changes_no_output(model, monkeypatch):
    kwargs = dict(max_new_tokens=60, temperature=1.0, top_k=40, num_samples=4, stop_ids=list(range(0, VOCAB, 16)),
                  seed=7, return_logprobs=True)
    never = generate(model, PROMPTS, compact_fraction=None, **kwargs)
    assert len({len(c.token_ids) for c in never}) > 10  # rows end at many different steps
    batch_sizes = []
    select_rows = KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, rows, upto: batch_sizes.append(len(rows)) or select_rows(self, rows, upto))
    for fraction in (0.0, 0.5):
        compacted = generate(model, PROMPTS, compact_fraction=fraction, **kwargs)
        assert [(c.token_ids, c.finish_reason, c.stop_id) for c in compacted] == [
            (c.token_ids, c.finish_reason, c.stop_id) for c in never
        ]
        torch.testing.assert_close(
            torch.tensor(sum((c.logprobs for c in compacted), [])), torch.tensor(sum((c.logprobs for c in never), [])),
            atol=1e-5, rtol=0,
        )
    # 16 rows (the K repeats), shrunk down to one: via 4 rows, topped up with finished ones
    # when only 2 or 3 still run.
    assert batch_sizes[:5] == [16, 12, 8, 4, 1]


def test_stop_tokens_end_each_row_on_its_own(model):
    free = generate(model, PROMPTS, max_new_tokens=24)
    stops = {free[0].token_ids[4], free[2].token_ids[9]}
    stopped = generate(model, PROMPTS, max_new_tokens=24, stop_ids=sorted(stops))
    for f, s in zip(free, stopped):
        cut = next((t for t, tok in enumerate(f.token_ids) if tok in stops), None)
        if cut is None:
            assert (s.token_ids, s.finish_reason, s.stop_id) == (f.token_ids, "length", None)
        else:  # the stop token itself is not part of token_ids
            assert (s.token_ids, s.finish_reason, s.stop_id) == (f.token_ids[:cut], "stop", f.token_ids[cut])
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) <= 4


# ----------------------------------------------------------------------------- sampling


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


def test_greedy_is_argmax_and_ignores_noise():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_tokens(logits, torch.rand(5), 0.0, top_k=3, top_p=0.5), logits.argmax(-1))


def test_same_seed_same_samples(model):
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, num_samples=2)
    a = generate(model, PROMPTS, seed=11, **kwargs)
    b = generate(model, PROMPTS, seed=11, **kwargs)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(11), **kwargs)
    d = generate(model, PROMPTS, seed=12, **kwargs)
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
    assert [x.token_ids for x in a] != [x.token_ids for x in d]


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
    outs = generate(bf16, PROMPTS, max_new_tokens=10, temperature=0.8, top_k=20, num_samples=2, stop_ids=STOPS,
                    seed=0, compact_fraction=0.0, return_logprobs=True)
    assert len(outs) == 8 and all(isinstance(c, Completion) for c in outs)
    for c in outs:
        assert all(0 <= t < VOCAB for t in c.token_ids) and all(t not in STOPS for t in c.token_ids)
        assert all(lp <= 0 and lp > -1e4 for lp in c.logprobs)
    greedy = generate(bf16, PROMPTS[:1], max_new_tokens=1)[0]
    with torch.no_grad():
        assert greedy.token_ids == [bf16(torch.tensor(PROMPTS[:1]))[0, -1].float().argmax().item()]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, VOCAB]]), "outside the model's vocabulary"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_arguments_raise_a_clear_error(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(GenerationError, match=match):
        generate(model, args.pop("prompts"), **args)

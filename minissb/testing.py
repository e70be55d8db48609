"""Tiny stand-ins for Qwen2.5 (tokenizer and model) for tests, benches and smoke runs.

Both are built locally in well under a second with no network: a byte-level BPE trained
on a small math corpus with Qwen's pre-tokenizer and special tokens, and a 2-layer Qwen2
model with random weights saved in the Hugging Face layout, so every code path that loads
"a Qwen2.5 directory" can run on them. Only runtime dependencies are used here.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (a format fact of the real tokenizer.json): contractions, letter
# runs, single digits (numbers are split into digits), punctuation runs, newlines, spaces.
QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_BPE_VOCAB = 480  # + 3 special tokens = 483 ids; models round up to 512 rows, as Qwen pads 151,665 to 151,936

# Jinja chat template for transformers' apply_chat_template on the tiny tokenizer: the
# system/user/assistant subset of the Qwen2.5 ChatML format (minissb renders chats in Python).
TINY_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if not (loop.first and m['role'] == 'system') %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text: the kinds of strings the SSB pipeline tokenizes (chat roles, word problems,
# worked steps, LaTeX and boxed answers), so common pieces become single tokens.
TINY_CORPUS = r"""
You are Qwen, created by Alibaba Cloud. You are a helpful assistant.
You are a careful math tutor. Please reason step by step, and put your final answer within \boxed{}.
system
user
assistant
Tom has 12 apples. He gives 5 apples to his sister and buys 8 more. How many apples does he have now?
Tom starts with 12 apples. After giving away 5 he has 12 - 5 = 7. Buying 8 more gives 7 + 8 = 15. The answer is \boxed{15}.
A baker makes 24 muffins every day and sells them for $3 each. How much money does she make in 7 days?
She makes 24 * 3 = 72 dollars a day, so in 7 days she makes 72 * 7 = 504 dollars. Final answer: \boxed{504}
A train travels 60 miles per hour for 2.5 hours. How far does it go?
Distance is speed times time: 60 \times 2.5 = 150 miles. So the train travels \boxed{150} miles.
Maria reads 15 pages on Monday and twice as many pages on Tuesday. How many pages did she read in total?
On Tuesday she reads 2 \cdot 15 = 30 pages. In total she reads 15 + 30 = 45 pages, so the answer is \boxed{45}.
A farmer has 3 fields with 120 cows in each field. He sells 1/4 of the cows. How many cows are left?
There are 3 \times 120 = 360 cows. He sells 360 / 4 = 90, which leaves 360 - 90 = 270 cows. \boxed{270}
The price of a book is $18.90 after a 10% discount. What was the original price?
Let the original price be x. Then 0.9x = 18.90, so x = 21. The original price was \boxed{21} dollars.
Find the value of $x$ such that $2x + 3 = 11$.
Subtract 3 from both sides: $2x = 8$. Divide by 2: $x = 4$. Therefore $x = \boxed{4}$.
Compute $\frac{1}{2} + \frac{1}{3}$.
We have $\frac{1}{2} + \frac{1}{3} = \frac{3}{6} + \frac{2}{6} = \frac{5}{6}$, so the answer is $\boxed{\frac{5}{6}}$.
What is $\sqrt{144} + 3^2$?
Since $\sqrt{144} = 12$ and $3^2 = 9$, the sum is $12 + 9 = 21$. The answer is $\boxed{21}$.
Solve $x^2 - 5x + 6 = 0$.
Factor: $(x - 2)(x - 3) = 0$, so $x = 2$ or $x = 3$. The solutions are $\boxed{2, 3}$.
The angle of a right triangle is $90^\circ$ and another angle is $35^\circ$. Find the third angle.
The angles sum to $180^\circ$, so the third angle is $180 - 90 - 35 = 55^\circ$. \boxed{55}
Let $f(x) = 3x - 7$. Find $f(10)$.
$f(10) = 3 \cdot 10 - 7 = 30 - 7 = 23$. Hence $f(10) = \boxed{23}$.
How many positive integers less than 100 are multiples of 6?
The multiples are 6, 12, 18, \ldots, 96, and $96 / 6 = 16$, so there are \boxed{16} of them.
A rectangle has a length of 14 cm and a width of 9 cm. What is its area in square centimeters?
The area is $14 \times 9 = 126$ square centimeters. The answer is \boxed{126}.
Sam saves $250 a month. How many months does it take him to save $1,500?
It takes $1500 / 250 = 6$ months. So the answer is \boxed{6}.
If $a + b = 10$ and $a - b = 4$, what is $ab$?
Adding the equations gives $2a = 14$, so $a = 7$ and $b = 3$. Then $ab = 21$, so \boxed{21}.
Let me check the work again. Wait, the first step was wrong: 8 + 5 = 13, not 12. So the total is 13.
First, we find the number of students. Next, we compute the total cost. Finally, we add the tax.
The probability is $\frac{3}{8}$, and the expected value is $\frac{15}{4} = 3.75$.
The sum of the first $n$ odd numbers is $n^2$, so for $n = 20$ the sum is $400$.
Temperatures fell from 5°C to −3°C, a drop of 8 degrees. Café prices rose by 2€ × 3 = 6€.
Write the answer in the form $\frac{a}{b}$ where $a$ and $b$ are relatively prime positive integers.
Answer: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 25, 50, 75, 100, 1000, 2024, 073, 025.
"""


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        special_tokens=[],
    )
    lines = [line for line in TINY_CORPUS.splitlines() if line]
    tok.train_from_iterator(lines, trainer=trainer)
    # Added after training so they take the ids right after the BPE vocab, as in Qwen2.5.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str(pretty=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_tiny_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json + tokenizer_config.json of a ~480-token Qwen-style BPE; same bytes every call."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_json = _tiny_tokenizer_json()
    added = {t["id"]: t for t in json.loads(tok_json)["added_tokens"]}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for i, t in sorted(added.items())
        },
        "bos_token": None,
        "chat_template": TINY_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    _write_atomic(out / "tokenizer.json", tok_json)
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def tiny_tokenizer_size() -> int:
    return tokenizers.Tokenizer.from_str(_tiny_tokenizer_json()).get_vocab_size(with_added_tokens=True)


def build_tiny_model(
    out_dir: str | os.PathLike,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    tied: bool = True,
    seed: int = 0,
    with_tokenizer: bool = True,
    dtype=None,
) -> Path:
    """Write a random-weight Qwen2 model dir (config.json + model.safetensors [+ tokenizer files]).

    vocab_size defaults to the tiny tokenizer's size rounded up to a multiple of 64, so the
    embedding has unused rows past the tokenizer, as real Qwen2.5 checkpoints do.
    dtype: torch dtype of the saved weights (float32 by default).
    """
    import torch

    from minissb.model import Qwen2Config, Qwen2ForCausalLM, init_weights, save_pretrained

    if vocab_size is None:
        vocab_size = -(-tiny_tokenizer_size() // 64) * 64
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
    )
    with torch.device("cpu"):
        model = Qwen2ForCausalLM(cfg)
    init_weights(model, seed=seed)
    if dtype is not None:
        model.to(dtype)
    out = Path(out_dir)
    save_pretrained(model, out)
    if with_tokenizer:
        build_tiny_tokenizer(out)
    return out


__all__ = ["build_tiny_tokenizer", "build_tiny_model", "tiny_tokenizer_size", "SPECIAL_TOKENS", "TINY_CHAT_TEMPLATE"]

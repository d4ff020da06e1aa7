"""The default model's tokenizer and chat template against transformers.

SmolLM2's GGUF says `tokenizer.ggml.pre = "smollm"`: llama.cpp splits every digit apart first, then
applies the GPT-2 regex, exactly like the model's original tokenizer.json
(`Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]`). transformers' GGUF
tokenizer builder ignores that name and uses a bare ByteLevel pre-tokenizer. The vocabulary settles
which is right: no token joins a digit to anything (not even a leading space), so the vocabulary was
trained with digits isolated. The two differ on whitespace before a digit: with the split, "x  *  2"
keeps the two spaces before "2" in one segment and gets the token "ĠĠ"; without it, the GPT-2 regex
lends one space to " 2", a pair the vocabulary never saw. So we compare against transformers'
tokenizer with its pre-tokenizer set to the original tokenizer.json's.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
from tokenizers import pre_tokenizers

from nomoat.formats.tokenizer import _byte_alphabet

pytestmark = pytest.mark.slow

CORPUS = [
    "",
    "Hello, world! I'm sure they'll say it's fine; we've seen you'd DONE it.",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    \"\"\"Add.\"\"\"\n    return a + b\n\n\nclass X:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += x[i] * 2; }  // C++",
    "数学是科学的皇后。我喜欢学习人工智能和机器学习。",
    "日本語のテキストです。한국어 텍스트입니다. Русский текст. نص عربي. ελληνικά",
    "emoji: 😀🎉🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️",
    "runs   of    spaces\t\ttabs \t mixed     end   ",
    "\n\nnew\nlines\n\n\n\nand\r\nCRLF\r\n \n \n",
    "   leading spaces and trailing spaces   ",
    "12345 and 3.14159",
    "x  *  2, 2024-01-31, 1e-10, $1,000,000.00, 0x1F, v1.2.3, 100%",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_start|><|endoftext|> glued<|im_end|>text",
    "not special: <|im_start and im_end|> <| |>",
    "<repo_name>nomoat<file_sep>README.md",
    "combining: e\u0301 é, zero\u200bwidth, nbsp\u00a0here, \u2028 line sep",
    "MiXeD CaSe AND UPPER CASE and lower case",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "日本語で 🎉"}],
    [{"role": "user", "content": "  spaces \n\n and newlines  "}, {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def ref_tok(hf_ref):
    """transformers' tokenizer for the GGUF, with the original tokenizer.json's pre-tokenizer."""
    tok = copy.deepcopy(hf_ref[1])
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


def _random_texts(n: int) -> list[str]:
    rng = random.Random(0)
    pools = ["abcdefghij ABC", " \t\n", "0123456789.,", "äöüßéèç", "中文字符测试", "😀🎉", "<|>_-'\"()"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_vocab_isolates_digits(default_lm) -> None:
    inv = {c: b for b, c in _byte_alphabet().items()}
    ascii_tokens = []
    for i in range(default_lm.tokenizer.vocab_size):
        t = default_lm.tokenizer.token(i)
        if t and all(c in inv for c in t):
            ascii_tokens.append(bytes(inv[c] for c in t).decode("latin-1"))
    digits = [t for t in ascii_tokens if re.search(r"[0-9]", t)]
    assert sorted(digits) == list("0123456789")


def test_digit_split_matches_the_original_pretokenizer(default_lm, hf_ref, ref_tok) -> None:
    text = "x  *  2"
    ours = default_lm.tokenizer.encode(text)
    assert ours == ref_tok(text, add_special_tokens=False).input_ids
    assert "ĠĠ" in [default_lm.tokenizer.token(i) for i in ours]
    # transformers' GGUF builder (bare ByteLevel) splits it differently: the reason for `ref_tok`.
    assert hf_ref[1](text, add_special_tokens=False).input_ids != ours


@pytest.mark.parametrize("text", CORPUS)
def test_encode_decode_match_transformers(default_lm, ref_tok, text: str) -> None:
    tok = default_lm.tokenizer
    ids = tok.encode(text)
    assert ids == ref_tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ref_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)


def test_random_text_and_ids_match_transformers(default_lm, ref_tok) -> None:
    tok = default_lm.tokenizer
    for text in _random_texts(200):
        ids = tok.encode(text)
        assert ids == ref_tok(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text
    rng = random.Random(1)
    for _ in range(100):  # arbitrary ids, including ones that split UTF-8 sequences
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        assert tok.decode(ids) == ref_tok.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)


def test_special_ids_match_transformers(default_lm, hf_ref) -> None:
    tok, ref = default_lm.tokenizer, hf_ref[1]
    assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert tok.vocab_size == len(ref)
    assert tok.eos_id in tok.stop_ids


@pytest.mark.parametrize("gen_prompt", [False, True])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(default_lm, hf_ref, ref_tok, conv: int, gen_prompt: bool) -> None:
    messages = CONVERSATIONS[conv]
    ours = default_lm.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt)
    ref = hf_ref[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == gen_prompt
    ids = default_lm.tokenizer.encode_chat(messages, add_generation_prompt=gen_prompt)
    assert ids == ref_tok(ref, add_special_tokens=False).input_ids

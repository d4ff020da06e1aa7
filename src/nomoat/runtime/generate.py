"""Text generation: greedy or sampled decoding over a preallocated KV cache, streamed or batched."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nomoat import defaults
from nomoat.errors import NomoatError
from nomoat.formats.tokenizer import Tokenizer
from nomoat.model import KVCache, LlamaForCausalLM
from nomoat.model.config import LlamaConfig
from nomoat.runtime.logprobs import MAX_TOP_LOGPROBS, Piece, TokenLogprob, token_logprob

# Prompt tokens per forward pass: the kernels cost the same per row from ~64 rows up, and smaller passes keep
# the activations' peak memory down (512 -> 256: ~12 MiB less on the default model).
PREFILL_CHUNK = 256


@dataclass
class GenerationConfig:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = defaults.MAX_NEW_TOKENS
    temperature: float = defaults.TEMPERATURE
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    repetition_penalty: float = defaults.REPETITION_PENALTY
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None  # `stream` only: attach each token's logprob and this many alternatives

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise NomoatError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise NomoatError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise NomoatError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise NomoatError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise NomoatError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise NomoatError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first token comes out of the prompt pass; decode speed counts the steps after it.
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


def _apply_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # seen: [B, V] bool of tokens already in the context (the CTRL-paper penalty, as transformers does it).
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V]."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p; the first always stays.
        drop = probs.cumsum(-1) - probs > cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class _Detokenizer:
    """Turns a growing list of ids into text deltas, holding back incomplete UTF-8 and stop-string prefixes."""

    def __init__(self, tok: Tokenizer, stop: Sequence[str]) -> None:
        self.tok, self.stop = tok, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hold = 0
        for s in self.stop:
            i = text.find(s, max(0, self.emitted - len(s)))
            if i >= 0:
                self.text = text[:i]
                self.stopped = True
            else:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        end = len(self.text) if self.stopped else len(self.text) - hold
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


def _prefill(model: LlamaForCausalLM, ids: torch.Tensor, cache: KVCache, mask: torch.Tensor | None,
             pos_ids: torch.Tensor | None) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last position's logits."""
    T = ids.shape[1]
    logits = None
    for s in range(0, T, PREFILL_CHUNK):
        e = min(T, s + PREFILL_CHUNK)
        logits = model(ids[:, s:e], position_ids=None if pos_ids is None else pos_ids[:, s:e],
                       attention_mask=None if mask is None else mask[:, :e], cache=cache, last_only=True)
    return logits[:, -1]


def _check_context(ctx: int, n_prompt: int, max_new: int) -> int:
    if n_prompt >= ctx:
        raise NomoatError(f"prompt is {n_prompt} tokens; the model's context is {ctx}")
    return min(max_new, ctx - n_prompt)


class Decoding:
    """One sequence's decoding state: its settings, seeded RNG, penalty, detokenizer, logprobs and stats.

    Fed the logits of each step, it picks the next token and returns the text that token adds. `stream`
    and the server's batching engine both decode through it, so a request decodes the same alone or in a
    batch.
    """

    def __init__(self, model_cfg: LlamaConfig, tok: Tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
                 stats: GenerationStats | None = None) -> None:
        cfg.check()
        if not prompt_ids:
            raise NomoatError("empty prompt")
        self.cfg, self.tok, self.prompt_ids = cfg, tok, prompt_ids
        self.stats = stats if stats is not None else GenerationStats()
        self.max_new = _check_context(model_cfg.max_position_embeddings, len(prompt_ids), cfg.max_new_tokens)
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
        self.detok = _Detokenizer(tok, cfg.stop)
        self.seen: torch.Tensor | None = None
        if cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, model_cfg.vocab_size, dtype=torch.bool)
            self.seen[0, prompt_ids] = True
        self.lps: list[TokenLogprob] | None = None if cfg.logprobs is None else []
        self.stats.prompt_tokens = len(prompt_ids)
        self.stats.finish_reason = "length"
        self.steps = 0
        self.done = self.max_new == 0
        self.token: int | None = None  # the token to feed next, while not done

    def push(self, logits: torch.Tensor) -> list[str]:
        """Take one step's logits [1, V]: sample, and return the text pieces it completes (maybe none)."""
        raw = logits  # logprobs are read before penalties and sampling settings, as OpenAI reports them
        if self.seen is not None:
            logits = _apply_penalty(logits, self.seen, self.cfg.repetition_penalty)
        token = int(sample_next(logits, self.cfg, self.gen)[0])
        self.stats.generated_tokens += 1
        self.steps += 1
        if token in self.tok.stop_ids:
            self.stats.finish_reason, self.done = "stop", True
            return []
        out: list[str] = []
        if self.lps is not None:
            self.lps.append(token_logprob(raw[0], token, self.cfg.logprobs))
        delta = self.detok.push(token)
        if delta:
            if self.lps is not None:
                delta, self.lps = Piece(delta, self.lps), []
            out.append(delta)
        if self.detok.stopped:
            self.stats.finish_reason, self.done = "stop", True
        elif self.steps >= self.max_new:
            self.done = True
        else:
            if self.seen is not None:
                self.seen[0, token] = True
            self.token = token
        return out

    def finish(self) -> list[str]:
        """The text held back at the end (and, with logprobs, the tokens that added no text)."""
        rest = self.detok.flush()
        if self.detok.stopped:
            rest = ""
        if self.lps:
            return [Piece(rest, self.lps)]
        return [rest] if rest else []


@torch.inference_mode()
def stream(model: LlamaForCausalLM, tok: Tokenizer, prompt_ids: list[int], cfg: GenerationConfig,
           stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the completion of one prompt as text pieces, as they are decoded.

    With `cfg.logprobs` set, each piece is a `Piece` whose `.logprobs` hold the tokens decoded since the
    previous piece (the stop token excluded); tokens that add no text come out on a final empty piece.
    """
    dec = Decoding(model.config, tok, prompt_ids, cfg, stats)
    st = dec.stats
    cache = KVCache(model.config, 1, len(prompt_ids) + dec.max_new, dtype=model.kv_dtype)
    t0 = time.perf_counter()
    logits = _prefill(model, torch.tensor([prompt_ids]), cache, None, None) if dec.max_new else None
    st.prompt_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    while not dec.done:
        yield from dec.push(logits)
        if not dec.done:
            logits = model(torch.tensor([[dec.token]]), cache=cache)[:, -1]
    st.decode_seconds = time.perf_counter() - t1
    yield from dec.finish()


@torch.inference_mode()
def generate_batch(model: LlamaForCausalLM, tok: Tokenizer, prompts: list[list[int]],
                   cfg: GenerationConfig) -> list[Completion]:
    """Complete several prompts at once in one left-padded batch."""
    cfg.check()
    if not prompts or any(not p for p in prompts):
        raise NomoatError("empty prompt in batch")
    B, T = len(prompts), max(len(p) for p in prompts)
    max_new = _check_context(model.config.max_position_embeddings, T, cfg.max_new_tokens)
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    ids = torch.full((B, T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(B, T + max_new, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = True
    pos = (mask[:, :T].long().cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, B, T + max_new, dtype=model.kv_dtype)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool)
        for i, p in enumerate(prompts):
            seen[i, p] = True
    t0 = time.perf_counter()
    logits = _prefill(model, ids, cache, mask, pos) if max_new else None
    prompt_seconds = time.perf_counter() - t0
    detoks = [_Detokenizer(tok, cfg.stop) for _ in range(B)]
    done = [False] * B
    reasons = ["length"] * B
    counts = [0] * B
    next_pos = pos[:, -1]
    t1 = time.perf_counter()
    for step in range(max_new):
        if seen is not None:
            logits = _apply_penalty(logits, seen, cfg.repetition_penalty)
        nxt = sample_next(logits, cfg, gen)
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            counts[i] += 1
            if t in tok.stop_ids:
                done[i], reasons[i] = True, "stop"
                continue
            detoks[i].push(t)
            if detoks[i].stopped:
                done[i], reasons[i] = True, "stop"
        if all(done) or step + 1 == max_new:
            break
        if seen is not None:
            seen[torch.arange(B), nxt] = True
        mask[:, T + step] = True
        next_pos = next_pos + 1
        logits = model(nxt.view(B, 1), position_ids=next_pos.view(B, 1), attention_mask=mask, cache=cache)[:, -1]
    decode_seconds = time.perf_counter() - t1
    out = []
    for i in range(B):
        d = detoks[i]
        d.flush()
        st = GenerationStats(len(prompts[i]), prompt_seconds, counts[i], decode_seconds, reasons[i])
        out.append(Completion(d.text, list(d.ids), st))
    return out

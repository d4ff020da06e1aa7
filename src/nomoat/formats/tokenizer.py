"""Tokenizers (Hugging Face `tokenizers`) built from GGUF metadata or tokenizer.json, and chat templates."""

from __future__ import annotations

import ast
import contextvars
import functools
import json
import math
import re
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nomoat.errors import NomoatError

# Pre-tokenizer splits by llama.cpp's `tokenizer.ggml.pre` name (the regexes the vocabularies were trained with).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# gpt2 regex with every digit split apart first (llama.cpp "smollm"/"starcoder", as the models tokenizer.json)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}

TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
_SURROGATE = re.compile("[\ud800-\udfff]")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    return {b: c for b, c in zip(*_bytes_to_unicode())}


def _bytes_to_unicode() -> tuple[list[int], list[str]]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return bs, [chr(c) for c in cs]


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two known tokens,
    ranked by the merged token's score (what sentencepiece's BPE does at encode time)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                found.append((scores[i], vocab[a], vocab[b], a, b))
    found.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(a, b) for *_, a, b in found]


def _check_gguf_tokenizer(meta: dict[str, Any], source: str) -> None:
    """Types and lengths of the tokenizer arrays and ids, before any of them is used."""
    tokens = meta.get("tokens")
    if not tokens:
        raise NomoatError(f"{source}: no tokenizer.ggml.tokens in the file")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise NomoatError(f"{source}: tokenizer.ggml.tokens must be an array of strings")
    for key in ("model", "pre"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise NomoatError(f"{source}: tokenizer.ggml.{key} = {meta[key]!r} is not a string")
    for key in ("add_bos_token", "add_eos_token", "add_space_prefix"):
        if meta.get(key) is not None and not isinstance(meta[key], bool):
            raise NomoatError(f"{source}: tokenizer.ggml.{key} = {meta[key]!r} is not true or false")
    types, scores = meta.get("token_type"), meta.get("scores")
    # llama.cpp's token types: 0 undefined, 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    if types is not None and (not isinstance(types, list) or len(types) != len(tokens) or not all(
            type(v) is int and 0 <= v <= 6 for v in types)):
        raise NomoatError(f"{source}: tokenizer.ggml.token_type must hold one type (0..6) per token ({len(tokens)})")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(tokens) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in scores)):
        raise NomoatError(f"{source}: tokenizer.ggml.scores must hold one finite number per token ({len(tokens)})")
    merges = meta.get("merges")
    if merges is not None:
        bad = next((m for m in merges if not isinstance(m, str) or " " not in m.strip(" ")), None) \
            if isinstance(merges, list) else merges
        if bad is not None:
            raise NomoatError(f"{source}: tokenizer.ggml.merges entry {str(bad)[:40]!r} is not two tokens "
                              "separated by a space")
    if meta.get("model") == "gpt2" and not merges:  # as llama.cpp: a BPE vocabulary without merges is damaged
        raise NomoatError(f"{source}: tokenizer.ggml.merges is missing or empty (a gpt2 tokenizer needs them)")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id",
                "padding_token_id"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(tokens)):
            raise NomoatError(f"{source}: tokenizer.ggml.{key} = {v!r} is not a token id (0..{len(tokens) - 1})")
    tmpl = meta.get("chat_template")
    if tmpl is not None and not isinstance(tmpl, str):
        raise NomoatError(f"{source}: tokenizer.chat_template must be a string")


def _bpe(source: str, **kw: Any) -> Any:
    try:
        return models.BPE(**kw)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of tokens the vocabulary lacks
        raise NomoatError(f"{source}: tokenizer.ggml.merges does not fit the vocabulary ({e})") from None


def tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> HFTokenizer:
    _check_gguf_tokenizer(meta, source)
    kind = meta.get("model")
    tokens = meta["tokens"]
    types = meta.get("token_type") or [1] * len(tokens)
    if kind == "gpt2":
        alphabet = set(_byte_alphabet().values())
        spell = _byte_alphabet()
        vocab = {}
        for i, t in enumerate(tokens):
            vocab[t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))] = i
        merges = [tuple(m.split(" ", 1)) for m in (meta.get("merges") or [])]
        tk = HFTokenizer(_bpe(source, vocab=vocab, merges=merges, fuse_unk=False,
                              ignore_merges=meta.get("pre") in _SPLITS))
        pre = meta.get("pre") or "default"
        if pre in _SPLITS:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in _DIGIT_SPLIT_PRE:
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("scores") or [0.0] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in meta["merges"]] if meta.get("merges") else \
            _spm_merges(tokens, scores)
        unk = meta.get("unknown_token_id")
        tk = HFTokenizer(_bpe(source, vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                              unk_token=tokens[unk] if unk is not None else None))
        prefix = meta.get("add_space_prefix", True)
        norm = [normalizers.Prepend("▁")] if prefix else []
        tk.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tk.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        raise NomoatError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
    added = [AddedToken(t, special=True, normalized=False)
             for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
    tk.add_special_tokens(added)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    if user:
        tk.add_tokens(user)
    return tk


def _raise(message: str) -> None:
    raise NomoatError(f"chat template: {message}")


# A chat template is code from the model file: it renders in jinja2's sandbox with a budget. Every loop
# iteration and macro call ticks a clock; the strings, lists and integers it builds, the numbers it passes
# to calls and filters, and its output are bounded.
RENDER_SECONDS = 2.0
MAX_RENDER_CHARS = 1 << 22  # the longest string, list or output a template may build (~1M tokens)
MAX_CALL_INT = 1 << 20  # widths, counts and repeats passed to a call or filter
MAX_INT_BITS = 4096
_budget: contextvars.ContextVar[float | None] = contextvars.ContextVar("template_deadline", default=None)


def _size(x: Any) -> int:
    return len(x) if isinstance(x, str | bytes | list | tuple | dict) else 0


def _checked(x: Any) -> Any:
    if _size(x) > MAX_RENDER_CHARS:
        raise NomoatError(f"chat template: builds a value of {_size(x)} items (limit {MAX_RENDER_CHARS})")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise NomoatError(f"chat template: builds an integer of {x.bit_length()} bits")
    return x


def _check_args(args: Any) -> None:
    for a in args:
        if isinstance(a, int | float) and not isinstance(a, bool) and abs(a) > MAX_CALL_INT:
            raise NomoatError(f"chat template: passes {a!r} to a call or filter (limit {MAX_CALL_INT})")


def _check_format(spec: Any) -> None:
    """A %- or {}-format string may not ask for a field wider than MAX_CALL_INT ('%0999999999d')."""
    if isinstance(spec, str) and any(int(w) > MAX_CALL_INT for w in re.findall(r"\d{7,}", spec)):
        raise NomoatError(f"chat template: a format string asks for a field wider than {MAX_CALL_INT}")


def _guard_filter(name: str, f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args((*args[1:], *kwargs.values()))
        if name == "format":
            _check_format(next((a for a in args if isinstance(a, str)), None))
        return _checked(f(*args, **kwargs))
    return guarded


class _TickLoops(ast.NodeTransformer):
    """Rewrites jinja's generated Python: `environment.tick()` first in every loop body and function, and
    a size check around every string join (`~`)."""

    @staticmethod
    def _env_call(attr: str, args: list[ast.expr]) -> ast.Call:
        return ast.Call(ast.Attribute(ast.Name("environment", ast.Load()), attr, ast.Load()), args, [])

    def _tick(self, node: Any) -> Any:
        self.generic_visit(node)
        node.body.insert(0, ast.Expr(self._env_call("tick", [])))
        return node

    visit_For = visit_While = visit_FunctionDef = _tick

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in ("str_join", "markup_join"):
            return self._env_call("checked", [node])
        return node


def _tick() -> None:
    deadline = _budget.get()
    if deadline is not None and time.monotonic() > deadline:
        raise NomoatError(f"chat template: rendering takes longer than {RENDER_SECONDS:g} s (a runaway loop?)")


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%", "//"})
        tick = staticmethod(_tick)
        checked = staticmethod(_checked)

        @staticmethod
        def concat(parts: Any) -> str:  # macro and block bodies
            return _checked("".join(parts))

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            # Refuse before computing: 'x' * 10**9 or 10 ** 10**9 would allocate or spin first.
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > MAX_INT_BITS:
                raise NomoatError(f"chat template: {left} ** {right} is too large")
            if operator == "%":
                _check_format(left)
            if operator == "*" and (isinstance(right, int) and _size(left) * right > MAX_RENDER_CHARS
                                    or isinstance(left, int) and _size(right) * left > MAX_RENDER_CHARS):
                raise NomoatError("chat template: repeats a value past the size limit")
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            _check_args((*args, *(v for k, v in kwargs.items() if k != "_loop_vars")))
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value: Any) -> Any:
            _check_format(getattr(value, "__self__", None))  # '{:>999999999}'.format(x)
            return super().wrap_str_format(value)

        def _compile(self, source: str, filename: str) -> Any:
            tree = ast.fix_missing_locations(_TickLoops().visit(ast.parse(source)))
            return compile(tree, filename, "exec")

    # The same environment transformers renders chat templates with, so the strings match exactly.
    env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs: nothing a chat template needs
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    return _env().from_string(source)


def render_template(source: str, **context: Any) -> str:
    """Render a chat template in the budgeted sandbox (time, sizes, output); every failure, whether a
    syntax error, an error the template raises or a budget overrun, is one NomoatError line."""
    from jinja2 import TemplateError

    token = _budget.set(time.monotonic() + RENDER_SECONDS)
    try:
        out, size = [], 0
        for piece in _compile_template(source).generate(**context):
            size += len(piece)
            if size > MAX_RENDER_CHARS:
                raise NomoatError(f"chat template: writes more than {MAX_RENDER_CHARS} characters")
            out.append(piece)
        return "".join(out)
    except NomoatError:
        raise
    except TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise NomoatError(f"chat template: {' '.join(str(e).split())[:200]}{where}") from None
    except RecursionError:
        raise NomoatError("chat template: recursion too deep") from None
    except Exception as e:  # whatever the template's own expressions raise (TypeError, KeyError, ...)
        raise NomoatError(f"chat template: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    finally:
        _budget.reset(token)


class Tokenizer:
    """Text <-> token ids, special-token ids, and the model's chat template."""

    def __init__(self, tk: HFTokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 add_bos: bool = False, add_eos: bool = False, chat_template: str | None = None,
                 extra_stop_ids: tuple[int, ...] = ()) -> None:
        self.tk = tk
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.add_bos, self.add_eos = add_bos, add_eos
        self.chat_template = chat_template
        stops = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "</s>"):
            i = tk.token_to_id(name)
            if i is not None:
                stops.add(i)
        self.stop_ids = frozenset(stops)
        self._max_token_chars: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: its longest vocabulary entry (a byte-level
        entry spells each byte with one character, so it is never shorter than the text it covers). Bounds
        text before it is tokenized: `n` tokens never cover more than `n * max_token_chars` characters."""
        if self._max_token_chars is None:
            self._max_token_chars = max((len(t) for t in self.tk.get_vocab(with_added_tokens=True)), default=1)
        return self._max_token_chars

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def token(self, i: int) -> str | None:
        return self.tk.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised.

        add_special_tokens: prepend BOS / append EOS as the model's flags ask.
        """
        try:
            ids = self.tk.encode(text, add_special_tokens=False).ids
        except TypeError:
            if isinstance(text, str) and _SURROGATE.search(text):  # JSON "\ud800", or undecodable bytes in argv
                raise NomoatError("the text holds an unpaired surrogate (U+D800..U+DFFF), which is not Unicode "
                                  "text") from None
            raise
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            **kwargs: Any) -> str:
        if not self.chat_template:
            raise NomoatError("this model has no chat template; use --raw")
        tok = self.token
        specials = {"bos_token": tok(self.bos_id) if self.bos_id is not None else "",
                    "eos_token": tok(self.eos_id) if self.eos_id is not None else ""}
        return render_template(self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
                               **{**specials, **kwargs})

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = self.encode(text)
        # Templates that write the BOS token themselves must not get a second one.
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    # ---- construction ----
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], source: str) -> Tokenizer:
        tk = tokenizer_from_gguf_metadata(meta, source)
        kind = meta.get("model")
        add_bos = meta.get("add_bos_token")
        if add_bos is None:
            add_bos = kind == "llama"
        extra = tuple(i for i in (meta.get("eot_token_id"), meta.get("eom_token_id")) if i is not None)
        return cls(tk, bos_id=meta.get("bos_token_id"), eos_id=meta.get("eos_token_id"),
                   pad_id=meta.get("padding_token_id"), add_bos=bool(add_bos),
                   add_eos=bool(meta.get("add_eos_token") or False),
                   chat_template=meta.get("chat_template"), extra_stop_ids=extra)

    @classmethod
    def from_hf_dir(cls, path: Path, eos_ids: list[int] | None = None) -> Tokenizer:
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise NomoatError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            tk = HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise NomoatError(f"{tj}: cannot parse ({e})") from None
        from nomoat.formats.hf import read_json

        tc = path / "tokenizer_config.json"
        cfg: dict[str, Any] = read_json(tc) if tc.exists() else {}
        for key in ("add_bos_token", "add_eos_token"):
            if cfg.get(key) is not None and not isinstance(cfg[key], bool):
                raise NomoatError(f"{tc}: {key} = {json.dumps(cfg[key])} is not true or false")
        template = cfg.get("chat_template")
        jinja = path / "chat_template.jinja"
        if template is None and jinja.exists():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise NomoatError(f"{tc}: chat_template as a list must hold {{name, template}} objects")
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise NomoatError(f"{tc}: chat_template = {json.dumps(template)[:60]} is not a string")

        def tid(key: str) -> int | None:
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            return tk.token_to_id(v) if isinstance(v, str) else None

        eos = tid("eos_token")
        if eos is None and eos_ids:
            eos = eos_ids[0]
        # tokenizer.json's post-processor adds BOS for some models; we add it ourselves from the flag.
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds_bos(tj)
        tk.post_processor = None
        return cls(tk, bos_id=tid("bos_token"), eos_id=eos, pad_id=tid("pad_token"), add_bos=bool(add_bos),
                   add_eos=bool(cfg.get("add_eos_token", False)), chat_template=template,
                   extra_stop_ids=tuple(eos_ids or ()))

    def save_hf(self, path: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json as transformers expects them."""
        self.tk.save(str(path / "tokenizer.json"))
        tok = self.token
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
        }
        for key, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id)):
            if i is not None:
                cfg[key] = tok(i)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def _post_processor_adds_bos(tj: Path) -> bool:
    try:
        post = json.loads(tj.read_text(encoding="utf-8")).get("post_processor") or {}
    except json.JSONDecodeError:
        return False
    text = json.dumps(post)
    return '"TemplateProcessing"' in text and "SpecialToken" in text

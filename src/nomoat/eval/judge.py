"""LLM-as-judge: pairwise (both orders, always) and single-answer grading over answer files, with the
project's own editable prompt templates, strict verdict parsing, a verdict cache and concurrent requests.

Pairwise: every comparison is judged with model 1's answer shown first ("1-2") and with model 2's shown
first ("2-1"); a comparison is a win only when both orders name the same model, a tie otherwise. Verdicts
are `[[A]]` / `[[B]]` / `[[C]]` (single grading: `[[1]]`..`[[10]]`); a reply without exactly one such
verdict is recorded as unparseable, never guessed. With `soft`, the probability the judge gave each
verdict letter (from the endpoint's logprobs) is recorded beside the argmax.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError
from nomoat.eval.answers import AnswerSet
from nomoat.eval.judge_cache import JudgeReply, VerdictCache, cache_key
from nomoat.eval.judge_client import Judge, JudgeInputError, JudgeSettings
from nomoat.eval.judge_stats import combine_orders
from nomoat.eval.questions import Question

Progress = Callable[[int, int, int], None]  # (done, total, of which from the cache)
MODES = ("pairwise", "single")


# --------------------------------------------------------------------------- templates


_EXAMPLE = re.compile(r"example_(\d+)_(user|assistant)")


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                        keep_trailing_newline=False)
    return env.from_string(source)


def builtin_templates() -> list[str]:
    """Names of the templates shipped with nomoat (`--judge-prompt builtin:NAME`)."""
    return sorted(f.name.removesuffix(".jinja") for f in (resources.files("nomoat.eval") / "prompts").iterdir()
                  if f.name.endswith(".jinja"))


@dataclass(frozen=True)
class JudgeTemplate:
    """A Jinja2 judge prompt whose blocks become the chat messages: `system` (optional), worked examples as
    earlier turns (optional `example_N_user` / `example_N_assistant` pairs, N = 1, 2, ...: small judges copy
    the verdict format from them), and `user` (required), the judgment asked for."""

    name: str  # "builtin:pairwise" or the file's path
    source: str

    @classmethod
    def load(cls, mode: str, path: str | Path | None = None) -> JudgeTemplate:
        """The built-in template for `mode`, a shipped one (`builtin:NAME`) or a user's file (`--judge-prompt`)."""
        if path is None or str(path).startswith("builtin:"):
            name = mode if path is None else str(path).removeprefix("builtin:")
            if name not in builtin_templates():
                raise NomoatError(f"--judge-prompt {path}: no such built-in template (built in: "
                                  f"{', '.join('builtin:' + n for n in builtin_templates())})")
            src = (resources.files("nomoat.eval") / "prompts" / f"{name}.jinja").read_text(encoding="utf-8")
            tpl = cls(f"builtin:{name}", src)
        else:
            p = Path(path)
            try:
                tpl = cls(str(p), p.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise NomoatError(f"--judge-prompt {p}: no such file") from None
            except (OSError, UnicodeDecodeError) as e:
                raise NomoatError(f"--judge-prompt {p}: cannot read ({e})") from None
        tpl._compiled()  # refuse a broken template before any request
        return tpl

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def _compiled(self):
        from jinja2 import TemplateSyntaxError

        try:
            tpl = _compile(self.source)
        except TemplateSyntaxError as e:
            raise NomoatError(f"{self.name}:{e.lineno}: template syntax error: {e.message}") from None
        if "user" not in tpl.blocks:
            raise NomoatError(f"{self.name}: a judge template needs a {{% block user %}} (and may have a "
                              "{% block system %})")
        shots = {m.groups() for m in map(_EXAMPLE.fullmatch, tpl.blocks) if m}
        for n, role in shots:
            other = "assistant" if role == "user" else "user"
            if (n, other) not in shots:
                raise NomoatError(f"{self.name}: block example_{n}_{role} needs a block example_{n}_{other}")
        return tpl

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Chat messages for one judgment: system, the examples' turns in order, then the user message."""
        from jinja2 import TemplateError

        tpl = self._compiled()
        shots = sorted((int(m.group(1)), m.group(2) == "assistant", b)
                       for b in tpl.blocks if (m := _EXAMPLE.fullmatch(b)))
        try:
            ctx = tpl.new_context(variables)

            def text(block: str) -> str:
                return "".join(tpl.blocks[block](ctx)).strip()

            system = text("system") if "system" in tpl.blocks else ""
            msgs = [{"role": "system", "content": system}] if system else []
            msgs += [{"role": "assistant" if is_answer else "user", "content": text(b)} for _, is_answer, b in shots]
            msgs.append({"role": "user", "content": text("user")})
        except TemplateError as e:
            raise NomoatError(f"{self.name}: {e}") from None
        return msgs


# --------------------------------------------------------------------------- verdicts

_PAIR = re.compile(r"\[\[([ABC])\]\]")
_SCORE = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")


def parse_pairwise(text: str) -> str | None:
    """"A", "B" or "C" when the reply holds exactly one distinct verdict marker; None otherwise."""
    found = set(_PAIR.findall(text))
    return found.pop() if len(found) == 1 else None


def parse_single(text: str) -> float | None:
    """The score in [1, 10] when the reply holds exactly one distinct `[[n]]`; None otherwise."""
    found = {float(m) for m in _SCORE.findall(text)}
    if len(found) != 1:
        return None
    score = found.pop()
    return score if 1 <= score <= 10 else None


def soft_pairwise(text: str, content: list[dict[str, Any]] | None) -> dict[str, float] | None:
    """P(A), P(B), P(C) at the verdict, from the logprobs of the token holding the letter after "[[".

    The alternatives at that step that spell the same prefix followed by another verdict letter count for
    that letter; the three are renormalised over themselves. None when the reply has no single verdict
    or the logprobs do not cover it.
    """
    if not content or parse_pairwise(text) is None:
        return None
    tokens = [str(t.get("token", "")) for t in content]
    joined = "".join(tokens)
    m = _PAIR.search(joined)
    if m is None:
        return None
    pos, start = m.start(1), 0
    for tok, entry in zip(tokens, content):  # noqa: B007 (the loop finds `entry`)
        if start <= pos < start + len(tok):
            break
        start += len(tok)
    else:
        return None
    prefix = joined[start:pos]
    mass = dict.fromkeys("ABC", 0.0)
    seen: set[str] = set()
    alternatives = list(entry.get("top_logprobs") or []) + [entry]
    for alt in alternatives:
        t = str(alt.get("token", ""))
        if t in seen or not t.startswith(prefix):
            continue
        seen.add(t)
        rest = re.fullmatch(r"([ABC])\]{0,2}\s*", t[len(prefix):])
        if rest is not None and alt.get("logprob") is not None:
            mass[rest.group(1)] += math.exp(float(alt["logprob"]))
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()} if total > 0 else None


# --------------------------------------------------------------------------- running requests


@dataclass
class Request:
    key: str
    messages: list[dict[str, str]]
    seed: int | None


@dataclass
class RunStats:
    total: int = 0
    cached: int = 0
    requested: int = 0  # judge calls made by this run
    failed: int = 0  # requests the judge refused for their input (recorded as unparseable)


def run_requests(requests: Sequence[Request], judge: Judge, cache: VerdictCache, settings: JudgeSettings,
                 progress: Progress | None = None) -> tuple[dict[str, JudgeReply], RunStats]:
    """Every request's reply: from the cache, else from the judge (`settings.parallel` at once), each stored
    in the cache as it arrives, so that an interrupted run resumes where it stopped."""
    replies: dict[str, JudgeReply] = {}
    todo: dict[str, Request] = {}
    for r in requests:
        if r.key in replies or r.key in todo:
            continue
        hit = cache.get(r.key)
        if hit is not None and (not settings.soft or hit.logprobs is not None):
            replies[r.key] = hit
        else:
            todo[r.key] = r
    stats = RunStats(total=len(replies) + len(todo), cached=len(replies))
    if progress:
        progress(len(replies), stats.total, stats.cached)
    if not todo:
        return replies, stats

    def ask(r: Request) -> JudgeReply:
        try:
            return judge(r.messages, settings, r.seed)
        except JudgeInputError as e:
            return JudgeReply("", None, error=str(e))

    def keep(key: str, reply: JudgeReply) -> None:
        cache.put(key, judge.name, reply)
        replies[key] = reply
        stats.requested += 1
        stats.failed += reply.error is not None

    workers = min(settings.parallel, judge.max_parallel or settings.parallel, len(todo))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="nomoat-judge")
    futures: dict[Future, str] = {pool.submit(ask, r): k for k, r in todo.items()}
    try:
        for f in as_completed(futures):
            keep(futures.pop(f), f.result())
            if progress:
                progress(len(replies), stats.total, stats.cached)
    finally:
        # On an error or Ctrl-C: drop what has not started, let what is in flight finish, keep what came back.
        pool.shutdown(wait=True, cancel_futures=True)
        for f, k in futures.items():
            if f.done() and not f.cancelled() and f.exception() is None:
                keep(k, f.result())
    return replies, stats


# --------------------------------------------------------------------------- pairwise and single


@dataclass
class JudgeResult:
    records: list[dict[str, Any]]
    stats: RunStats
    skipped: list[str] = field(default_factory=list)  # what could not be judged, and why


def _questions_for(sets: Sequence[AnswerSet], questions: dict[str, Question] | None) -> dict[str, Question]:
    """Each answered question's text: from `questions` (a --questions file) or from the answer records."""
    found: dict[str, Question] = dict(questions or {})
    for s in sets:
        for k, a in s.answers.items():
            if k not in found and a.question is not None:
                found[k] = a.question
    return found


def _check_models(sets: Sequence[AnswerSet]) -> None:
    seen: dict[str, Path] = {}
    for s in sets:
        if s.model_id in seen:
            raise NomoatError(f"{s.path}: model_id {s.model_id!r} is also the model of {seen[s.model_id]}; give "
                              "each answer set its own id (nomoat answer --model-id NAME)")
        seen[s.model_id] = s.path


def model_pairs(sets: Sequence[AnswerSet], all_pairs: bool) -> list[tuple[AnswerSet, AnswerSet]]:
    """(model 1, model 2) comparisons: the first set against each other one, or every pair."""
    if len(sets) < 2:
        raise NomoatError("judge pairwise needs at least two answer files (a baseline and a model)")
    _check_models(sets)
    return list(combinations(sets, 2)) if all_pairs else [(sets[0], s) for s in sets[1:]]


def _common(sets: Sequence[AnswerSet], qs: dict[str, Question], skipped: list[str]) -> list[str]:
    keys = [k for k in sets[0].answers if all(k in s.answers for s in sets[1:])]
    missing = {k for s in sets for k in s.answers} - set(keys)
    if missing:
        skipped.append(f"{len(missing)} question(s) not answered in every file: "
                       f"{', '.join(sorted(missing)[:5])}{', ...' if len(missing) > 5 else ''}")
    no_text = [k for k in keys if k not in qs]
    if no_text:
        raise NomoatError(f"{sets[0].answers[no_text[0]].source}: the answer record does not carry its question "
                          "(MT-bench's model_answer files do not); pass the question file with --questions")
    return keys


def _ref(q: Question, turn: int) -> str | None:
    return q.reference[turn] if q.reference and turn < len(q.reference) and q.reference[turn].strip() else None


ORDERS = (("1-2", False), ("2-1", True))  # (name, is model 2 shown as A)


def judge_pairwise(sets: Sequence[AnswerSet], judge: Judge, cache: VerdictCache, settings: JudgeSettings,
                   template: JudgeTemplate, questions: dict[str, Question] | None = None, all_pairs: bool = False,
                   progress: Progress | None = None) -> JudgeResult:
    """Judge model 2 against model 1 on every shared question and turn, in both orders, `settings.repeat`
    times; returns one record per (pair, question, turn, repeat) with both orders' raw texts and verdicts."""
    settings.check()
    pairs = model_pairs(sets, all_pairs)
    qs = _questions_for(sets, questions)
    skipped: list[str] = []
    keys = _common(sets, qs, skipped)
    plans, requests = [], []
    for s1, s2 in pairs:
        for k in keys:
            q, a1, a2 = qs[k], s1.answers[k].turns, s2.answers[k].turns
            for t in range(min(len(q.turns), len(a1), len(a2))):
                for rep in range(settings.repeat):
                    order_keys = []
                    for order, swap in ORDERS:
                        ans_a, ans_b = (a2, a1) if swap else (a1, a2)
                        history = [{"question": q.turns[j], "answer_a": ans_a[j], "answer_b": ans_b[j]}
                                   for j in range(t)]
                        msgs = template.render(question=q.turns[t], answer_a=ans_a[t], answer_b=ans_b[t],
                                               turn=t + 1, history=history, reference=_ref(q, t),
                                               category=q.category)
                        key = cache_key(mode="pairwise", judge=judge.name, template=template.source,
                                        question=list(q.turns[:t + 1]), reference=_ref(q, t),
                                        answers_a=list(ans_a[:t + 1]), answers_b=list(ans_b[:t + 1]), order=order,
                                        repeat=rep, temperature=settings.temperature, max_tokens=settings.max_tokens)
                        requests.append(Request(key, msgs, rep))
                        order_keys.append(key)
                    plans.append((s1.model_id, s2.model_id, q, t, rep, len(a1[t]), len(a2[t]), order_keys, a1, a2))
    replies, stats = run_requests(requests, judge, cache, settings, progress)
    records = []
    for m1, m2, q, t, rep, len1, len2, order_keys, a1, a2 in plans:
        orders = []
        for (order, swap), key in zip(ORDERS, order_keys):
            reply = replies[key]
            verdict = parse_pairwise(reply.text)
            names = {"A": "model_2" if swap else "model_1", "B": "model_1" if swap else "model_2", "C": "tie"}
            soft = soft_pairwise(reply.text, reply.logprobs) if settings.soft else None
            orders.append({"order": order, "a": m2 if swap else m1, "b": m1 if swap else m2, "text": reply.text,
                           "verdict": verdict, "winner": names.get(verdict or ""), "soft": soft,
                           "error": reply.error})
        winner, kind = combine_orders(orders[0]["winner"], orders[1]["winner"])
        records.append({"mode": "pairwise", "question_id": q.question_id, "category": q.category, "turn": t + 1,
                        "repeat": rep, "model_1": m1, "model_2": m2, "judge": judge.name, "template": template.name,
                        "template_sha256": template.sha256, "temperature": settings.temperature,
                        "len_1": len1, "len_2": len2, "orders": orders, "winner": winner, "tie_kind": kind,
                        # the conversation judged, so that verdicts alone feed ratings exports and preference data
                        "turns": list(q.turns[:t + 1]), "answers_1": list(a1[:t + 1]),
                        "answers_2": list(a2[:t + 1])})
    return JudgeResult(records, stats, skipped)


def judge_single(sets: Sequence[AnswerSet], judge: Judge, cache: VerdictCache, settings: JudgeSettings,
                 template: JudgeTemplate, questions: dict[str, Question] | None = None,
                 progress: Progress | None = None) -> JudgeResult:
    """Grade every answer of every set from 1 to 10, `settings.repeat` times; one record per (model,
    question, turn, repeat) with the raw text and the parsed score (None when unparseable)."""
    settings.check()
    _check_models(sets)
    qs = _questions_for(sets, questions)
    skipped: list[str] = []
    plans, requests = [], []
    for s in sets:
        for k in _common([s], qs, skipped):
            q, ans = qs[k], s.answers[k].turns
            for t in range(min(len(q.turns), len(ans))):
                history = [{"question": q.turns[j], "answer": ans[j]} for j in range(t)]
                msgs = template.render(question=q.turns[t], answer=ans[t], turn=t + 1, history=history,
                                       reference=_ref(q, t), category=q.category)
                for rep in range(settings.repeat):
                    key = cache_key(mode="single", judge=judge.name, template=template.source,
                                    question=list(q.turns[:t + 1]), reference=_ref(q, t), answers=list(ans[:t + 1]),
                                    repeat=rep, temperature=settings.temperature, max_tokens=settings.max_tokens)
                    requests.append(Request(key, msgs, rep))
                    plans.append((s.model_id, q, t, rep, len(ans[t]), key))
    replies, stats = run_requests(requests, judge, cache, settings, progress)
    records = [{"mode": "single", "question_id": q.question_id, "category": q.category, "turn": t + 1,
                "repeat": rep, "model": model, "judge": judge.name, "template": template.name,
                "template_sha256": template.sha256, "temperature": settings.temperature, "length": length,
                "text": replies[key].text, "score": parse_single(replies[key].text), "error": replies[key].error}
               for model, q, t, rep, length, key in plans]
    return JudgeResult(records, stats, skipped)

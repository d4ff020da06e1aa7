"""Preference data for DPO and its relatives: chosen / rejected pairs from the layouts people have, tokenized
through the model's chat template, and batched with both completions packed after one shared prompt.

Layouts (``--format``; detected from the first record's keys unless forced):

- ``trl``: ``{"prompt", "chosen", "rejected"}`` as text or as chat messages; without ``prompt`` the shared
  prompt is the messages both conversations begin with (text in Anthropic's ``Human: / Assistant:`` layout
  is split into turns first).
- ``oasst``: an Open Assistant export, message trees (``message_tree_id`` + nested ``prompt``/``replies``) or
  one message per line (``message_id``, ``parent_id``): ranked sibling assistant replies become pairs.
- ``verdicts``: ``nomoat judge pairwise`` output: the winner's conversation is chosen (ties dropped).
- ``battles``: Chatbot Arena's cleaned battles (``model_a``, ``model_b``, ``winner``, ``conversation_a/b``):
  the winner's conversation is chosen (ties and both-bad dropped).

Reading an arena SQLite database is the arena's business (``nomoat.eval``); `pairs_from_battles` turns
its battles into pairs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from nomoat.data.records import kind_of, read_records
from nomoat.data.sft import Batches, ChatTokenizer, Example, tokenize_example
from nomoat.errors import NomoatError
from nomoat.model.losses import IGNORE_INDEX

PAIR_FORMATS = ("trl", "oasst", "verdicts", "battles")
ROLES = ("system", "user", "assistant")
_OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
SQLITE_MAGIC = b"SQLite format 3\x00"


@dataclass
class PreferencePair:
    """A prompt and two continuations of it, the first preferred.

    `chosen` and `rejected` are message lists (usually one assistant reply; whole later conversations for
    multi-turn battles); the loss covers their assistant messages only.
    """

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    source: str  # "file:line", for errors and skip reports


# --------------------------------------------------------------------------- reading


def is_sqlite(path: str | Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def load_pairs(path: str | Path, fmt: str = "auto", langs: Sequence[str] = (),
               skipped: list[str] | None = None) -> list[PreferencePair]:
    """Preference pairs from a JSONL / JSON file in one of `PAIR_FORMATS`.

    `langs` keeps only Open Assistant messages in these languages. Records that carry no preference (ties,
    identical answers, unranked or unreviewed replies) are left out, each noted in `skipped` when given.

    Raises:
        NomoatError: `file:line: what is wrong` for a malformed record, or when no pair is left.
    """
    name = str(path)
    if fmt != "auto" and fmt not in PAIR_FORMATS:
        raise NomoatError(f"{name}: unknown preference data format {fmt!r}; expected auto or one of "
                          f"{', '.join(PAIR_FORMATS)}")
    if is_sqlite(path):
        raise NomoatError(f"{name}: an SQLite database; read arena databases with nomoat.eval.battles")
    records = read_records(path, "preference records", name)
    if fmt == "auto":
        line, first = records[0]
        fmt = detect_format(first, f"{name}:{line}")
    if langs and fmt != "oasst":
        raise NomoatError(f"{name}: --lang filters Open Assistant data; this file is in the {fmt} layout")
    notes: list[str] = []
    if fmt == "trl":
        pairs = [p for line, rec in records if (p := _trl_pair(rec, f"{name}:{line}", notes))]
    elif fmt == "oasst":
        pairs = _oasst_pairs(records, name, [lang.strip() for lang in langs if lang.strip()], notes)
    elif fmt == "verdicts":
        pairs = _verdict_pairs(records, name, notes)
    else:
        pairs = pairs_from_battles(((f"{name}:{line}", rec) for line, rec in records), notes)
    if skipped is not None:
        skipped.extend(notes)
    if not pairs:
        why = f" ({len(notes)} records carried no preference, e.g. {notes[0]})" if notes else ""
        raise NomoatError(f"{name}: no preference pairs in this {fmt} file{why}")
    return pairs


def detect_format(rec: dict, src: str) -> str:
    """The layout of a record, from its keys."""
    if "chosen" in rec and "rejected" in rec:
        return "trl"
    if "model_a" in rec and ("conversation_a" in rec or "winner" in rec):
        return "battles"
    if "model_1" in rec and "winner" in rec or rec.get("mode") in ("pairwise", "single"):
        return "verdicts"
    if "message_tree_id" in rec and isinstance(rec.get("prompt"), dict) or "message_id" in rec:
        return "oasst"
    keys = ", ".join(sorted(rec)) or "none"
    raise NomoatError(f"{src}: cannot tell the preference data format from the record's keys ({keys}); expected "
                      '"prompt"/"chosen"/"rejected" (trl), an Open Assistant message tree or message (oasst), '
                      "a nomoat judge verdict (verdicts) or an arena battle (battles)")


def _messages(value: Any, where: str, final_assistant: bool = False) -> list[dict[str, str]]:
    """A validated list of {role, content} messages."""
    if not isinstance(value, list):
        raise NomoatError(f"{where} must be an array of messages, got {kind_of(value)}")
    out = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise NomoatError(f"{at} is {kind_of(m)}, expected an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise NomoatError(f"{at}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise NomoatError(f'{at}: "content" must be a string, got {kind_of(content)}')
        if role == "assistant" and not content.strip():
            raise NomoatError(f"{at}: empty assistant reply")
        out.append({"role": role, "content": content})
    if final_assistant and not any(m["role"] == "assistant" for m in out):
        raise NomoatError(f"{where} has no assistant reply")
    return out


def _hh_messages(text: str) -> list[dict[str, str]] | None:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages; None if it is not in that layout."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def split_shared_prompt(a: list[dict[str, str]], b: list[dict[str, str]]
                        ) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(shared prompt, rest of a, rest of b): the messages both conversations begin with, and what follows."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    # The split falls before an assistant message, never inside a run that ends with one both share.
    while n and a[n - 1]["role"] == "assistant" and (n == len(a) or n == len(b)):
        n -= 1
    return a[:n], a[n:], b[n:]


def _make_pair(prompt: list[dict[str, str]], chosen: list[dict[str, str]], rejected: list[dict[str, str]],
               src: str, notes: list[str]) -> PreferencePair | None:
    if chosen == rejected:
        notes.append(f"{src}: chosen and rejected are identical")
        return None
    for what, side in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in side):
            raise NomoatError(f"{src}: the {what} completion has no assistant reply after the shared prompt")
    return PreferencePair(prompt, chosen, rejected, src)


def _trl_pair(rec: dict, src: str, notes: list[str]) -> PreferencePair | None:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise NomoatError(f'{src}: record has no "{key}" field (trl layout: prompt, chosen, rejected)')
    prompt = rec.get("prompt")
    if prompt is None:  # implicit prompt: what both conversations share
        sides = []
        for key in ("chosen", "rejected"):
            v = rec[key]
            if isinstance(v, str):
                msgs = _hh_messages(v)
                if msgs is None:
                    raise NomoatError(f'{src}: no "prompt" field, and "{key}" is plain text; give a prompt, chat '
                                      'messages, or "Human: / Assistant:" turns')
                v = msgs
            sides.append(_messages(v, f'{src}: "{key}"'))
        shared, chosen, rejected = split_shared_prompt(*sides)
        return _make_pair(shared, chosen, rejected, src, notes)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise NomoatError(f'{src}: "prompt" is empty')
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(prompt, f'{src}: "prompt"')
    sides = []
    for key in ("chosen", "rejected"):
        v = rec[key]
        if isinstance(v, str):
            if not v.strip():
                raise NomoatError(f'{src}: "{key}" is empty')
            sides.append([{"role": "assistant", "content": v}])
        else:
            sides.append(_messages(v, f'{src}: "{key}"', final_assistant=True))
    return _make_pair(prompt_msgs, sides[0], sides[1], src, notes)


def pairs_from_battles(battles: Iterable[tuple[str, dict]], notes: list[str] | None = None) -> list[PreferencePair]:
    """Pairs from (source, battle) in Chatbot Arena's cleaned-battle layout; ties and both-bad are dropped."""
    notes = notes if notes is not None else []
    pairs = []
    for src, b in battles:
        winner = b.get("winner")
        if winner in ("tie", "tie (bothbad)"):
            notes.append(f"{src}: {winner}")
            continue
        if winner not in ("model_a", "model_b"):
            raise NomoatError(f'{src}: "winner" must be model_a, model_b, tie or tie (bothbad), got {winner!r}')
        conv = {side: _messages(b.get(f"conversation_{side}"), f'{src}: "conversation_{side}"', final_assistant=True)
                for side in ("a", "b")}
        won, lost = ("a", "b") if winner == "model_a" else ("b", "a")
        shared, chosen, rejected = split_shared_prompt(conv[won], conv[lost])
        pair = _make_pair(shared, chosen, rejected, src, notes)
        if pair:
            pairs.append(pair)
    return pairs


def _conversation(turns: list[str], answers: list[str]) -> list[dict[str, str]]:
    msgs = []
    for q, a in zip(turns, answers):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def _verdict_pairs(records: list[tuple[int, dict]], name: str, notes: list[str]) -> list[PreferencePair]:
    """One pair per judged (question, turn, models); a verdict judged several times (--repeat) counts once,
    for the model that won more than half of the repeats."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for line, rec in records:
        src = f"{name}:{line}"
        if rec.get("mode") != "pairwise":
            notes.append(f"{src}: not a pairwise verdict")
            continue
        for key in ("model_1", "model_2"):
            if not isinstance(rec.get(key), str):
                raise NomoatError(f'{src}: "{key}" must be a string, got {kind_of(rec.get(key))}')
        if rec.get("winner") not in ("model_1", "model_2", "tie", None):
            raise NomoatError(f'{src}: "winner" must be model_1, model_2 or tie, got {rec.get("winner")!r}')
        if not all(k in rec for k in ("turns", "answers_1", "answers_2")):
            raise NomoatError(f"{src}: the verdict has no judged conversation (turns, answers_1, answers_2); "
                              "it was written by an older nomoat judge: judge again")
        turn = rec.get("turn", 1)
        if not isinstance(turn, int) or isinstance(turn, bool) or turn < 1:
            raise NomoatError(f'{src}: "turn" must be a positive integer, got {turn!r}')
        for key in ("turns", "answers_1", "answers_2"):
            v = rec[key]
            if not isinstance(v, list) or len(v) < turn or not all(isinstance(x, str) for x in v):
                raise NomoatError(f'{src}: "{key}" must be an array of at least {turn} strings (turn {turn})')
        key = (rec.get("question_id"), turn, rec["model_1"], rec["model_2"])
        groups.setdefault(key, []).append((src, rec))
    pairs = []
    for group in groups.values():
        src, rec = group[0]
        wins = [r["winner"] for _, r in group]
        winner = next((w for w in ("model_1", "model_2") if wins.count(w) * 2 > len(wins)), None)
        if winner is None:
            notes.append(f"{src}: no model won" + (f" more than half of {len(wins)} repeats" if len(wins) > 1 else ""))
            continue
        loser = "model_2" if winner == "model_1" else "model_1"
        t = rec["turn"] if "turn" in rec else 1
        a = _conversation(rec["turns"][:t], rec[f"answers_{winner[-1]}"][:t])
        b = _conversation(rec["turns"][:t], rec[f"answers_{loser[-1]}"][:t])
        shared, chosen, rejected = split_shared_prompt(a, b)
        pair = _make_pair(shared, chosen, rejected, src, notes)
        if pair:
            pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- Open Assistant


@dataclass
class _OasstMessage:
    id: str
    parent: str | None
    role: str
    text: str
    lang: str | None
    usable: bool  # not deleted and reviewed positively
    rank: int | None
    src: str


def _oasst_message(m: Any, parent: str | None, src: str) -> _OasstMessage:
    if not isinstance(m, dict):
        raise NomoatError(f"{src}: a message is {kind_of(m)}, expected an object")
    mid, role, text = m.get("message_id"), m.get("role"), m.get("text")
    if not isinstance(mid, str) or not mid:
        raise NomoatError(f'{src}: "message_id" must be a non-empty string, got {kind_of(mid)}')
    where = f"{src} (message {mid})"
    if role not in _OASST_ROLES:
        raise NomoatError(f'{where}: "role" must be prompter or assistant, got {role!r}')
    if not isinstance(text, str):
        raise NomoatError(f'{where}: "text" must be a string, got {kind_of(text)}')
    rank = m.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
        raise NomoatError(f'{where}: "rank" must be a non-negative integer or null, got {rank!r}')
    lang = m.get("lang")
    usable = m.get("deleted") is not True and m.get("review_result") is True and bool(text.strip())
    return _OasstMessage(mid, parent, _OASST_ROLES[role], text, lang if isinstance(lang, str) else None, usable,
                         rank, where)


def _oasst_messages(records: list[tuple[int, dict]], name: str) -> dict[str, _OasstMessage]:
    """Every message of a tree export or a message-per-line export, by id."""
    out: dict[str, _OasstMessage] = {}
    for line, rec in records:
        src = f"{name}:{line}"
        if isinstance(rec.get("prompt"), dict):  # one tree per line: walk it without recursion
            stack: list[tuple[Any, str | None]] = [(rec["prompt"], None)]
            while stack:
                m, parent = stack.pop()
                msg = _oasst_message(m, parent, src)
                out[msg.id] = msg
                replies = m.get("replies") or []
                if not isinstance(replies, list):
                    raise NomoatError(f'{msg.src}: "replies" must be an array, got {kind_of(replies)}')
                stack.extend((r, msg.id) for r in replies)
        elif "message_id" in rec:
            parent = rec.get("parent_id")
            if parent is not None and not isinstance(parent, str):
                raise NomoatError(f'{src}: "parent_id" must be a string or null, got {kind_of(parent)}')
            msg = _oasst_message(rec, parent, src)
            out[msg.id] = msg
        else:
            raise NomoatError(f"{src}: not an Open Assistant message tree (message_tree_id, prompt) or message "
                              "(message_id, parent_id, role, text)")
    return out


def _oasst_pairs(records: list[tuple[int, dict]], name: str, langs: list[str],
                 notes: list[str]) -> list[PreferencePair]:
    """Ranked sibling assistant replies under one prompter message: every better-ranked reply against every
    worse-ranked one (rank 0 is best). Deleted or not positively reviewed messages are skipped, and so are
    replies whose conversation contains one; with `langs`, every message of a pair must be in one of them."""
    msgs = _oasst_messages(records, name)
    children: dict[str, list[_OasstMessage]] = {}
    for m in msgs.values():
        if m.parent is not None:
            children.setdefault(m.parent, []).append(m)
    pairs = []
    for parent_id, replies in children.items():
        parent = msgs.get(parent_id)
        ranked = [r for r in replies if r.role == "assistant" and r.rank is not None]
        if parent is None or parent.role != "user" or len(ranked) < 2:
            continue
        path, node, ok = [], parent, True
        while node is not None:  # root ... parent, bounded by the number of messages (no cycles)
            ok = ok and node.usable and (not langs or node.lang in langs)
            path.append(node)
            node = msgs.get(node.parent) if node.parent is not None and len(path) <= len(msgs) else None
        if path[-1].parent is not None and path[-1].parent not in msgs:
            notes.append(f"{parent.src}: its conversation's parent {path[-1].parent} is not in the file")
            continue
        if not ok:
            notes.append(f"{parent.src}: the conversation has a deleted, unreviewed or other-language message")
            continue
        good = [r for r in ranked if r.usable and (not langs or r.lang in langs)]
        notes.extend(f"{r.src}: deleted, unreviewed or another language" for r in ranked if r not in good)
        good.sort(key=lambda r: (r.rank, r.id))
        prompt = [{"role": m.role, "content": m.text} for m in reversed(path)]
        for i, better in enumerate(good):
            for worse in good[i + 1:]:
                if worse.rank == better.rank:
                    continue
                pair = _make_pair(prompt, [{"role": "assistant", "content": better.text}],
                                  [{"role": "assistant", "content": worse.text}], better.src, notes)
                if pair:
                    pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- tokenizing


@dataclass
class PreferenceRow:
    """A tokenized pair: the shared prompt's ids, then each completion's ids and labels (aligned with the ids,
    IGNORE_INDEX where a token carries no loss)."""

    prompt: list[int]
    chosen: list[int]
    chosen_labels: list[int]
    rejected: list[int]
    rejected_labels: list[int]
    source: str

    @property
    def width(self) -> int:
        """Tokens in the packed row: prompt, chosen, rejected."""
        return len(self.prompt) + len(self.chosen) + len(self.rejected)


def _completion_labels(ids_labels: tuple[list[int], list[int]], n_prompt_replies: int) -> tuple[list[int], list[int]]:
    """The labels with the prompt's own assistant replies masked: only the runs of trained tokens after the
    first `n_prompt_replies` runs (one per assistant reply) keep their loss."""
    ids, labels = ids_labels
    out, run, in_run = [], -1, False
    for y in labels:
        if y != IGNORE_INDEX and not in_run:
            run += 1
        in_run = y != IGNORE_INDEX
        out.append(y if in_run and run >= n_prompt_replies else IGNORE_INDEX)
    return ids, out


def _first_label(labels: list[int]) -> int:
    return next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))


def tokenize_pair(pair: PreferencePair, tok: ChatTokenizer, seq_len: int) -> PreferenceRow | str:
    """The pair through the model's chat template; a reason string when it leaves nothing to train on.

    Each side (prompt + completion) is cut to `seq_len` tokens from the end of its completion. The shared
    prompt is the longest common token prefix of the two rendered conversations that ends before either
    completion's first trained token.
    """
    n_replies = sum(m["role"] == "assistant" for m in pair.prompt)
    sides = []
    for side in (pair.chosen, pair.rejected):
        ex = Example(messages=pair.prompt + side, text=None, source=pair.source)
        sides.append(_completion_labels(tokenize_example(ex, tok, 1 << 30), n_replies))
    (c_ids, c_lab), (r_ids, r_lab) = sides
    shared = 0
    limit = min(_first_label(c_lab), _first_label(r_lab))
    while shared < limit and c_ids[shared] == r_ids[shared]:
        shared += 1
    if shared == 0:
        return f"{pair.source}: the completions share no prompt token"
    if shared >= seq_len:
        return f"{pair.source}: the prompt fills --seq-len {seq_len}"
    parts = []
    for ids, lab in ((c_ids, c_lab), (r_ids, r_lab)):
        ids, lab = ids[shared:seq_len], lab[shared:seq_len]
        while lab and lab[-1] == IGNORE_INDEX:  # nothing after the last trained token is needed
            ids, lab = ids[:-1], lab[:-1]
        if not lab:
            return f"{pair.source}: no completion token within --seq-len {seq_len}"
        parts.append((ids, lab))
    if parts[0] == parts[1]:
        return f"{pair.source}: chosen and rejected are the same within --seq-len {seq_len}"
    return PreferenceRow(c_ids[:shared], parts[0][0], parts[0][1], parts[1][0], parts[1][1], pair.source)


def build_preference_rows(pairs: Sequence[PreferencePair], tok: ChatTokenizer, seq_len: int,
                          skipped: list[str] | None = None) -> list[PreferenceRow]:
    """Tokenize every pair; those left without a trainable difference are noted in `skipped`."""
    rows = []
    for p in pairs:
        r = tokenize_pair(p, tok, seq_len)
        if isinstance(r, str):
            if skipped is not None:
                skipped.append(r)
        else:
            rows.append(r)
    if not rows:
        raise NomoatError(f"{pairs[0].source if pairs else 'data'}: no pair has a completion token within "
                          f"--seq-len {seq_len}")
    return rows


# --------------------------------------------------------------------------- batching


class PreferenceBatch(NamedTuple):
    """Pairs packed one per row as prompt | chosen | rejected, right-padded.

    The rejected completion continues the prompt's positions and does not see the chosen one, so one forward
    pass scores both completions while computing the prompt once.
    """

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention: torch.Tensor  # [B, T, T] bool: query t sees key s
    src_row: torch.Tensor  # [N] per scored token: its row,
    src_pos: torch.Tensor  # [N] the position whose hidden state predicts it,
    target: torch.Tensor  # [N] the token,
    seq: torch.Tensor  # [N] and its sequence: pair i's chosen is i, its rejected B + i
    lengths: torch.Tensor  # [2B] scored tokens per sequence (float)
    index: torch.Tensor  # [B] the pairs' positions in the row list (for precomputed reference values)
    tokens: int  # real (non-padding) tokens


def collate_pairs(rows: Sequence[PreferenceRow], index: Sequence[int], pad_id: int) -> PreferenceBatch:
    B = len(rows)
    T = max(r.width for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    attn = torch.zeros((B, T, T), dtype=torch.bool)
    src_row, src_pos, target, seq = [], [], [], []
    lengths = torch.zeros(2 * B)
    ar = torch.arange(T)
    for b, r in enumerate(rows):
        p, c, n = len(r.prompt), len(r.chosen), r.width
        ids[b, :n] = torch.tensor(r.prompt + r.chosen + r.rejected, dtype=torch.long)
        pos[b, :p + c] = torch.arange(p + c)
        pos[b, p + c:n] = torch.arange(p, n - c)
        pos[b, n:] = torch.arange(T - n)  # padding: any valid position
        seen = ar[None, :] <= ar[:, None]
        seen &= (ar < n)[None, :]
        seen &= ~(((ar >= p + c) & (ar < n))[:, None] & ((ar >= p) & (ar < p + c))[None, :])
        seen[ar >= n, ar[ar >= n]] = True  # a padding query sees itself (no empty softmax)
        attn[b] = seen
        for s, (start, comp, labels) in enumerate(((p, r.chosen, r.chosen_labels), (p + c, r.rejected,
                                                                                  r.rejected_labels))):
            for i, y in enumerate(labels):
                if y == IGNORE_INDEX:
                    continue
                src_row.append(b)
                src_pos.append(start + i - 1 if i else p - 1)  # the first completion token follows the prompt
                target.append(comp[i])
                seq.append(b + s * B)
                lengths[b + s * B] += 1
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return PreferenceBatch(ids, pos, attn, as_long(src_row), as_long(src_pos), as_long(target), as_long(seq),
                           lengths, as_long(list(index)), sum(r.width for r in rows))


class PreferenceBatches:
    """Shuffled batches of pairs that are a pure function of (seed, epoch), like `Batches` for SFT rows."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def iter_batches(self, rows: Sequence[PreferenceRow], batch_size: int, seed: int, epoch: int,
                     start: int = 0) -> Iterator[PreferenceBatch]:
        perm = Batches.order(len(rows), seed, epoch)
        for b in range(start, Batches.count(len(rows), batch_size)):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            yield collate_pairs([rows[i] for i in idx], idx, self.pad_id)

    def in_order(self, rows: Sequence[PreferenceRow], batch_size: int) -> Iterator[PreferenceBatch]:
        """Unshuffled batches (reference and validation passes), similar widths together to pad less."""
        order = sorted(range(len(rows)), key=lambda i: rows[i].width)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            yield collate_pairs([rows[i] for i in idx], idx, self.pad_id)

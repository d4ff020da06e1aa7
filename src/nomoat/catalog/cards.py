"""What an exported adapter says about itself to other tools: a Hugging Face model card (README.md with
YAML front matter) and an Ollama Modelfile (FROM, ADAPTER, TEMPLATE, stop tokens).

YAML is written by hand (PyYAML is not a dependency): block style, every string double-quoted with JSON's
escapes, which YAML's double-quoted scalars read the same way.

The Modelfile's TEMPLATE is derived, not translated: the model's Jinja chat template is rendered on
probe conversations and the text around each message is read off, giving a per-role Go template
(`{{ range .Messages }}...`). The result is then re-rendered on more conversations and compared with
Jinja's output; only when every one matches is it called exact (for plain-text chats: no tools or
images). Templates that fold the system prompt into the first user turn, trim or rewrite content, or
do anything else a per-role template cannot express are written anyway, marked approximate, with the
first conversation that differs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---- YAML front matter ----
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return ".nan" if math.isnan(v) else (".inf" if v > 0 else "-.inf") if math.isinf(v) else repr(v)
    return json.dumps(str(v), ensure_ascii=False)


def yaml_block(obj: Any, indent: int = 0) -> str:
    """Block-style YAML for dicts (keys: identifiers), lists and scalars."""
    pad = " " * indent
    if isinstance(obj, dict):
        if not obj:
            return f"{pad}{{}}\n"
        out = []
        for k, v in obj.items():
            if not _KEY.fullmatch(str(k)):
                raise ValueError(f"YAML key {k!r} is not a plain identifier")
            if isinstance(v, dict | list) and v:
                out.append(f"{pad}{k}:\n{yaml_block(v, indent + 2)}")
            elif isinstance(v, dict | list):
                out.append(f"{pad}{k}: {'{}' if isinstance(v, dict) else '[]'}\n")
            else:
                out.append(f"{pad}{k}: {_scalar(v)}\n")
        return "".join(out)
    if isinstance(obj, list):
        out = []
        for v in obj:
            if isinstance(v, dict | list) and v:
                inner = yaml_block(v, indent + 2)
                out.append(f"{pad}- {inner[indent + 2:]}")  # the first line goes after the dash
            else:
                out.append(f"{pad}- {_scalar(v)}\n")
        return "".join(out)
    return f"{pad}{_scalar(obj)}\n"


def read_front_matter(text: str) -> dict[str, Any]:
    """The top-level `key: scalar` lines of a model card's front matter (enough to read a license); nested
    values are skipped."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    out: dict[str, Any] = {}
    for line in text[3:end if end > 0 else len(text)].splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_-]*):\s*(.*?)\s*$", line)
        if m and m.group(2) and not m.group(2).startswith(("#", "|", ">")):
            v = m.group(2)
            if v[:1] in "\"'" and v[-1:] == v[:1] and len(v) > 1:
                v = v[1:-1]
            out[m.group(1)] = v
    return out


# ---- the model card ----
@dataclass
class CardFacts:
    """What the card states; everything optional except the adapter's name."""

    name: str
    base_hub_id: str | None = None
    base_name: str = ""
    base_fingerprint: str | None = None
    license: str | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: Sequence[str] = ()
    rslora: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    lineage: list[str] = field(default_factory=list)  # lines, e.g. "combine of a:v1 (weight 1)"
    results: list[dict[str, Any]] = field(default_factory=list)  # {metric, value, kind, detail, created}
    files: list[tuple[str, str, int]] = field(default_factory=list)  # (name, sha256, size)
    gguf_file: str | None = None
    modelfile: bool = False


def _model_index(f: CardFacts) -> list[dict[str, Any]]:
    results = []
    for r in f.results:
        d = r.get("detail") or {}
        data = str(d.get("data") or "unknown")
        dataset: dict[str, Any] = {"name": data.rsplit("/", 1)[-1], "type": "json"}
        if d.get("data_sha256"):
            dataset["revision"] = f"sha256:{d['data_sha256']}"
        results.append({"task": {"type": "text-generation", "name": str(r.get("kind") or "eval")},
                        "dataset": dataset,
                        "metrics": [{"type": str(r["metric"]), "value": float(r["value"]),
                                     "name": str(r["metric"])}]})
    return [{"name": f.name, "results": results}] if results else []


def model_card(f: CardFacts) -> str:
    """README.md for an adapter folder: YAML front matter the Hub reads (base_model, base_model_relation,
    library_name, license, datasets as content hashes, metrics as model-index) and a body saying how to use
    it and where it came from."""
    prov = f.provenance
    front: dict[str, Any] = {}
    if f.base_hub_id:
        front["base_model"] = f.base_hub_id
        front["base_model_relation"] = "adapter"
    front["library_name"] = "peft"
    if f.license:
        front["license"] = f.license
    if prov.get("data_sha256"):
        front["datasets"] = [f"sha256:{prov['data_sha256']}"]
    front["tags"] = ["nomoat", "lora", "text-generation"]
    index = _model_index(f)
    if index:
        front["model-index"] = index
    base = f.base_hub_id or f.base_name or "its base model"
    shape = ", ".join(x for x in (f"rank {f.rank}" if f.rank else "", f"alpha {f.alpha:g}" if f.alpha else "",
                                  "rsLoRA" if f.rslora else "", f"targets {', '.join(f.targets)}" if f.targets else "")
                      if x)
    lines = ["---", yaml_block(front).rstrip("\n"), "---", "", f"# {f.name}", "",
             f"A LoRA adapter ({shape}) for "
             + (f"[{base}](https://huggingface.co/{base})" if f.base_hub_id else f"`{base}`") + ", made with nomoat.",
             ""]
    if not f.license:
        lines += ["The base model's license was not recorded: add a `license` to the front matter before "
                  "uploading.", ""]
    lines += ["## Use", "", "```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
              "", f"base = AutoModelForCausalLM.from_pretrained({json.dumps(f.base_hub_id or 'BASE')})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")", "```", ""]
    if f.gguf_file:
        lines += [f"llama.cpp: `llama-cli -m BASE.gguf --lora {f.gguf_file}`" + (
            "; Ollama: `ollama create NAME -f Modelfile`" if f.modelfile else ""), ""]
    lines += ["nomoat: `nomoat generate --adapter path/to/this/folder \"...\"`", ""]
    rows = [("base fingerprint", f.base_fingerprint or "not recorded")]
    if prov.get("data"):
        data = str(prov["data"]).rsplit("/", 1)[-1]
        rows.append(("training data", f"{data} (sha256 {prov.get('data_sha256', '?')})"))
    hp = prov.get("hyperparameters")
    if isinstance(hp, dict):
        keep = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "seq_len", "rank", "alpha", "dropout",
                "targets", "rslora", "seed")
        rows.append(("hyperparameters", ", ".join(f"{k} {hp[k]}" for k in keep if k in hp)))
    for key, label in (("steps", "steps"), ("tokens_seen", "tokens seen"), ("wall_seconds", "wall seconds"),
                       ("final_train_loss", "final train loss"), ("final_val_loss", "final validation loss"),
                       ("loss", "preference loss"), ("beta", "beta")):
        if prov.get(key) is not None:
            rows.append((label, str(prov[key])))
    lines += ["## Provenance", "", "| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in rows] + [""]
    if f.lineage:
        lines += ["## Lineage", ""] + [f"- {x}" for x in f.lineage] + [""]
    if f.results:
        lines += ["## Evaluation", "", "| metric | value | data | kind |", "|---|---|---|---|"]
        for r in f.results:
            d = r.get("detail") or {}
            lines.append(f"| {_cell(r['metric'])} | {r['value']:.4g} | {_cell(str(d.get('data', '')))} | "
                         f"{_cell(str(r.get('kind', '')))} |")
        lines.append("")
    if f.files:
        lines += ["## Files", "", "| file | sha256 | bytes |", "|---|---|---|"]
        lines += [f"| {_cell(n)} | `{sha}` | {size} |" for n, sha, size in f.files] + [""]
    return "\n".join(lines)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


# ---- Jinja chat template -> Ollama Go template ----
_S, _U, _A, _BOS = "QSYSQ", "QUSERQ", "QASSTQ", "QBOSQ"


@dataclass
class GoTemplate:
    template: str
    system: str | None  # the template's default system prompt, for Ollama's SYSTEM
    exact: bool
    notes: list[str]
    stops: list[str]


def _go_literal(text: str) -> str:
    # Go templates take everything outside actions literally; only "{{" needs escaping.
    return text.replace("{{", '{{ "{{" }}')


def _between(text: str, a: str, b: str) -> str | None:
    i = text.find(a)
    j = text.find(b, i + len(a)) if i >= 0 else -1
    return text[i + len(a):j] if i >= 0 and j >= 0 else None


def _after(text: str, a: str) -> str | None:
    i = text.find(a)
    return text[i + len(a):] if i >= 0 else None


def go_template(render: Callable[..., str], add_bos: bool = False, stop_tokens: Sequence[str] = ()) -> GoTemplate:
    """Derive an Ollama TEMPLATE from the model's Jinja chat template, given as
    `render(messages, add_generation_prompt, bos_token=...)` (`Tokenizer.apply_chat_template`).

    See the module docstring for how, and for what "exact" means.
    """
    def msg(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    S, U1, A1, U2 = msg("system", _S), msg("user", _U + "1"), msg("assistant", _A + "1"), msg("user", _U + "2")
    placeholder = "{{ range .Messages }}{{ .Content }}\n{{ end }}"
    try:
        full = render([S, U1, A1, U2], True)
        a_end = _after(render([S, U1, A1], False), A1["content"])
        u_end = _after(render([U1], False), U1["content"])
        nosys = render([U1, A1, U2], True)
        # The text the template writes as bos_token (a BOS once at the start, whatever the roles).
        marked = render([S, U1, A1, U2], True, bos_token=_BOS)
    except Exception as e:  # a template that refuses these simple chats cannot be read off
        return GoTemplate(placeholder, None, False, [f"the chat template could not be rendered on a plain chat "
                                                     f"({e}); TEMPLATE is a placeholder: write one by hand"], [])
    lead_len = len(full) - len(marked) + len(_BOS) if marked.startswith(_BOS) else 0
    lead, body = full[:lead_len], full[lead_len:]
    pre_s = body[: body.find(S["content"])] if S["content"] in body else None
    s_u = _between(body, S["content"], U1["content"])
    u_a = _between(body, U1["content"], A1["content"])
    a_u = _between(body, A1["content"], U2["content"])
    tail = _after(body, U2["content"])
    p: dict[str, str] | None = None
    if None not in (pre_s, s_u, u_a, a_u, tail, a_end, u_end) and a_u.startswith(a_end) \
            and u_a.startswith(u_end) and tail.startswith(u_end) and s_u.endswith(a_u[len(a_end):]):
        u_pre = a_u[len(a_end):]
        p = {"lead": lead, "s_pre": pre_s, "s_end": s_u[: len(s_u) - len(u_pre)], "u_pre": u_pre, "u_end": u_end,
             "a_pre": u_a[len(u_end):], "a_end": a_end, "gen": tail[len(u_end):]}
    if p is None:
        return GoTemplate(placeholder, None, False,
                          ["the chat template does not wrap each message in fixed text per role (it merges or "
                           "rewrites messages); TEMPLATE is a placeholder: write one by hand"], [])
    pieces: dict[str, str] = p
    # A default system prompt the template adds when the chat has none becomes Ollama's SYSTEM.
    system = None
    first = nosys[: nosys.find(U1["content"])] if U1["content"] in nosys else ""
    opening, closing = lead + pieces["s_pre"], pieces["s_end"] + pieces["u_pre"]
    if first != lead + pieces["u_pre"] and first.startswith(opening) and first.endswith(closing) \
            and len(first) >= len(opening) + len(closing):
        system = first[len(opening): len(first) - len(closing)]

    def mine(messages: list[dict[str, str]], gen: bool) -> str:
        if system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [msg("system", system)] + messages  # what Ollama does with SYSTEM
        out = pieces["lead"]
        for m in messages:
            r = {"system": "s", "user": "u", "assistant": "a"}[m["role"]]
            out += pieces[f"{r}_pre"] + m["content"] + pieces[f"{r}_end"]
        return out + (pieces["gen"] if gen else "")

    probes = [([S, U1, A1, U2], True), ([U1], True), ([U1, A1, U2], True), ([S, U1], True), ([S, U1, A1], False),
              ([S, U1, A1, U2, msg("assistant", _A + "2"), msg("user", _U + "3")], True),
              ([msg("user", "Hi there!\n  Two lines."), msg("assistant", " spaced ")], False)]
    notes: list[str] = []
    exact = True
    for messages, gen in probes:
        try:
            want = render(messages, gen)
        except Exception:  # a template that refuses e.g. a bare system turn: so will its users' chats
            continue
        got = mine(messages, gen)
        if got != want:
            exact = False
            at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            notes.append(f"TEMPLATE is approximate: for a chat of roles {', '.join(m['role'] for m in messages)} "
                         f"the model's template renders {want[max(0, at - 20):at + 40]!r} where this one renders "
                         f"{got[max(0, at - 20):at + 40]!r}")
            break
    if lead and add_bos:
        notes.append("the template's BOS token is left to the runtime, which adds it (tokenizer.ggml.add_bos_token)")
        lead = ""
    lit = {k: _go_literal(v) for k, v in pieces.items()}
    branches = "".join(
        ("{{ if" if i == 0 else "{{ else if") + f' eq .Role "{role}" ' + "}}"
        + lit[f"{r}_pre"] + "{{ .Content }}" + lit[f"{r}_end"]
        for i, (role, r) in enumerate((("system", "s"), ("user", "u"), ("assistant", "a"))))
    tpl = _go_literal(lead) + "{{ range .Messages }}" + branches + "{{ end }}{{ end }}" + lit["gen"]
    stops = [t for t in stop_tokens if t and t in pieces["a_end"]]
    return GoTemplate(tpl, system, exact, notes, stops)


def modelfile(base_gguf: str, adapter_gguf: str, tpl: GoTemplate | None, eos: str | None = None,
              name: str = "") -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the GGUF adapter (relative to the Modelfile),
    TEMPLATE and SYSTEM derived from the chat template, and the stop tokens."""
    lines = [f"# {name}: an Ollama Modelfile written by `nomoat adapters export`.",
             "# FROM is the base model's GGUF on the machine that exported it: point it at your copy.",
             f"FROM {base_gguf}", f"ADAPTER {adapter_gguf}"]
    if tpl is not None:
        for note in tpl.notes:
            lines.append(f"# {note}")
        if '"""' in tpl.template:
            lines.append("# the template contains triple quotes, which a Modelfile cannot hold: TEMPLATE left out")
        else:
            lines.append(f'TEMPLATE """{tpl.template}"""')
        if tpl.system is not None and '"""' not in tpl.system:
            lines.append(f'SYSTEM """{tpl.system}"""')
        for s in tpl.stops or ([eos] if eos else []):
            lines.append(f"PARAMETER stop {json.dumps(s)}")
    return "\n".join(lines) + "\n"

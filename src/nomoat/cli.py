"""The `nomoat` command line: argument parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

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

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF file or Hugging Face model "
                                                 "directory (default: the embedded SmolLM2-135M-Instruct).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: torch's).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16.")]


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


def _load(model: str | None, threads: int | None, dtype: str = "float32", quiet: bool = False):
    from nomoat.loading import load

    if quiet:
        return load(model, dtype=dtype, threads=threads)
    with err.status("loading model..."):
        return load(model, dtype=dtype, threads=threads)


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
    ]
    for k, v in rows:
        t.add_row(f"[bold]{k}[/bold]", v)
    out.print(t)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")] = 40,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 0.95,
    repeat_penalty: Annotated[float, typer.Option(help="Penalty on tokens already seen (1: none).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for reproducible sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when this string appears (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as is, without the chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System prompt (chat template only).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and memory figures to stderr.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
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
    lm = _load(model, threads, dtype, quiet=not sys.stderr.isatty())
    ids = prompt_ids(lm, prompt, raw=raw, system=system)
    st = GenerationStats()
    for piece in stream(lm.model, lm.tokenizer, ids, cfg, st):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        _print_stats(lm, st)


@app.command()
def chat(
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n")] = 512,
    temperature: float = 0.7,
    top_k: int = 40,
    top_p: float = 0.95,
    repeat_penalty: float = 1.1,
    seed: Optional[int] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed figures after each reply.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
) -> None:
    """Multi-turn chat in the terminal with the model's chat template. /reset clears history, /exit quits."""
    from nomoat.api import Chat
    from nomoat.generate import GenerationStats

    cfg = _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, None)
    cfg.check()
    lm = _load(model, threads, dtype)
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
    to: Annotated[str, typer.Option("--to", help="Output format: hf.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")],
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Tensor dtype written: float32, bfloat16, float16.")]
    = "float32",
) -> None:
    """Convert a model: GGUF -> Hugging Face directory (config.json + safetensors + tokenizer)."""
    from nomoat.api import convert_to_hf

    if to != "hf":
        raise NomoatError(f"--to {to!r} is not supported (supported: hf)")
    lm = _load(model, None)
    with err.status(f"writing {out_path}..."):
        convert_to_hf(lm, out_path, dtype=dtype)
    err.print(f"wrote {out_path}")


def main() -> None:
    try:
        app()
    except NomoatError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)

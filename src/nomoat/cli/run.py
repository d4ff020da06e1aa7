"""Running a model: info, generate, chat, convert."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from nomoat import defaults
from nomoat.cli.common import (
    AdapterOpt,
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    QuantOpt,
    ThreadsOpt,
    err,
    print_rows,
    print_stats,
    status,
)
from nomoat.errors import NomoatError

MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option(help="Sample among the k most likely tokens (0: all).")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling mass.")]
RepeatOpt = Annotated[float, typer.Option(help="Penalty on tokens already seen (1: none).")]
SeedOpt = Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")]


def _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop):
    from nomoat.runtime.generate import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repeat_penalty, seed=seed, stop=tuple(stop or ()))
    cfg.check()
    # Values that pass the check above but overflow the logits or the seed when sampling.
    lo, hi = defaults.PENALTY_RANGE
    if not (temperature == 0 or defaults.MIN_TEMPERATURE <= temperature < math.inf):
        raise NomoatError(f"--temperature {temperature:g}: temperature must be 0 (greedy) or a finite number of "
                          f"at least {defaults.MIN_TEMPERATURE:g}")
    if not lo <= repeat_penalty <= hi:
        raise NomoatError(f"--repeat-penalty {repeat_penalty:g}: repetition_penalty must be in [{lo:g}, {hi:g}]")
    if seed is not None and not defaults.SEED_RANGE[0] <= seed <= defaults.SEED_RANGE[1]:
        raise NomoatError(f"--seed {seed}: the seed must fit in 64 bits")
    if top_k > defaults.MAX_TOP_K:
        raise NomoatError(f"--top-k {top_k}: top_k must be at most {defaults.MAX_TOP_K}")
    return cfg


def info(model: ModelOpt = None, quant: QuantOpt = defaults.QUANT) -> None:
    """Architecture, parameter count, tensor types, file size, and how it runs on this CPU (and why)."""
    from nomoat.runtime.info import describe_model

    print_rows(describe_model(model, quant))


def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; read from stdin when omitted.")] = None,
    model: ModelOpt = None,
    max_new_tokens: MaxNewOpt = defaults.MAX_NEW_TOKENS,
    temperature: TemperatureOpt = defaults.TEMPERATURE,
    top_k: TopKOpt = defaults.TOP_K,
    top_p: TopPOpt = defaults.TOP_P,
    repeat_penalty: RepeatOpt = defaults.REPETITION_PENALTY,
    seed: SeedOpt = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop when this string appears (repeatable).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System prompt (chat template only).")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed, memory, threads and the chosen path to "
                                        "stderr.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    quant: QuantOpt = defaults.QUANT,
) -> None:
    """Complete a prompt; only the completion goes to stdout, streamed as it is generated."""
    from nomoat.api import load_with_adapters, prompt_ids
    from nomoat.runtime.generate import GenerationStats, stream

    if prompt is None:
        if sys.stdin.isatty():
            raise NomoatError("no prompt: pass one as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise NomoatError("the prompt is empty")
    cfg = _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, stop)
    with status("loading model..."):
        lm = load_with_adapters(model, adapter or (), force=force, dtype=dtype, threads=threads, quant=quant)
    ids = prompt_ids(lm, prompt, raw=raw, system=system)
    st = GenerationStats()
    for piece in stream(lm.model, lm.tokenizer, ids, cfg, st):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats:
        print_stats(lm, st)


def chat(
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_new_tokens: MaxNewOpt = defaults.MAX_NEW_TOKENS,
    temperature: TemperatureOpt = defaults.TEMPERATURE,
    top_k: TopKOpt = defaults.TOP_K,
    top_p: TopPOpt = defaults.TOP_P,
    repeat_penalty: RepeatOpt = defaults.REPETITION_PENALTY,
    seed: SeedOpt = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed figures after each reply.")] = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    adapter: AdapterOpt = None,
    force: ForceOpt = False,
    quant: QuantOpt = defaults.QUANT,
) -> None:
    """Multi-turn chat in the terminal with the model's chat template. /reset clears history, /exit quits."""
    from nomoat.api import Chat, load_with_adapters
    from nomoat.runtime.generate import GenerationStats

    cfg = _gen_config(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed, None)
    with status("loading model..."):
        lm = load_with_adapters(model, adapter or (), force=force, dtype=dtype, threads=threads, quant=quant)
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
            print_stats(lm, st)


def convert(
    to: Annotated[str, typer.Option("--to", help="Output format: hf or gguf.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output directory (hf) or .gguf file.")],
    model: ModelOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Tensor dtype written to hf: float32, bfloat16, "
                                       "float16.")] = "float32",
    gguf_type: Annotated[str, typer.Option("--type", help="GGUF tensor type: f32, f16, q8_0, q4_0, q4_1.")]
    = "f16",
) -> None:
    """Convert a model: to a Hugging Face directory (config.json + safetensors + tokenizer) or to GGUF."""
    from nomoat.api import convert_model

    for line in convert_model(model, to, out_path, dtype=dtype, gguf_type=gguf_type):
        err.print(line, soft_wrap=True)


def register(app: typer.Typer) -> None:
    for fn in (info, generate, chat, convert):
        app.command()(fn)

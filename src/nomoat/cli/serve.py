"""`nomoat serve`: the OpenAI-compatible server and web chat."""

from __future__ import annotations

from typing import Annotated

import typer

from nomoat import defaults
from nomoat.cli.common import (
    DtypeOpt,
    ForceOpt,
    ModelOpt,
    QuantOpt,
    ThreadsOpt,
    err,
    kernels_line,
    named_adapter_refs,
    status,
)


def serve(
    model: ModelOpt = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", callback=named_adapter_refs, help="NAME=PATH[:WEIGHT]: an adapter (PEFT directory or "
        "GGUF adapter; or a catalog name, served under that name) that requests select with model=NAME, or a stack "
        "with NAME+OTHER; repeat for more.")] = None,
    catalog: Annotated[bool, typer.Option("--catalog", help="Also serve every catalog adapter made for this base, "
                                          "under its catalog name, following adds and removals while running; "
                                          "POST /v1/adapters {name | path} and DELETE /v1/adapters/NAME load and "
                                          "unload without a restart.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps the server to this "
                                      "machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="NOMOAT_API_KEY", help="Require "
                                                "'Authorization: Bearer KEY' on every /v1 route (without it, "
                                                "/health answers only that the server is up).")] = None,
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
    allow_origin: Annotated[list[str] | None, typer.Option(
        "--allow-origin", help="A web origin (https://app.example.com, http://NAME:PORT) whose pages may call the "
        "server, and whose host name requests may use; repeat for more, or * for any. The server's own pages "
        "and localhost pages are always allowed; other Host names and Origins are refused (DNS rebinding, "
        "cross-site requests).")] = None,
    arena: Annotated[str | None, typer.Option("--arena", help="SQLite file for a blind A/B arena at /arena "
                                              "(votes kept there; leaderboard at /leaderboard). Needs at least "
                                              "one --adapter.")] = None,
    arena_token: Annotated[str | None, typer.Option("--arena-token", envvar="NOMOAT_ARENA_TOKEN", help="A token "
                                                    "voters may use for the arena instead of --api-key.")] = None,
    arena_models: Annotated[str | None, typer.Option("--arena-models", help="Comma-separated model ids that "
                                                     "fight in the arena (default: the base, every adapter and "
                                                     "stack).")] = None,
    arena_questions: Annotated[str | None, typer.Option("--arena-questions", help="Question set the arena page "
                                                        "can draw prompts from: 'builtin' or an MT-bench / "
                                                        "prompts file.")] = None,
    arena_max_tokens: Annotated[int, typer.Option("--arena-max-tokens", help="Longest answer in a battle, in "
                                                  "tokens.")] = 512,
    arena_votes_per_minute: Annotated[float, typer.Option("--arena-votes-per-minute", help="Votes one voter may "
                                                          "cast per minute (as a burst, then refilled).")] = 60.0,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    quant: QuantOpt = defaults.QUANT,
    force: ForceOpt = False,
) -> None:
    """Serve the model and its adapters over the OpenAI HTTP API, with a web chat at / (and with --arena, a blind
    A/B arena at /arena)."""
    from nomoat.adapters import AdapterSpec
    from nomoat.api import load_with_adapters
    from nomoat.errors import NomoatError
    from nomoat.serve.app import ServerSettings, base_name_for, check_listen, create_app, make_server

    settings = ServerSettings(api_key=api_key or None, max_tokens_limit=max_tokens_limit,
                              max_request_bytes=max_request_bytes, max_context=max_context, max_active=max_active,
                              host=host, allow_origins=tuple(allow_origin or ()))
    settings.check()
    specs = [AdapterSpec.parse(a, named=True) for a in adapter or ()]
    names = [sp.name for sp in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise NomoatError(f"--adapter: the name {dup!r} is given twice")
    arena_settings = None
    if arena:
        from nomoat.eval.arena import ArenaSettings
        from nomoat.eval.questions import load_questions

        if arena_max_tokens < 1 or arena_votes_per_minute <= 0:
            raise NomoatError("--arena-max-tokens and --arena-votes-per-minute must be positive")
        arena_settings = ArenaSettings(
            db=arena, token=arena_token or None, max_tokens=min(arena_max_tokens, max_tokens_limit),
            contestants=[m.strip() for m in (arena_models or "").split(",") if m.strip()],
            questions=load_questions(arena_questions) if arena_questions else (),
            votes_per_minute=arena_votes_per_minute)
    check_listen(host, port)
    if threads is None:
        from nomoat.runtime.cpu import default_threads

        # The HTTP loop (streaming every token to every client) needs a core of its own: measured on 2 cores,
        # one engine thread streams a client 102 tok/s where two, fighting the loop for cores, give 62.
        threads = max(1, default_threads() - 1)
    with status("loading model..."):
        lm = load_with_adapters(model, specs, force=force, activate=False, dtype=dtype, threads=threads,
                                quant=quant)
    app_ = create_app(lm, name or base_name_for(lm), {sp.name: sp.weight for sp in specs}, settings, arena_settings,
                      {sp.name: str(sp.path) for sp in specs})
    live = None
    if catalog:
        from nomoat.serve.catalog_routes import mount_catalog

        live = mount_catalog(app_)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print(f"[yellow]warning:[/yellow] listening on {host} without --api-key: anyone who can reach this "
                  "port can use the model", soft_wrap=True)
    models = ", ".join(app_.state.server.registry.ids())
    shown = f"[{host}]" if ":" in host else host
    err.print(f"engine: {lm.cpu.threads if lm.cpu else threads} threads, kernels: {kernels_line(lm)}")
    err.print(f"serving [bold]{models}[/bold] at http://{shown}:{port}/ (web chat at /, API at /v1; Ctrl-C stops)",
              soft_wrap=True)
    if arena_settings:
        a = app_.state.arena
        err.print(f"arena at http://{shown}:{port}/arena with {len(a.names)} contestants, votes in {arena} "
                  f"({a.store.counts()[1]} so far); leaderboard at /leaderboard", soft_wrap=True)
    try:
        make_server(app_, host, port).run()
    finally:
        if live is not None:
            live.stop()
    err.print("stopped")


def register(app: typer.Typer) -> None:
    app.command()(serve)

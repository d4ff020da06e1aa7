"""`nomoat answer` and `nomoat judge pairwise|single|report`: answers to a question set, judged by an LLM."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from nomoat import defaults
from nomoat.cli.common import AdapterOpt, DtypeOpt, ForceOpt, ModelOpt, QuantOpt, ThreadsOpt, err, model_ref, out

judge_app = typer.Typer(help="Judge answers with an LLM: pairwise (both orders), single grades, and reports.",
                        no_args_is_help=True)


@contextlib.contextmanager
def _progress(label: str) -> Iterator[Callable[..., None]]:
    """A progress callback `(done, total[, cached])`: a bar on a terminal, plain lines (~every 10%) otherwise."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    live = err.is_terminal
    bar = Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=err, transient=False)
    state: dict[str, Any] = {"task": None, "t0": time.perf_counter(), "last": -1}

    def update(done: int, total: int, cached: int = 0) -> None:
        info = f"({cached} from the cache)" if cached else ""
        if not live:
            tenth = done * 10 // max(total, 1)
            if tenth != state["last"] or done == total:
                state["last"] = tenth
                err.print(f"{label} {done}/{total} {info} | {time.perf_counter() - state['t0']:.0f} s",
                          soft_wrap=True, highlight=False)
            return
        if state["task"] is None:
            bar.start()
            state["task"] = bar.add_task(label, total=total, info=info)
        bar.update(state["task"], completed=done, total=total, info=info)

    try:
        yield update
    finally:
        if state["task"] is not None:
            bar.stop()


def answer(
    questions: Annotated[str, typer.Option("--questions", help="builtin (24 two-turn questions, 3 per "
                                           "category), an MT-bench question.jsonl, plain {\"prompt\"} records or "
                                           "Alpaca records (JSONL or a JSON array).")] = "builtin",
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Answers file (JSONL, MT-bench model_answer "
                                           "layout).")] = Path("answers.jsonl"),
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    model_id: Annotated[str | None, typer.Option("--model-id", help="Name of this answer set in verdicts "
                                                 "(default: the adapters' names, else the model's).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for every conversation.")] = None,
    temperature: Annotated[float | None, typer.Option(help="One temperature for all questions (default: per "
                                                      "category: 0 for math, reasoning, coding, extraction; 0.7 "
                                                      "for writing, roleplay; 0.1 for STEM, humanities).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens per answer.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Questions answered together.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the sampled categories.")] = 0,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = None,
    quant: QuantOpt = defaults.QUANT,
) -> None:
    """Answer a question set with a model (and adapters); multi-turn questions keep the model's own answers
    in the chat history."""
    from nomoat.api import answer_questions
    from nomoat.eval.answers import AnswerSettings

    settings = AnswerSettings(max_new_tokens, temperature, system, batch_size, seed)
    with _progress("answering") as progress:
        run = answer_questions(questions, out_path, model, adapter or (), model_id=model_id, settings=settings,
                               force=force, progress=progress, threads=threads, dtype=dtype, quant=quant)
    err.print(f"wrote {escape(str(run.path))}: {run.questions} questions, {run.turns} turns answered by [bold]"
              f"{escape(run.model_id)}[/bold] in {run.seconds:.0f} s", soft_wrap=True)


AnswersArg = Annotated[list[Path], typer.Argument(help="Answer files (MT-bench model_answer layout, as `nomoat "
                                                  "answer` writes them).")]
JudgeOpt = Annotated[str, typer.Option("--judge", help="local (a nomoat model in this process) or the URL of an "
                                       "OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (`nomoat serve`).")]
JudgeModelOpt = Annotated[str | None, typer.Option("--judge-model", help="Model id at the --judge URL.")]
JudgePathOpt = Annotated[str | None, typer.Option("--judge-path", callback=model_ref, help="With --judge local: "
                                                  "the judge's model file, directory or catalog name (default: the "
                                                  "embedded model).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Verdicts file (JSONL); a PNG goes beside it.")]
CacheOpt = Annotated[Path | None, typer.Option("--cache", help="SQLite verdict cache (default: beside --out, "
                                               ".cache.sqlite).")]
QuestionsOpt = Annotated[str | None, typer.Option("--questions", help="Question file, for answer files "
                                                  "that do not carry their questions (MT-bench's own).")]
PromptOpt = Annotated[str | None, typer.Option("--judge-prompt", help="Jinja2 judge template file, or a built-in "
                                               "one: builtin:pairwise, builtin:pairwise-verdict (verdict only, "
                                               "for small judges), builtin:single, builtin:single-verdict.")]
TempOpt = Annotated[float, typer.Option("--judge-temperature", help="The judge's sampling temperature.")]
MaxTokOpt = Annotated[int, typer.Option("--judge-max-tokens", help="Longest judge reply.")]
RepeatOpt = Annotated[int, typer.Option("--repeat", help="Judge everything N times (at --judge-temperature) to "
                                        "measure the judge's run-to-run spread.")]
ParallelOpt = Annotated[int, typer.Option("--parallel", "-p", help="Judge requests in flight at once.")]
RecordOpt = Annotated[bool, typer.Option("--record", help="Attach the results to the catalog: each answer file's "
                                        "adapters (or model) get their win rate or mean grade.")]


def _judge(mode: str, answers: list[Path], judge: str, judge_model: str | None, judge_path: str | None,
           out_path: Path | None, cache: Path | None, questions: str | None, prompt: str | None,
           temperature: float, max_tokens: int, repeat: int, parallel: int, soft: bool = False,
           all_pairs: bool = False, record: bool = False) -> None:
    from nomoat.api import judge_answers
    from nomoat.eval.judge_client import JudgeSettings

    if record:
        from nomoat.cli.catalog import judged_targets

        targets = judged_targets(answers)  # before judging: what each answer file's model is in the catalog
    settings = JudgeSettings(temperature, max_tokens, soft, repeat, parallel)
    with _progress("judging") as progress:
        run = judge_answers(mode, answers, judge=judge, judge_model=judge_model, judge_path=judge_path,
                            out=out_path, cache=cache, questions=questions, template=prompt, settings=settings,
                            all_pairs=all_pairs, progress=progress)
    for line in run.skipped:
        err.print(f"[yellow]skipped:[/yellow] {escape(line)}", soft_wrap=True)
    st = run.stats
    err.print(f"wrote {escape(str(run.out))}: {st.total} judgments, {st.cached} from the cache "
              f"({escape(str(run.cache))}), {st.requested} requested"
              + (f", {st.failed} refused by the judge" if st.failed else ""), soft_wrap=True, highlight=False)
    _print_report(run.report)
    if record:
        from nomoat.cli.catalog import record_judgments

        record_judgments(run.report, targets, run.out)


@judge_app.command("pairwise")
def pairwise(
    answers: AnswersArg,
    judge: JudgeOpt = "local",
    judge_model: JudgeModelOpt = None,
    judge_path: JudgePathOpt = None,
    out_path: OutOpt = None,
    cache: CacheOpt = None,
    questions: QuestionsOpt = None,
    prompt: PromptOpt = None,
    all_pairs: Annotated[bool, typer.Option("--all-pairs", help="Compare every pair of answer files, not just the "
                                            "first against each other.")] = False,
    soft: Annotated[bool, typer.Option("--soft", help="Also read the verdict's probability from the judge's "
                                       "logprobs (an endpoint that returns them, or --judge local).")] = False,
    temperature: TempOpt = 0.0,
    max_tokens: MaxTokOpt = 256,
    repeat: RepeatOpt = 1,
    parallel: ParallelOpt = 4,
    record: RecordOpt = False,
) -> None:
    """Compare the first answer file (the baseline) with each other one, every comparison judged in both
    orders: a win only when both orders agree, a tie otherwise."""
    _judge("pairwise", answers, judge, judge_model, judge_path, out_path, cache, questions, prompt, temperature,
           max_tokens, repeat, parallel, soft, all_pairs, record)


@judge_app.command("single")
def single(
    answers: AnswersArg,
    judge: JudgeOpt = "local",
    judge_model: JudgeModelOpt = None,
    judge_path: JudgePathOpt = None,
    out_path: OutOpt = None,
    cache: CacheOpt = None,
    questions: QuestionsOpt = None,
    prompt: PromptOpt = None,
    temperature: TempOpt = 0.0,
    max_tokens: MaxTokOpt = 256,
    repeat: RepeatOpt = 1,
    parallel: ParallelOpt = 4,
    record: RecordOpt = False,
) -> None:
    """Grade every answer from 1 to 10; the report gives each model's mean score with its 95% interval."""
    _judge("single", answers, judge, judge_model, judge_path, out_path, cache, questions, prompt, temperature,
           max_tokens, repeat, parallel, record=record)


@judge_app.command("report")
def report(
    verdicts: Annotated[Path, typer.Argument(help="A verdicts file written by `nomoat judge`.")],
    png: Annotated[Path | None, typer.Option("--png", help="Plot file (default: beside the verdicts).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Win / tie / loss, adjusted win rate with a bootstrap 95% interval over questions, per category; the
    judge's position consistency, first-position preference and length-controlled win rate; a PNG."""
    from nomoat.api import judge_report

    _print_report(judge_report(verdicts, png, resamples, seed))


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.0f}%"


def _rate(x: float, ci: tuple[float, float]) -> tuple[str, str]:
    return ("n/a", "") if math.isnan(x) else (f"{x:.3f}", f"[{ci[0]:.3f}, {ci[1]:.3f}]")


def _print_report(rep: Any) -> None:
    for s in rep.pairwise:
        t = Table(title=f"{escape(s.model_2)} vs {escape(s.model_1)} (judge {escape(s.judge)}; {s.questions} "
                        f"questions, {s.overall.n} comparisons)", title_justify="left")
        for c in ("category", "n", "win", "tie", "loss", "adj. win rate", "95% CI"):
            t.add_column(c, justify="left" if c == "category" else "right")
        for name, tl in [("overall", s.overall), *s.categories.items()]:
            t.add_row(escape(name), str(tl.n), str(tl.wins), str(tl.ties), str(tl.losses), *_rate(tl.adjusted, tl.ci))
        out.print(t)
        k = s.tie_kinds
        lines = [f"ties: {k['both_tie']} both orders tie, {k['one_tie']} one order tie, {k['inconsistent']} orders "
                 f"disagree, {k['unparseable']} unparseable",
                 f"position consistency {_pct(s.consistency)} (both orders agree) | first-position preference "
                 f"{_pct(s.first_position)} of decisive verdicts (50% is unbiased)",
                 f"per-order win rate {s.per_order:.3f} | length-controlled {s.length_controlled:.3f}"]
        if s.soft:
            lines.append(f"soft win rate (verdict probabilities) {s.soft[0]:.3f} [{s.soft[1]:.3f}, {s.soft[2]:.3f}]")
        if s.repeats > 1:
            agree = "n/a" if s.repeat_agreement is None else _pct(s.repeat_agreement)
            lines.append(f"repeats: {s.repeats}; adjusted win rate per repeat "
                         f"{', '.join(f'{r:.3f}' for r in s.repeat_rates)}; same result in every repeat {agree}")
        for line in lines:
            out.print(line, soft_wrap=True, highlight=False)
    if rep.single:
        t = Table(title="single-answer grades (1-10)", title_justify="left")
        for c in ("model", "category", "graded", "mean", "95% CI"):
            t.add_column(c, justify="left" if c in ("model", "category") else "right")
        for s in rep.single:
            t.add_row(escape(s.model), "overall", f"{s.scored}/{s.n}", *_rate(s.mean, s.ci))
            for c, (n, m, ci) in s.categories.items():
                t.add_row("", escape(c), str(n), *_rate(m, ci))
        out.print(t)
        for s in rep.single:
            if s.repeats > 1:
                out.print(f"{escape(s.model)}: repeats {s.repeats}; mean per repeat "
                          f"{', '.join(f'{m:.2f}' for m in s.repeat_means)}", soft_wrap=True, highlight=False)
    for w in rep.warnings:
        err.print(f"[bold yellow]warning:[/bold yellow] {escape(w)}", soft_wrap=True)
    if rep.png:
        err.print(f"plot: {escape(str(rep.png))}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("answer")(answer)
    app.add_typer(judge_app, name="judge")

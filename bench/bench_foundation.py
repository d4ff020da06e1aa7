"""nomoat against transformers on the default model: load time, peak RSS, prompt and decode tokens/s.

Run: python bench/bench_foundation.py [--threads 2] [--prompt-tokens 512] [--new-tokens 128] [--model PATH]

Each side runs in its own fresh process (so peak RSS is its own) on the same GGUF file, the same
prompt token ids and the same thread count, in float32. Prompt speed is the prefill of one
`--prompt-tokens` prompt; decode speed is greedy generation of `--new-tokens` tokens after it (the
first token comes out of the prefill, so it counts the steps after it), end-of-sequence ignored.
The best of `--repeats` runs is kept. Not a test: on a shared machine numbers vary run to run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The history of the printing press begins long before Gutenberg. In China, woodblock printing was in "
        "use for centuries, and movable type made of clay and later of metal appeared there and in Korea. "
        "What changed in Europe was a combination of inventions: an alloy that melted easily and cast well, "
        "an oil-based ink that clung to metal, and a press adapted from those used for wine and olives. ")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_nomoat(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import torch

    from nomoat.runtime.generate import GenerationConfig, GenerationStats, generate_batch, stream
    from nomoat.runtime.loading import load

    torch.set_num_threads(args.threads)
    t1 = time.perf_counter()
    lm = load(args.model, threads=args.threads)
    load_s = time.perf_counter() - t1
    rss_load = peak_rss_mib()
    tok = lm.tokenizer
    ids = (tok.encode(TEXT) * (args.prompt_tokens // 8))[:args.prompt_tokens]
    tok.stop_ids = frozenset()  # always generate the full count, as the reference does with eos off
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    list(stream(lm.model, tok, ids[:16], GenerationConfig(max_new_tokens=4, temperature=0.0)))  # warm-up
    best_p = best_d = 0.0
    for _ in range(args.repeats):
        st = GenerationStats()
        text = "".join(stream(lm.model, tok, ids, cfg, st))
        assert st.generated_tokens == args.new_tokens
        best_p, best_d = max(best_p, st.prompt_tps), max(best_d, st.decode_tps)
    [c] = generate_batch(lm.model, tok, [ids], cfg)  # the batch path agrees with the streaming one
    assert c.text == text
    return {"import_s": t1 - t0, "load_s": load_s, "rss_load": rss_load, "prompt_tps": best_p,
            "decode_tps": best_d, "rss_peak": peak_rss_mib(), "n_prompt": len(ids), "tokens": c.token_ids}


def run_transformers(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from nomoat.runtime.loading import default_model_path

    path = default_model_path() if args.model is None else Path(args.model)
    t1 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    load_s = time.perf_counter() - t1
    rss_load = peak_rss_mib()
    ids = (tok(TEXT, add_special_tokens=False).input_ids * (args.prompt_tokens // 8))[:args.prompt_tokens]
    model.generation_config.eos_token_id = None

    class Clock(BaseStreamer):
        """Timestamps: the prompt is put first, then each new token as it is chosen."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def gen(prompt: list[int], n: int, streamer=None) -> list[int]:
        x = torch.tensor([prompt])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id, streamer=streamer)
        return out[0, len(prompt):].tolist()

    with torch.inference_mode():
        gen(ids[:16], 4)  # warm-up
        best_p = best_d = 0.0
        for _ in range(args.repeats):
            clock = Clock()
            start = time.perf_counter()
            out_ids = gen(ids, args.new_tokens, clock)
            first, last = clock.times[1], clock.times[-1]
            best_p = max(best_p, len(ids) / (first - start))
            best_d = max(best_d, (args.new_tokens - 1) / (last - first))
    return {"import_s": t1 - t0, "load_s": load_s, "rss_load": rss_load, "prompt_tps": best_p,
            "decode_tps": best_d, "rss_peak": peak_rss_mib(), "n_prompt": len(ids), "tokens": out_ids}


ROWS = [  # key, label, format, higher is better
    ("import_s", "import (s)", "{:.2f}", False),
    ("load_s", "load model + tokenizer (s)", "{:.2f}", False),
    ("rss_load", "peak RSS after load (MiB)", "{:.0f}", False),
    ("rss_peak", "peak RSS at end (MiB)", "{:.0f}", False),
    ("prompt_tps", "prompt tokens/s", "{:.1f}", True),
    ("decode_tps", "decode tokens/s", "{:.1f}", True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--side", choices=["nomoat", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        res = run_nomoat(args) if args.side == "nomoat" else run_transformers(args)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for side in ("nomoat", "transformers"):
        cmd = [sys.executable, __file__, "--side", side, "--threads", str(args.threads), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        if args.model:
            cmd += ["--model", args.model]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[len("RESULT "):])
    a, b = results["nomoat"], results["transformers"]
    print(f"default model, float32, {args.threads} threads, prompt {a['n_prompt']} tokens, "
          f"{args.new_tokens} greedy tokens, best of {args.repeats}")
    print(f"{'':28} {'nomoat':>10} {'transformers':>13} {'nomoat advantage':>17}")
    for key, label, fmt, higher in ROWS:
        x, y = a[key], b[key]
        adv = (x / y if higher else y / x) if x and y else float("nan")
        print(f"{label:28} {fmt.format(x):>10} {fmt.format(y):>13} {adv:>16.2f}x")
    diff = [i for i, (u, v) in enumerate(zip(a["tokens"], b["tokens"])) if u != v]
    same = not diff and len(a["tokens"]) == len(b["tokens"])
    print("greedy tokens identical: " + ("yes" if same else f"no (first difference at token {diff[:1]})"))
    print("(advantage > 1 means nomoat is better: faster, or less memory)")


if __name__ == "__main__":
    main()

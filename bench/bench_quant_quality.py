"""What quantization costs: perplexity of the default model on held-out text, float vs q8 vs q4.

Run: python bench/bench_quant_quality.py [--data bench/data/heldout.txt]

"none" runs float32 weights dequantized from the file; "q4" keeps the file's Q4_1 codes on int4 kernels
(bf16 activations); "q8" requantizes them to int8 per channel. Also: top-1 agreement with the float
model over the text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    from nomoat.eval import perplexity
    from nomoat.runtime.loading import load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).parent / "data" / "heldout.txt"))
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    rows, ref_top1 = [], None
    for quant in ("none", "q8", "q4"):
        lm = load(a.model, quant=quant)
        r = perplexity(lm, a.data)
        ids = torch.tensor([lm.tokenizer.encode(Path(a.data).read_text())[:1024]])
        with torch.inference_mode():
            top1 = lm.model(ids)[0].argmax(-1)
        if ref_top1 is None:
            ref_top1 = top1
        rows.append((quant, r.perplexity, r.tokens, float((top1 == ref_top1).float().mean())))
    print(f"{'weights':<8} {'perplexity':>10} {'vs float':>9} {'top-1 = float':>14} tokens")
    for quant, ppl, n, agree in rows:
        print(f"{quant:<8} {ppl:>10.3f} {ppl / rows[0][1]:>8.4f}x {100 * agree:>13.1f}% {n}")


if __name__ == "__main__":
    main()

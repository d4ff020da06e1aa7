"""Training: one loop (loop.py) that objectives share; SFT (sft.py) now, preference training next.

May import data, model, lora, adapters, formats, eval (for validation loss) and the runtime; must not
import serve or cli.
"""

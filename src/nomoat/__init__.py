"""nomoat: run, fine-tune (LoRA), quantize, share and evaluate open LLaMA-family models on one CPU machine."""

from nomoat.runtime.cpu import configure_threading_env

__version__ = "0.1.0"

configure_threading_env()  # before torch loads: idle OpenMP workers spin only briefly (see runtime/cpu.py)

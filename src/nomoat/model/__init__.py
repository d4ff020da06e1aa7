"""Pure PyTorch model code and per-architecture facts: knows nothing of files.

Must not import nomoat.formats, train, serve, eval, adapters or cli.
"""

from nomoat.model.llama import KVCache, LlamaForCausalLM, SlotCache
from nomoat.model.losses import IGNORE_INDEX, causal_lm_loss

__all__ = ["IGNORE_INDEX", "KVCache", "LlamaForCausalLM", "SlotCache", "causal_lm_loss"]

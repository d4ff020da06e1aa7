"""Pure PyTorch model code: knows nothing of files."""

from nomoat.model.llama import KVCache, LlamaForCausalLM, causal_lm_loss

__all__ = ["KVCache", "LlamaForCausalLM", "causal_lm_loss"]

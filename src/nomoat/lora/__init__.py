"""LoRA as a module replacement: the layer, injection, merge/unmerge, tensor checks, combine arithmetic.

Holds no file I/O (adapter files are `nomoat.adapters` and `nomoat.formats`); must not import formats,
train, serve, eval or cli.
"""

from nomoat.lora.inject import (
    active_weights,
    adapter_names,
    adapter_state_dict,
    add_adapter,
    check_loaded,
    load_adapter_weights,
    lora_modules,
    lora_parameters,
    mark_trainable,
    merge_adapters,
    remove_adapter,
    set_active,
    set_row_adapters,
    strip_lora,
    unmerge_adapters,
)
from nomoat.lora.layer import ALL_LINEAR, TARGET_ALIASES, LoraConfig, LoRALinear, resolve_targets

__all__ = ["ALL_LINEAR", "TARGET_ALIASES", "LoRALinear", "LoraConfig", "active_weights", "adapter_names",
           "adapter_state_dict", "add_adapter", "check_loaded", "load_adapter_weights", "lora_modules",
           "lora_parameters", "mark_trainable", "merge_adapters", "remove_adapter", "resolve_targets", "set_active",
           "set_row_adapters", "strip_lora", "unmerge_adapters"]

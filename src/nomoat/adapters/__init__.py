"""Adapters as artifacts: fingerprints, provenance, file dispatch (artifact) and merging into the base (merge).

May import formats, lora and model; must not import train, serve, eval or cli.
"""

from nomoat.adapters.artifact import (
    AdapterSpec,
    adapter_digest,
    adapter_info,
    adapter_name_for,
    base_fingerprint,
    checkpoint_fingerprint,
    combine_files,
    convert_adapter,
    fingerprint_tensors,
    load_adapter,
    parent_record,
    read_adapter,
    save_adapter,
    write_adapter,
)
from nomoat.adapters.merge import merge_files, merge_to_model, update_retention

__all__ = ["AdapterSpec", "adapter_digest", "adapter_info", "adapter_name_for", "base_fingerprint",
           "checkpoint_fingerprint", "combine_files", "convert_adapter", "fingerprint_tensors", "load_adapter",
           "merge_files", "merge_to_model", "parent_record", "read_adapter", "save_adapter", "update_retention",
           "write_adapter"]

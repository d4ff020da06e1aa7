"""Training and evaluation data: records in the layouts the field uses, tokenized with loss masks.

`sft` holds instruction / chat / text data. May import model (for IGNORE_INDEX) and the tokenizer's
protocol; must not import train, serve, eval or cli.
"""

from nomoat.data.sft import (
    FORMATS,
    IGNORE_INDEX,
    Batch,
    Batches,
    Example,
    build_dataset,
    data_fingerprint,
    load_examples,
    split_validation,
    tokenize_example,
)

__all__ = ["FORMATS", "IGNORE_INDEX", "Batch", "Batches", "Example", "build_dataset", "data_fingerprint",
           "load_examples", "split_validation", "tokenize_example"]

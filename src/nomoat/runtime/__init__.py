"""Running a loaded model: loading, tokenizer, decoding; CPU capability dispatch.

Must not import train, serve or cli.
"""

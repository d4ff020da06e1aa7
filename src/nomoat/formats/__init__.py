"""On-disk layouts (GGUF, Hugging Face, PEFT): the only code that knows file formats."""

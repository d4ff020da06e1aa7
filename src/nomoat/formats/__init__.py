"""On-disk layouts: GGUF (read, write, LoRA adapters), Hugging Face directories, PEFT adapter directories,
tokenizers (tokenizer.json, GGUF vocabularies), and whole-model export. The only code that knows file formats.

May import model (shapes, registry names) and lora (the adapter config and tensor checks); must not import
the runtime, adapters, train, eval, serve or cli.
"""

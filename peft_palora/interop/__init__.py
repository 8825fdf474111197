"""PaLoRA and the formats around it: standard PEFT LoRA bundles in and out, GGUF for llama.cpp, and the Hub."""

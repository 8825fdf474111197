"""PaLoRA and the formats around it: standard PEFT LoRA bundles in and out, and the Hub."""

"""Training PaLoRA: the multi-task model, the preference window, and the Accelerate and ``transformers`` trainers."""

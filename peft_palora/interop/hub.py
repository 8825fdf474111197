"""Model cards and publishing to the Hub: the names users import, kept here; the code lives in the tuner layer.

A PaLoRA `PeftModel` writes its card on `save_pretrained` and publishes with it on `push_to_hub`, so most users need
nothing from this module. It gathers the functions for the other cases:

* `build_model_card` -- the card as a `huggingface_hub.ModelCard`, to read or edit before publishing;
* `write_model_card` -- write it (with a front table, hypervolume and plot) into a bundle folder, e.g. after
  `write_front_report` put a `front.json` there;
* `push_palora_to_hub` -- publish a PaLoRA model, or a `MultiTaskModel` with its task heads, in one commit.

See `peft_palora.tuner.card` (the card) and `peft_palora.tuner.push` (the push).
"""

from __future__ import annotations

from peft_palora.tuner.card import (
    build_model_card,
    escape,
    front_table_markdown,
    plot_filename_in_repo,
    read_front_report,
    write_model_card,
)
from peft_palora.tuner.push import DEFAULT_COMMIT_MESSAGE, push_palora_to_hub

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "build_model_card",
    "escape",
    "front_table_markdown",
    "plot_filename_in_repo",
    "push_palora_to_hub",
    "read_front_report",
    "write_model_card",
]

"""PaLoRA as a PEFT tuner: what ``peft/tuners/palora/`` would hold.

``config`` (:class:`PaLoRAConfig`), ``layer`` (one ``get_delta_weight`` per layer type), ``bnb`` (quantised bases),
``model`` (:class:`PaLoRAModel`, the ``BaseTuner``), ``peft_model`` (the PaLoRA ``PeftModel`` classes), ``state``
(the preference of one call), ``preference`` (what a valid preference is), ``folded_conv``, ``bundle`` (checks on
saved bundles), ``conversion`` (one trade-off as a standard LoRA) and ``compat`` (the patches on PEFT, in one file).

This package imports nothing from the rest of ``peft_palora`` except ``peft_palora.utils`` (as PEFT's tuners use
``peft.utils``); ``tests/test_layering.py`` checks it.
"""

from peft_palora.tuner.config import PaLoRAConfig
from peft_palora.tuner.layer import PaLoRALayer
from peft_palora.tuner.model import PaLoRAModel, palora_layers

__all__ = ["PaLoRAConfig", "PaLoRALayer", "PaLoRAModel", "palora_layers"]

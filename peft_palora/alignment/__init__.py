"""Multi-objective alignment with PaLoRA through TRL: one policy for a whole reward front.

Needs the ``alignment`` extra (``pip install 'peft-palora[alignment]'``, which brings ``trl``). ``import peft_palora``
never imports TRL; the names below import it on first use.

* :class:`PaLoRADPOTrainer`: a ``trl.DPOTrainer`` whose ``train_dataset`` maps objective names to TRL preference
  datasets (``prompt``, ``chosen``, ``rejected``); each step samples preferences and minimises
  ``sum_t lambda_t * L_DPO,t`` with every sample run at its own preference.
* :class:`PaLoRAGRPOTrainer`: a ``trl.GRPOTrainer`` whose ``reward_funcs`` map objective names to reward functions or
  models; each prompt's completions are generated and scored under that prompt's preference.
* :func:`evaluate_reward_front`: mean reward per objective at each preference of a grid, hypervolume, consistency.
"""

from __future__ import annotations

from peft_palora.utils.lazy import lazy_exports

_LAZY = {
    "PaLoRADPOTrainer": "peft_palora.alignment.dpo",
    "split_by_objective": "peft_palora.alignment.dpo",
    "PaLoRAGRPOTrainer": "peft_palora.alignment.grpo",
    "evaluate_reward_front": "peft_palora.alignment.front",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = ["PaLoRADPOTrainer", "PaLoRAGRPOTrainer", "evaluate_reward_front", "split_by_objective"]

"""Configuration of PaLoRA adapters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType
from peft.utils.other import get_pattern_key

from peft_palora.utils.checks import check_int, check_real

_BIAS_OPTIONS = ("none", "all", "palora_only")


@dataclass
class PaLoRAConfig(PeftConfig):
    """Configuration for [`PaLoRAModel`]: T task adapters of rank `r` on every targeted layer.

    A targeted layer with base weight `W` computes, for a preference `lambda` on the simplex,

        W(lambda) = W + (palora_alpha / r) * sum_t lambda_t * B_t @ A_t

    Args:
        num_tasks (`int`): Number of tasks T (>= 2). May be omitted when `task_names` is given.
        task_names (`list[str]`, *optional*): Names of the tasks; preferences may then be given as dicts.
        r (`int`): Rank of each task's adapter. The layer holds T * r adapter directions in total.
        palora_alpha (`float`): Scaling numerator; each adapter is scaled by `palora_alpha / r`.
        palora_dropout (`float`): Dropout probability on the adapter input.
        target_modules, exclude_modules, layers_to_transform, layers_pattern, modules_to_save, bias, fan_in_fan_out:
            As in `peft.LoraConfig` (`"all-linear"` included). `bias` is one of `"none"`, `"all"`, `"palora_only"`.
        train_base_weights (`bool`): False freezes the base model (the PEFT convention). True is the paper's mode:
            the weights (and biases) of the targeted base layers train with the adapters, and `save_pretrained`
            stores them in the bundle so that a reload reproduces the trained model exactly.
        rank_pattern (`dict[str, int]`): Per-layer ranks overriding `r`, keyed by layer name or regex, matched as
            `peft.LoraConfig.rank_pattern` is (e.g. `{"conv1": 5}` or `{"^encoder.*conv": 8}`).
        alpha_pattern (`dict[str, float]`): Per-layer `palora_alpha` overriding the default, matched the same way.
        init_weights (`bool`): True starts every `B_t` at zero so the wrapped model equals the base model at any
            preference. False initialises `B_t` randomly too (useful for tests).
        conv_layout (`str`): `"peft"` (default): a convolution adapter is a k x k convolution to T*r channels followed
            by a 1x1 convolution, as in PEFT's LoRA (kernel delta of rank <= r per task). `"paper"`: the paper's form,
            `B (out*k, r*k) @ A (r*k, in*k)` reshaped into the kernel (each task owns r*k directions). On the paper's
            small convolutional benchmarks `"paper"` gave the higher hypervolume with fewer parameters
            (`benchmarks/paper/README.md`); `"peft"` stays the default because `export_lora` can write it as a
            standard LoRA.
        default_preference (`list[float]`, *optional*): The `(T,)` preference a new or reloaded model starts at
            (uniform when None). `set_preference` with a `(T,)` preference records it here, so the trade-off chosen
            for deployment is saved with the bundle.
    """

    num_tasks: int | None = field(default=None, metadata={"help": "Number of tasks T (>= 2)."})
    task_names: list[str] | None = field(default=None, metadata={"help": "Optional names of the T tasks."})
    r: int = field(default=4, metadata={"help": "Rank of each task adapter."})
    palora_alpha: float = field(default=4.0, metadata={"help": "Adapters are scaled by palora_alpha / r."})
    palora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (or regex) to adapt; 'all-linear' adapts every linear layer but the output head. "
            "Left as None, the defaults LoRA uses for the architecture are taken."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names (or regex) never to adapt."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True if the layer stores its weight as (fan_in, fan_out), like GPT-2's Conv1D."}
    )
    bias: Literal["none", "all", "palora_only"] = field(default="none", metadata={"help": "Which biases train."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. task heads) trained fully and saved with the adapter."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."}
    )
    train_base_weights: bool = field(
        default=False,
        metadata={"help": "Train (and save) the targeted base weights with the adapters, as in the paper."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-layer ranks {layer name or regex: r} overriding `r`, as in LoraConfig.rank_pattern."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-layer {layer name or regex: alpha} overriding `palora_alpha`, as in LoraConfig."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Start every B_t at zero so the adapted model equals the base model."}
    )
    conv_layout: Literal["peft", "paper"] = field(
        default="peft",
        metadata={
            "help": "Convolution adapters: 'peft' (a k x k convolution to T*r channels, then 1x1, as PEFT's LoRA) or "
            "'paper' (the paper's form: B (out*k, r*k) @ A (r*k, in*k) reshaped into the kernel)."
        },
    )
    default_preference: list[float] | None = field(
        default=None,
        metadata={
            "help": "The (T,) preference a new or reloaded model starts at (None: uniform). `set_preference` with a "
            "(T,) preference updates it, so `save_pretrained` stores the trade-off chosen for deployment."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.PALORA
        self._validate_tasks()
        check_int(self.r, "`r`", minimum=1)
        check_real(self.palora_alpha, "`palora_alpha`")
        check_real(self.palora_dropout, "`palora_dropout`", finite=False)  # NaN fails the range check below
        if not 0.0 <= float(self.palora_dropout) < 1.0:
            raise ValueError(f"`palora_dropout` must be in [0, 1), got {self.palora_dropout}.")
        self._validate_patterns()
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            names_ok = isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value)
            if value is not None and not isinstance(value, str) and not names_ok:
                raise TypeError(f"`{name}` must be a regex string, a list of module names or None, got {value!r}.")
        if self.conv_layout not in ("peft", "paper"):
            raise ValueError(f"`conv_layout` must be 'peft' or 'paper', got {self.conv_layout!r}.")
        if self.bias not in _BIAS_OPTIONS:
            raise ValueError(f"`bias` must be one of {_BIAS_OPTIONS}, got {self.bias!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` to be set too.")
        if self.default_preference is not None:
            from peft_palora.tuner.preference import validate_preference

            value = validate_preference(
                self.default_preference, self.num_tasks, self.task_names, name="`default_preference`"
            )
            if value.dim() != 1:
                raise ValueError(f"`default_preference` must be one (T,) preference, got shape {tuple(value.shape)}.")
            self.default_preference = value.tolist()

    def _validate_tasks(self) -> None:
        if self.task_names is not None:
            if isinstance(self.task_names, str) or not all(isinstance(name, str) for name in self.task_names):
                raise TypeError(f"`task_names` must be a list of strings, got {self.task_names!r}.")
            self.task_names = list(self.task_names)
            for name in self.task_names:
                # Task names become module and file keys (task heads, metrics): PyTorch refuses "" and ".".
                if not name or "." in name or not name.isprintable():
                    raise ValueError(
                        f"`task_names` entries must be non-empty, printable and free of '.', got {name!r}."
                    )
            duplicates = sorted({name for name in self.task_names if self.task_names.count(name) > 1})
            if duplicates:
                raise ValueError(f"`task_names` must be unique; duplicated: {duplicates}.")
            if self.num_tasks is None:
                self.num_tasks = len(self.task_names)
            elif self.num_tasks != len(self.task_names):
                raise ValueError(
                    f"`num_tasks`={self.num_tasks} but `task_names` has {len(self.task_names)} entries "
                    f"({self.task_names})."
                )
        if self.num_tasks is None:
            raise ValueError("Give `num_tasks` (T >= 2) or `task_names`.")
        check_int(self.num_tasks, "`num_tasks`", minimum=2)

    def _validate_patterns(self) -> None:
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict) or not all(isinstance(key, str) and key for key in pattern):
                raise TypeError(f"`{name}` must be a dict keyed by layer names or regexes, got {pattern!r}.")
            for key, value in pattern.items():
                if name == "rank_pattern":
                    check_int(value, f"`rank_pattern[{key!r}]`", minimum=1)
                    continue
                name_of_entry = f"`alpha_pattern[{key!r}]`"
                if not math.isfinite(check_real(value, name_of_entry, finite=False, expected="a finite number")):
                    raise TypeError(f"{name_of_entry} must be a finite number, got {value!r}.")  # TypeError, as before

    def rank_and_alpha_for(self, layer_name: str) -> tuple[int, float]:
        """The rank and `palora_alpha` of the layer called `layer_name` (its full module path), after the patterns.

        The first key of each pattern that matches the end of the name wins, as in PEFT's LoRA.
        """
        r = self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), layer_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), layer_name), self.palora_alpha)
        return r, alpha

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load a PaLoRA config (``PeftConfig.from_pretrained``), checking a local bundle's files first.

        ``PeftModel.from_pretrained`` reads the config before it injects any layer, so a damaged or foreign bundle is
        refused here, naming the file, while the user's model is still untouched.
        """
        from peft_palora.tuner.bundle import check_local_bundle, local_bundle_dir

        directory = local_bundle_dir(pretrained_model_name_or_path, subfolder)
        if directory is not None:
            check_local_bundle(directory)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._palora_weights_pending = True  # the weights of this bundle are still to be loaded
        return config

    @property
    def scaling(self) -> float:
        """The factor `palora_alpha / r` applied to every task adapter without a pattern entry."""
        return float(self.palora_alpha) / self.r

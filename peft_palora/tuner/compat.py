"""Make PaLoRA a first-class PEFT method: the registration, and every patch on PEFT, in one file.

PaLoRA registers through PEFT's extension point (``register_peft_method``) and uses PEFT's own hooks where they
exist (``_enable_peft_forward_hooks`` receives each call's ``preference``; layers are chosen by a list of
dispatchers, as in LoRA). Four things have no extension point, so they are patched here and nowhere else:

1. **The ``PeftType.PALORA`` member.** ``register_peft_method`` refuses names missing from the closed enum
   ``peft.utils.PeftType``; enums cannot be extended through their public API. Would break if PEFT rebuilt the enum
   after import or validated members another way.
2. **The ``preference`` forward argument** (:class:`_SpecialForwardArgs`): ``PeftModel.forward``/``generate`` strip
   the names in the instance attribute ``special_peft_forward_args`` before calling the base model, and no extension
   point adds to it. Would break if PEFT stopped assigning that attribute in ``PeftModel.__init__``.
3. **The class of a PaLoRA ``PeftModel``** (done by the same descriptor, when PEFT assigns the attribute): PEFT picks
   the ``PeftModel`` class from the task type, never from the method, so PaLoRA's instances get a PaLoRA subclass of
   the class PEFT chose (:mod:`peft_palora.tuner.peft_model`: atomic whole-bundle saves, checked loads that roll
   back, PaLoRA's model card, ``generate`` marking the call so per-sample preferences cover beams). Would break if
   PEFT assigned ``special_peft_forward_args`` before ``peft_type``.
4. **A config file that is not a JSON object** (:func:`_install_config_file_check`): ``PeftModel.from_pretrained``,
   ``load_adapter`` and ``AutoPeftModel`` read ``adapter_config.json`` through ``PeftConfig.from_json_file`` (in
   ``PeftConfig._get_peft_type``) before any tuner code runs, and index the result with ``["peft_type"]``: a file
   holding an array, a number or ``null`` gave a bare ``TypeError`` naming no file. The wrapped classmethod returns
   what PEFT's returns for a JSON object and raises a ValueError naming the file otherwise; every PEFT method (LoRA
   included) gets that error instead of the ``TypeError``, and nothing else changes. Would break if PEFT stopped
   reading the file through ``from_json_file`` (the check would then simply not run).

Each patch is tested against the installed PEFT (``tests/test_registration.py``), and the tested range is
:data:`TESTED_PEFT_RANGE`: another PEFT version gets a warning at import naming this module.

Everything here is idempotent: importing ``peft_palora`` twice, or after other PEFT code, or in a process where PEFT
already knows ``PALORA`` (a future PEFT release), leaves exactly one consistent registration behind.
"""

from __future__ import annotations

import enum
import warnings
from importlib import metadata

from packaging.version import Version
from peft import PeftModel
from peft.utils import PeftType, register_peft_method

PALORA_NAME = "PALORA"
PREFERENCE_FORWARD_ARG = "preference"
#: The PEFT releases the patches above are tested with (pyproject.toml pins the same range).
TESTED_PEFT_RANGE = ("0.21.0", "0.22")


def check_peft_version(version: str | None = None) -> bool:
    """Warn (once per call) when the installed PEFT is outside :data:`TESTED_PEFT_RANGE`; True when inside."""
    version = version if version is not None else metadata.version("peft")
    low, high = TESTED_PEFT_RANGE
    if Version(low) <= Version(version) < Version(high):
        return True
    warnings.warn(
        f"peft_palora patches PEFT in four places (peft_palora.tuner.compat) and is tested with peft >={low},<{high}; "
        f"found peft {version}. If PaLoRA models misbehave, install a tested PEFT release.",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _add_peft_type_member() -> PeftType:
    """Add ``PeftType.PALORA`` (value ``"PALORA"``) to PEFT's enum if it is not there yet."""
    existing = PeftType.__members__.get(PALORA_NAME)
    if existing is not None:
        return existing

    # A ``str`` enum member is an instance of the enum class built on the ``str`` value; this mirrors what
    # ``EnumType.__new__`` does for members declared in the class body.
    member = str.__new__(PeftType, PALORA_NAME)
    member._name_ = PALORA_NAME
    member._value_ = PALORA_NAME
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)

    PeftType._member_map_[PALORA_NAME] = member
    PeftType._value2member_map_[PALORA_NAME] = member
    PeftType._member_names_.append(PALORA_NAME)
    # Class attribute access (``PeftType.PALORA``) goes through the enum's own descriptor machinery on 3.11+;
    # ``type.__setattr__`` bypasses ``EnumType.__setattr__``'s guard against re-binding members.
    type.__setattr__(PeftType, PALORA_NAME, member)

    # Fail loudly here rather than somewhere deep inside PEFT if a future Python changes enum internals.
    if PeftType(PALORA_NAME) is not member or PALORA_NAME not in list(PeftType) or member != PALORA_NAME:
        raise RuntimeError("peft_palora could not add PALORA to peft.utils.PeftType; please report this.")
    if not isinstance(member, enum.Enum):  # pragma: no cover - defensive
        raise RuntimeError("PeftType.PALORA is not an enum member.")
    return member


class _SpecialForwardArgs:
    """Data descriptor for ``PeftModel.special_peft_forward_args``: adds ``preference`` for PaLoRA models.

    This is the one patch on a PEFT class besides the enum member, and why it is needed: ``PeftModel.forward`` and
    ``generate`` hand their keyword arguments to the tuner's ``_enable_peft_forward_hooks`` and then strip the
    names in ``special_peft_forward_args`` before calling the base model. ``PeftModel.__init__`` assigns that set as
    a plain instance attribute and no PEFT extension point adds to it, so a tuner can only add an argument by
    intercepting the attribute.

    The assignment in ``PeftModel.__init__`` is also the one moment PEFT hands a tuner-independent hook on a new
    ``PeftModel``: for a PaLoRA model (``peft_type`` is set just before) it gives the instance its PaLoRA subclass
    (``peft_model.adopt``), which carries PaLoRA's saving, loading and publishing. Non-PaLoRA models see the set PEFT
    assigned and keep their class: LoRA users in the same process see PEFT as it is.

    What would break it: a PEFT release that stops assigning ``special_peft_forward_args`` in ``__init__`` (or sets
    it before ``peft_type``). ``tests/test_registration.py`` checks both effects against the installed PEFT.
    """

    _storage = "_peft_special_forward_args"

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        args = obj.__dict__.get(self._storage, set())
        if obj.__dict__.get("peft_type") == PALORA_NAME:
            return args | {PREFERENCE_FORWARD_ARG}
        return args

    def __set__(self, obj, value) -> None:
        obj.__dict__[self._storage] = set(value)
        if obj.__dict__.get("peft_type") == PALORA_NAME:
            from peft_palora.tuner.peft_model import adopt

            adopt(obj)


def _install_config_file_check() -> None:
    """Wrap ``PeftConfig.from_json_file``: a file that does not hold a JSON object is a ValueError naming it."""
    from peft.config import PeftConfig

    owner = next(cls for cls in PeftConfig.__mro__ if "from_json_file" in cls.__dict__)  # PeftConfigMixin
    original = owner.__dict__["from_json_file"].__func__
    if getattr(original, "_palora_checked", False):
        return

    def from_json_file(cls, path_json_file, **kwargs):
        try:
            loaded = original(cls, path_json_file, **kwargs)
        except TypeError as error:  # PEFT looks for "runtime_config" in what it read: a number or null
            raise ValueError(f"{path_json_file} must hold a JSON object ({error}).") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"{path_json_file} must hold a JSON object, got {type(loaded).__name__}.")
        return loaded

    from_json_file._palora_checked = True
    from_json_file.__doc__ = original.__doc__
    from_json_file.__wrapped__ = original
    owner.from_json_file = classmethod(from_json_file)


def _install_preference_forward_arg() -> None:
    if isinstance(PeftModel.__dict__.get("special_peft_forward_args"), _SpecialForwardArgs):
        return
    PeftModel.special_peft_forward_args = _SpecialForwardArgs()


def register() -> None:
    """Register PaLoRA with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from peft_palora.tuner.config import PaLoRAConfig
    from peft_palora.tuner.model import PaLoRAModel

    check_peft_version()
    peft_type = _add_peft_type_member()
    _install_preference_forward_arg()
    _install_config_file_check()

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is PaLoRAModel and PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is PaLoRAConfig:
        return
    if registered is not None:
        # A stale registration (e.g. the package was re-imported after a reload): replace it with ours.
        for mapping in (PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            mapping.pop(peft_type, None)
    register_peft_method(name=PALORA_NAME.lower(), config_cls=PaLoRAConfig, model_cls=PaLoRAModel, prefix="palora_")

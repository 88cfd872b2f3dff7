"""``PeftType.ELITEKV``: the PEFT type of this library, added to peft's enum.

PEFT's public `register_peft_method` only accepts names already in its `PeftType` enum, and peft offers no public way
to add one. `ensure_peft_type` adds ``PeftType.ELITEKV`` as a real enum member (same class, same lookups as the
built-in members: ``PeftType("ELITEKV")``, ``PeftType["ELITEKV"]``, iteration), once and idempotently, then checks
that every lookup finds it: if a peft release changes its enum internals, importing elitekv_peft fails with an error
that names the peft version, instead of registering half. CI tests it on the lowest, a locked and the newest peft
that pyproject.toml allows (tests/test_peft_integration.py).
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "ELITEKV"


def ensure_peft_type() -> PeftType:
    """Add ``ELITEKV`` to peft's `PeftType` enum if it is not there yet, and return the member."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    # class attribute first: the enum metaclass refuses to set names that are already members
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    _check_peft_type(member)
    return member


def _check_peft_type(member: PeftType) -> None:
    """Raise if ``member`` is not found by every lookup PEFT uses (value, name, iteration, membership)."""
    import peft

    found = (
        PeftType(PEFT_TYPE_NAME) is member
        and PeftType[PEFT_TYPE_NAME] is member
        and member in list(PeftType)
        and member in PeftType
        and isinstance(member, PeftType)
        and member == PEFT_TYPE_NAME
    )
    if not found:
        raise ImportError(
            f"elitekv_peft could not add ELITEKV to PeftType of peft {peft.__version__}: this peft changed its enum "
            "internals. Install the peft version in elitekv-peft's constraints/ci.txt (pip install 'peft==<that>'), "
            "or upgrade elitekv-peft."
        )

"""The precision vocabulary: what a decoder layer can be stored at, how its integer codes are chosen, and the INT4
group sizes a plan may use."""

from __future__ import annotations

from lsaq.choices import Choice


class Precision(Choice):
    """Per-layer weight precision. Order of the members is from most to least precise.

    ``FP16`` ("fp16") means a 16-bit float: the artifact stores it in the source model's own 16-bit dtype
    (bfloat16 unless the source declares float16); byte counts are the same either way.
    """

    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bits(self) -> int:
        return {"fp16": 16, "int8": 8, "int4": 4}[self.value]

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "precision", "precisions"

    def demoted(self) -> "Precision | None":
        """The next lower precision (FP16 -> INT8 -> INT4), or None at the bottom."""
        members = list(Precision)
        i = members.index(self)
        return members[i + 1] if i + 1 < len(members) else None


class Quantizer(Choice):
    """How integer codes are chosen: round-to-nearest, or GPTQ's error feedback on calibration activations."""

    RTN = "rtn"
    GPTQ = "gptq"

    @classmethod
    def noun(cls) -> tuple[str, str]:
        return "quantizer", "quantizers"


# The INT4 group sizes a plan considers (the largest that divides every width, lsaq.planning.memory), largest first
GROUP_SIZES = (128, 64, 32, 16)


def check_group_size(group_size: int | None) -> int | None:
    """``None`` (per-channel) or a positive int; ``ValueError`` otherwise."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group size must be a positive integer or None (per-channel), got {group_size!r}")
    return group_size


AUTO_GROUP = "auto"  # group size: weigh INT4 per-channel against grouped by measured loss (lsaq.planning.stage)


def parse_group_size(value: int | str | None) -> int | str | None:
    """None (per-channel), a positive int (also as text) or ``"auto"``; ``ValueError`` naming the value otherwise."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return check_group_size(value)
    text = str(value).strip().lower()
    if text == AUTO_GROUP:
        return AUTO_GROUP
    try:
        return check_group_size(int(text))
    except ValueError:
        raise ValueError(f"group size must be a positive integer, {AUTO_GROUP!r} or None (per-channel), "
                         f"got {value!r}") from None

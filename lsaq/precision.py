"""The precision vocabulary: what a decoder layer can be stored at, and how its integer codes are chosen."""

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

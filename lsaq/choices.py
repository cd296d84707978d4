"""String-valued enums parsed from user input (CLI flags, records, pipeline parameters) with one error message."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A string enum whose :meth:`parse` accepts a member or its value in any case, else raises a ``ValueError``
    naming the bad value and every valid one. Subclasses name themselves in :meth:`noun`."""

    @classmethod
    def noun(cls) -> tuple[str, str]:
        """``(singular, plural)`` of what the members are, for error messages."""
        return "value", "values"

    @classmethod
    def parse(cls: type[C], value: "str | C") -> C:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            one, many = cls.noun()
            raise ValueError(f"unknown {one} {value!r}; valid {many}: {', '.join(m.value for m in cls)}") from None

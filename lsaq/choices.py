"""User input (CLI flags, records, pipeline parameters): string-valued enums parsed with one error message, and
the error of a bad option, which reads in option names or in command-line flags."""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, TypeVar

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


class OptionError(ValueError):
    """A bad option or argument.

    The message template names options as ``{name}`` placeholders, so the same error reads in option names in
    Python and in a pipeline (``seq_len must be ...``) and in flags on the command line (``--seq-len must be ...``,
    :meth:`render`). Values go into the template through :func:`literal`.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each option placeholder replaced by ``name(option)``."""
        return self.template.format_map(_Names(name))


class _Names(dict):
    def __init__(self, name: Callable[[str], str]) -> None:
        super().__init__()
        self.name = name

    def __missing__(self, key: str) -> str:
        return self.name(key)


def literal(value: Any) -> str:
    """A value inside an :class:`OptionError` template (braces escaped)."""
    return str(value).replace("{", "{{").replace("}", "}}")

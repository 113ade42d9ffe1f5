"""Value classes for the puller, declared like dataclasses, made without them.

Why not dataclasses: `modelshelf pull` is a short-lived process whose start-up delays its first
request, and importing dataclasses (inspect, ast, dis) took ~6.7 ms here, plus ~0.8 ms for each
class it makes (it generates and compiles each class's methods); the pull path has eleven
(benchmarks/results/pull.notes.md, pull7). A Record subclass reads its fields from its own
annotations when the class is made, in order; `name: type = value` gives a default,
`= Factory(fn)` a fresh default per instance. Instances take their fields positionally or by
name (a missing or unknown one is a TypeError), compare equal when of the same class with equal
fields, show them in repr, and are frozen (assignment raises FrozenInstanceError, an
AttributeError, and they hash by their fields) unless the class says ``frozen=False``.
"""
from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing is ~2 ms of a CLI pull's start-up
if TYPE_CHECKING:
    from typing import Any, Callable


class FrozenInstanceError(AttributeError):
    """A field of a frozen record was assigned to."""


class Factory:
    """A default made fresh for every instance: ``headers: dict = Factory(dict)``."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]):
        self.make = make


class Record:
    """Base of value classes (see module docstring)."""

    _fields: tuple[str, ...] = ()
    _defaults: dict[str, Any] = {}
    _frozen = True

    def __init_subclass__(cls, frozen: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(cls.__dict__.get("__annotations__", {}))
        cls._fields = tuple(f for f in cls._fields if f not in own) + own
        cls._defaults = {**cls._defaults, **{f: cls.__dict__[f] for f in own if f in cls.__dict__}}
        cls._frozen = frozen
        if not frozen:
            cls.__hash__ = None  # type: ignore[assignment] - mutable and compared by value: unhashable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}() takes {len(fields)} fields, {len(args)} given")
        values = dict(zip(fields, args))
        for name, value in kwargs.items():
            if name not in fields:
                raise TypeError(f"{type(self).__name__}() has no field {name!r}")
            if name in values:
                raise TypeError(f"{type(self).__name__}() got field {name!r} twice")
            values[name] = value
        if len(values) < len(fields):
            for name in fields:
                if name not in values:
                    if name not in self._defaults:
                        raise TypeError(f"{type(self).__name__}() missing field {name!r}")
                    default = self._defaults[name]
                    values[name] = default.make() if isinstance(default, Factory) else default
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise FrozenInstanceError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise FrozenInstanceError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")
        object.__delattr__(self, name)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return astuple(self) == astuple(other)  # type: ignore[arg-type]

    def __hash__(self) -> int:
        return hash(astuple(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"


def astuple(record: Record) -> tuple:
    """The field values in order (shallow, unlike dataclasses.astuple)."""
    return tuple(getattr(record, f) for f in record._fields)


def replace(record: Record, **changes: Any) -> Any:
    """A new record of the same class with `changes` applied."""
    return type(record)(**{**{f: getattr(record, f) for f in record._fields}, **changes})

"""Typed estimator options: one frozen dataclass per estimator, the single source of its options.

Each estimator registers a config class (``register_estimator("fsg", config=FSGConfig)``); every
field of it is one keyword option, declared with :func:`option`: its default, its kind (``int``,
``float``, ``bool`` or ``choice``), its allowed values (choices, or a range ``low ≤ v ≤ high`` /
``low < v``) and a one-sentence help text. From these declarations come

* :meth:`EstimatorConfig.validate` — checks every field against its declaration, then the
  cross-field rules of :meth:`EstimatorConfig.check`; one-line ``ValueError`` naming the option
  and the values it accepts. It never builds a module and never draws a random number, so a
  caller may seed, validate, then build and get the same initial weights as without validating;
* the estimator's constructor (``FSG(**options)`` = ``FSG(FSGConfig(**options))``);
* ``fsg train``'s estimator flags and their help, ``TrainConfig.validate``'s check of
  ``estimator_options``, ``fsg grid``'s routing of options to the estimators that take them;
* the README's table of estimator options (:func:`fsg.estimators.options_table_markdown`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["EstimatorConfig", "option", "OptionSpec", "KINDS"]

#: The kinds of option value: an integer, a real number, a boolean, or one of a fixed set of values.
KINDS = ("int", "float", "bool", "choice")


def option(default: Any, help: str, *, kind: str, choices: Optional[Sequence] = None, low=None, high=None,
           low_open: bool = False, default_text: Optional[str] = None, optional: Optional[bool] = None):
    """A config field declaring one estimator option.

    ``kind``: one of :data:`KINDS`; ``choices`` (kind ``choice``): the accepted values (``None``
    among them is accepted); ``low``/``high``: the accepted range, ``low < v`` when ``low_open``;
    ``optional``: ``None`` is accepted, meaning "derived from the other options" (default: when
    ``default`` is ``None``); ``default_text``: how the default reads in help texts when it is
    ``None`` (e.g. ``"5 with slow_net='mamba'"``); ``help``: one sentence, no default in it."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    meta = dict(help=help, kind=kind, choices=tuple(choices) if choices is not None else None, low=low, high=high,
                low_open=low_open, default_text=default_text,
                optional=(default is None) if optional is None else optional)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as declared by :func:`option` (read back by :meth:`EstimatorConfig.specs`)."""

    name: str
    default: Any
    help: str
    kind: str
    choices: Optional[Tuple] = None
    low: Any = None
    high: Any = None
    low_open: bool = False
    default_text: Optional[str] = None
    optional: bool = False

    @property
    def default_repr(self) -> str:
        """The default as help texts show it: ``0.9``, ``'mamba'``, ``None``, or :attr:`default_text`."""
        if self.default is None and self.default_text is not None:
            return self.default_text
        return repr(self.default)

    def allowed(self) -> str:
        """What the option accepts, as the end of a sentence (``"an integer >= 1"``)."""
        if self.kind == "choice":
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind == "bool":
            return "true or false"
        if self.kind == "int":
            return f"an integer >= {self.low}"
        if self.low == 0 and self.low_open and self.high is None:
            return "a positive number"
        if self.high is not None:
            return f"a number in [{self.low}, {self.high}]"
        return f"a number {'>' if self.low_open else '>='} {self.low}"

    def check(self, value) -> None:
        """One-line ``ValueError`` unless ``value`` is accepted."""
        if value is None and (self.optional or (self.choices is not None and None in self.choices)):
            return
        if not self.accepts(value):
            raise ValueError(f"{self.name} must be {self.allowed()}, got {value!r}")

    def accepts(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if isinstance(value, bool):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        ok_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return ok_low and (self.high is None or value <= self.high)


@dataclass(frozen=True)
class EstimatorConfig:
    """Base of the estimators' option dataclasses (no options). Subclasses declare each field
    with :func:`option` and may add cross-field rules in :meth:`check`."""

    @classmethod
    def specs(cls) -> List[OptionSpec]:
        """Every option's declaration, in field order."""
        return [OptionSpec(name=f.name, default=f.default, **f.metadata) for f in dataclasses.fields(cls)]

    @classmethod
    def option_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, config: Optional["EstimatorConfig"] = None, **options) -> "EstimatorConfig":
        """``config`` (default: the defaults) with ``options`` replaced, validated. Unknown option
        names raise ``TypeError`` (one line, naming the accepted ones)."""
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise TypeError(f"config must be a {cls.__name__}, got {type(base).__name__}")
        unknown = sorted(k for k in options if k not in cls.option_names())
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {', '.join(unknown)} "
                            f"(it takes: {', '.join(cls.option_names()) or 'none'})")
        return dataclasses.replace(base, **options).validate() if options else base.validate()

    def validate(self) -> "EstimatorConfig":
        """Check every option against its declaration, then :meth:`check`; returns ``self``.
        One-line ``ValueError`` naming the first bad option. Builds nothing, draws nothing."""
        for spec in self.specs():
            spec.check(getattr(self, spec.name))
        self.check()
        return self

    def check(self) -> None:
        """Cross-field rules (subclasses); one-line ``ValueError``."""

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

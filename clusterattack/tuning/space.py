"""Search spaces of attack sweeps: one validated spec per tuned AttackConfig field, turned into Tune domains.

The defaults sit around the authors' values (PAPER.md): alpha_a (attack weight) 5 to 30
in their code, searched log-uniformly over [1, 50]; alpha_c (norm-constraint weight)
1 in their code, log-uniform over [0.1, 10]. ``mi_temperature`` is not searched: its default,
"auto", takes 0.3 for victims whose clean memberships (which the attack queries anyway) are
soft and 1 for the others (``--space mi_temperature=choice:0.3,1`` searches it). eps is not
sampled: a sweep takes it as a grid (``SweepConfig.eps_grid``) and chooses a best trial per value.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SPACE",
    "KINDS",
    "ParamSpec",
    "grid_configs",
    "parse_space",
    "space_from_mapping",
    "tune_space",
]

KINDS = ("loguniform", "uniform", "choice")


def _finite(name: str, what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"search dimension {name!r}: {what} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of the search: an AttackConfig field and the distribution it is drawn from.

    ``kind`` "loguniform" and "uniform" take ``low`` < ``high`` (``low`` > 0 for log);
    "choice" takes ``values`` (a non-empty tuple). ``name`` is a flat AttackConfig key
    (``alpha_a``, ``eps``, ``surrogate.width`` ...); :class:`SweepConfig` checks it.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a search dimension needs a field name, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"search dimension {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.values or not isinstance(self.values, tuple):
                raise ValueError(
                    f"search dimension {self.name!r}: 'choice' needs a non-empty tuple of values, got {self.values!r}"
                )
            if self.low is not None or self.high is not None:
                raise ValueError(f"search dimension {self.name!r}: 'choice' takes values, not low/high")
            return
        low = _finite(self.name, "low", self.low)
        high = _finite(self.name, "high", self.high)
        if self.values is not None:
            raise ValueError(f"search dimension {self.name!r}: {self.kind!r} takes low/high, not values")
        if not low < high:
            raise ValueError(f"search dimension {self.name!r}: need low < high, got low={low!r} high={high!r}")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"search dimension {self.name!r}: 'loguniform' needs low > 0, got {low!r}")

    @classmethod
    def parse(cls, text: str) -> ParamSpec:
        """``name=loguniform:1:50``, ``name=uniform:0.05:0.2`` or ``name=choice:0.05,0.1,0.2``."""
        name, sep, rest = text.partition("=")
        kind, _, args = rest.partition(":")
        if not sep or not name or not kind or not args:
            raise ValueError(
                f"search dimension {text!r} must read NAME=loguniform:LOW:HIGH, NAME=uniform:LOW:HIGH "
                "or NAME=choice:V1,V2,..."
            )
        if kind == "choice":
            return cls(name.strip(), kind, values=tuple(_scalar(v) for v in args.split(",") if v.strip()))
        parts = args.split(":")
        if len(parts) != 2:
            raise ValueError(f"search dimension {text!r}: {kind!r} takes LOW:HIGH, got {args!r}")
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"search dimension {text!r}: LOW and HIGH must be numbers, got {args!r}") from None
        return cls(name.strip(), kind, low=low, high=high)

    def domain(self) -> Any:
        """The Ray Tune sampling domain of this dimension."""
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.kind == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.choice(list(self.values or ()))

    def grid(self, points: int) -> list[Any]:
        """``points`` evenly spaced values (geometric for log dimensions; all values of a choice)."""
        if self.kind == "choice":
            return list(self.values or ())
        if points < 1:
            raise ValueError(f"a grid needs >= 1 point per dimension, got {points!r}")
        low, high = float(self.low), float(self.high)  # type: ignore[arg-type]
        if points == 1:
            return [math.sqrt(low * high) if self.kind == "loguniform" else (low + high) / 2]
        steps = [i / (points - 1) for i in range(points)]
        if self.kind == "loguniform":
            return [float(math.exp(math.log(low) + s * (math.log(high) - math.log(low)))) for s in steps]
        return [float(low + s * (high - low)) for s in steps]

    def describe(self) -> str:
        """The spec in the same text form :meth:`parse` reads."""
        if self.kind == "choice":
            return f"{self.name}=choice:{','.join(map(str, self.values or ()))}"
        return f"{self.name}={self.kind}:{self.low!r}:{self.high!r}"


def _scalar(text: str) -> Any:
    text = text.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


#: The default space: around the authors' weights (see the module docstring).
DEFAULT_SPACE: tuple[ParamSpec, ...] = (
    ParamSpec("alpha_a", "loguniform", 1.0, 50.0),
    ParamSpec("alpha_c", "loguniform", 0.1, 10.0),
)


def parse_space(items: Iterable[str], base: Sequence[ParamSpec] = DEFAULT_SPACE) -> tuple[ParamSpec, ...]:
    """``base`` with the dimensions of ``items`` (``ParamSpec.parse`` texts) added or replaced."""
    out = {spec.name: spec for spec in base}
    for text in items:
        spec = ParamSpec.parse(text)
        out[spec.name] = spec
    return tuple(out.values())


def space_from_mapping(values: Mapping[str, Mapping[str, Any]]) -> tuple[ParamSpec, ...]:
    """Specs from ``{"alpha_a": {"kind": "loguniform", "low": 1, "high": 50}, ...}`` (JSON form)."""
    out = []
    for name, spec in values.items():
        fields = dict(spec)
        if "values" in fields and fields["values"] is not None:
            fields["values"] = tuple(fields["values"])
        out.append(ParamSpec(name=name, **fields))
    return tuple(out)


def tune_space(specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """The ``param_space`` of a Tuner: one Tune domain per dimension."""
    return {spec.name: spec.domain() for spec in specs}


def grid_configs(specs: Sequence[ParamSpec], points: int | Mapping[str, int]) -> list[dict[str, Any]]:
    """Every combination of each dimension's grid (``points`` per dimension, or per name)."""
    axes = []
    for spec in specs:
        n = points.get(spec.name, 1) if isinstance(points, Mapping) else points
        axes.append([(spec.name, value) for value in spec.grid(n)])
    return [dict(combo) for combo in itertools.product(*axes)]

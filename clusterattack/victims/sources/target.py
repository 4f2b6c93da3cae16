"""The victim an attack queries and the one that scores it, from one specification.

What ``jobs/attack.py`` (and a sweep trial) does with ``--victim``: resolve it, route a
decision-only victim to the label-based surrogate path (or refuse it, saying why), and
make sure every query is counted in one place. Served victims and foreign services count
themselves (their clients keep ``image_queries`` and ``calls``); a local model is wrapped
in ``CountingVictim``, which also enforces a local budget. Scoring queries are the
experimenter's and are counted apart: a second key, a second client, or an unbudgeted
wrapper.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from clusterattack.victims.sources.decision import (
    OneHotMemberships,
    for_gradient_source,
    is_decision_only,
)
from clusterattack.victims.sources.resolve import DatasetLike, describe_victim, resolve_victim
from clusterattack.victims.sources.spec import ParsedVictimSpec, parse_victim_spec

__all__ = ["AttackTarget", "open_attack_target"]

log = logging.getLogger(__name__)


@dataclass
class AttackTarget:
    """``victim``: what the attack queries (counted); ``scorer``: what scores the generator
    afterwards (None: the victim itself); ``name`` for tables; ``description`` for records."""

    victim: Any
    scorer: Any | None
    name: str
    description: dict[str, Any] = field(default_factory=dict)


def _scoring_view(victim: Any) -> Any:
    return OneHotMemberships(victim) if is_decision_only(victim) else victim


def open_attack_target(
    spec: str | ParsedVictimSpec,
    *,
    gradient_source: str,
    dataset: DatasetLike = None,
    options: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    eval_api_key: str | None = None,
    budget: int | None = None,
    spent: int = 0,
    device: str = "cpu",
    counter: Callable[..., Any] | None = None,
) -> AttackTarget:
    """Resolve ``spec`` for an attack with ``gradient_source``; see the module docstring.

    ``budget``: image-queries the attack may spend (a local victim's ``CountingVictim``
    budget, a foreign service's cap); ``spent``: what a resumed attack already spent of it
    (a server's ledger remembers that by itself). ``counter(model, budget=None)`` wraps a
    local model (default ``CountingVictim``; a job passes its own so tests can replace it).
    """
    if counter is None:
        from clusterattack.attacks.counting import CountingVictim as counter

    parsed = (spec if isinstance(spec, ParsedVictimSpec) else parse_victim_spec(spec)).with_options(options)
    remote = parsed.kind == "adapter" or (parsed.kind == "served" and "adapter" in parsed.options)
    if parsed.kind == "served" and not remote:
        victim = resolve_victim(parsed, dataset=dataset, api_key=api_key)
        scorer = resolve_victim(parsed, dataset=dataset, api_key=eval_api_key) if eval_api_key else None
        name = getattr(victim, "name", "") or parsed.display_name
        attacked = for_gradient_source(victim, gradient_source, name)
        return AttackTarget(attacked, None if scorer is None else _scoring_view(scorer), name,
                            {"kind": "served", "spec": parsed.text, "mode": victim.mode})
    if remote:
        cap = None if budget is None else max(budget - spent, 0)
        victim = resolve_victim(parsed, dataset=dataset, api_key=api_key, max_image_queries=cap)
        if spent and budget is None and victim.max_image_queries is not None:
            victim.max_image_queries = max(victim.max_image_queries - spent, 0)
        # The experimenter's scoring queries: a client of their own, no cap, the same manners.
        scorer = resolve_victim(parsed, dataset=dataset, api_key=eval_api_key or api_key)
        scorer.max_image_queries = None
        attacked = for_gradient_source(victim, gradient_source, victim.name)
        return AttackTarget(attacked, _scoring_view(scorer), victim.name, describe_victim(victim))
    model = resolve_victim(parsed, dataset=dataset, device=device)
    name = getattr(model, "name", "") or parsed.display_name
    if gradient_source == "whitebox" and isinstance(model, nn.Module):
        # The wrapper passes autograd through untouched; frozen weights gather no gradient.
        model.requires_grad_(False)
    description = describe_victim(model)
    model = for_gradient_source(model, gradient_source, name)
    scorer = counter(model) if budget is not None else None
    local_budget = None if budget is None else max(budget - spent, 0)
    return AttackTarget(counter(model, budget=local_budget), scorer, name, description)

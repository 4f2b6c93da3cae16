"""Victim sources: one specification names a victim everywhere; ``resolve_victim`` loads and checks it.

``parse_victim_spec`` checks the text (cheap: nothing imported, read or asked);
``resolve_victim`` returns a Victim (``predict_proba``) or a decision-only victim
(``predict``) from a zoo name, a ``save_victim`` file, an MLflow model, a Python factory, an
ONNX or TorchScript file, or an HTTP service (ours, or someone else's through an adapter
file); ``for_gradient_source`` routes decision-only victims to the label-based surrogate
path and refuses them where scores are needed. Grammar: :mod:`.spec`; guide: docs/own-model.md.
"""

from clusterattack.victims.sources.answers import VictimAnswerError, check_memberships
from clusterattack.victims.sources.decision import (
    DecisionOnlyError,
    OneHotMemberships,
    for_gradient_source,
    is_decision_only,
    is_differentiable,
)
from clusterattack.victims.sources.resolve import VictimFactory, describe_victim, resolve_victim
from clusterattack.victims.sources.spec import (
    KINDS,
    ParsedVictimSpec,
    VictimSpecError,
    parse_victim_spec,
)

__all__ = [
    "KINDS",
    "DecisionOnlyError",
    "OneHotMemberships",
    "VictimAnswerError",
    "VictimFactory",
    "ParsedVictimSpec",
    "VictimSpecError",
    "check_memberships",
    "describe_victim",
    "for_gradient_source",
    "is_decision_only",
    "is_differentiable",
    "parse_victim_spec",
    "resolve_victim",
]

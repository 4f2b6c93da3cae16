"""Frozen, validated configuration of the generator attack and its gradient sources."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from clusterattack.attacks.losses import ATTACK_TERMS
from clusterattack.precision import check_precision

log = logging.getLogger(__name__)

__all__ = [
    "ATTACK_LOSSES",
    "RETIRED_KEYS",
    "GAN_LOSSES",
    "GRADIENT_SOURCES",
    "NORMS",
    "AttackConfig",
    "EstimatorConfig",
    "SurrogateConfig",
]

NORMS = ("linf", "l2")
GAN_LOSSES = ("lsgan", "log")
#: Names of the attack terms (the registry ``clusterattack.attacks.losses.ATTACK_TERMS``).
ATTACK_LOSSES = tuple(ATTACK_TERMS)
#: Names of the gradient sources; ``clusterattack.attacks.gradients.GRADIENT_SOURCE_FACTORIES`` maps
#: each to its class (and refuses to import when the two differ).
GRADIENT_SOURCES = ("whitebox", "estimate", "surrogate")
ESTIMATORS = ("nes", "spsa")
PRIORS = ("none", "surrogate")
SURROGATE_LOSSES = ("kl", "kl_logit")
SURROGATE_ARCHS = ("convnet", "small", "pretext")


@dataclass(frozen=True)
class Retired:
    """A configuration key that measured nothing and was removed, and what took its place.

    ``same_as``: the values that behave exactly as the code does now (a record that holds
    one of them loads as if the key were absent); any other value ran an attack this version
    no longer has.
    """

    replaced_by: str
    same_as: tuple[Any, ...] = ()
    any_value: bool = False  # the key did nothing without another retired setting


#: Keys retired on 2026-12-06 (docs/experiments/: each measured no gain). ``override`` and
#: ``--set`` refuse them naming their replacement; ``from_dict`` (checkpoints, generator files,
#: sweep states, MLflow params) drops them when their value is what the code now does.
RETIRED_KEYS: dict[str, Retired] = {
    "surrogate.online_steps": Retired(
        "one surrogate fine-tuning step per generator step (four measured 53.6% against 55.4% on SCAN)", (1,)
    ),
    "surrogate.finetune_augment": Retired(
        "fine-tuning takes queried images as they are (augmenting them was the bug fixed on 2026-11-24)", (False,)
    ),
    "surrogate.diversity": Retired(
        "gradients through the image itself (random views did not help the generator on RUC)", ("none",)
    ),
    "surrogate.diversity_draws": Retired("nothing: views were retired with surrogate.diversity", (1,)),
    "surrogate.input_diversity": Retired("nothing: views were retired with surrogate.diversity", any_value=True),
    "surrogate.backbones": Retired(
        "one attacker backbone per ensemble member, always (shared ones aligned worse with the victim's "
        "gradient and three heads on one did not gain)",
        ("distinct",),
    ),
    "margin_kappa": Retired("nothing: the 'margin' attack term was retired", any_value=True),
}
#: Values of kept keys that were retired (attack_loss "margin": never ahead of mutual_info).
RETIRED_VALUES: dict[tuple[str, Any], str] = {
    ("attack_loss", "margin"): "attack_loss 'mutual_info' (the margin term never beat it)",
}


def _positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class EstimatorConfig:
    """Score-query gradient estimation (gradient source ``estimate``).

    ``method``: "nes" (Gaussian directions, antithetic pairs; Ilyas et al. 2018) or
    "spsa" (Rademacher directions, antithetic pairs; Uesato et al. 2018). Each image of a
    batch costs ``1 + 2 * samples`` image-queries per generator step. ``resolution`` draws
    the directions on a coarser grid (that fraction of H and W) and upsamples them: far
    fewer unknowns per query.

    ``prior`` "surrogate" adds a transfer prior (P-RGF, Cheng et al. 2019): a surrogate
    distilled from queried memberships (``AttackConfig.surrogate``) proposes one direction
    per image, the victim's answers at x +- sigma v measure the slope along it, and the
    random directions, orthogonal to it, add a little exploration (``samples`` may be 0).
    The surrogate is fine-tuned on those answers as training goes.
    """

    method: str = "nes"
    samples: int = 4  # antithetic pairs per image (q)
    sigma: float = 0.02  # finite-difference step on [0, 1] images
    resolution: float = 0.25
    prior: str = "none"

    def __post_init__(self) -> None:
        _choice("estimator.method", self.method, ESTIMATORS)
        _choice("estimator.prior", self.prior, PRIORS)
        _positive_int("estimator.samples", self.samples, minimum=0 if self.prior == "surrogate" else 1)
        _positive("estimator.sigma", self.sigma)
        if not 0 < self.resolution <= 1:
            raise ValueError(f"estimator.resolution must lie in (0, 1], got {self.resolution!r}")

    def queries_per_image(self) -> int:
        """Image-queries one image costs per generator step (x_adv, 2 per pair, 2 for a prior)."""
        return 1 + 2 * self.samples + (2 if self.prior == "surrogate" else 0)


@dataclass(frozen=True)
class SurrogateConfig:
    """A local model distilled from queried memberships (gradient source ``surrogate``).

    ``distill_queries`` training images are queried once (their memberships are the
    cached clean memberships M_i) and, when ``noise_queries`` > 0, that many more points
    drawn uniformly from the eps-ball around training images teach the surrogate how the
    victim behaves near the data. ``refresh_rounds`` rounds each query
    ``refresh_queries`` current adversarial images and fine-tune the surrogate on them.
    ``ensemble`` surrogates (different seeds) are averaged. ``arch`` "pretext" starts each
    surrogate from a SimCLR backbone the attacker trains itself (``pretext_epochs``, no
    labels, no queries, its own seed) on the attack's images, then distils it as the
    others; ``width`` does not apply to it. Member m of an ensemble gets a backbone of its
    own (pretext seed + m): their gradients disagree, and so average better. With
    ``online`` each generator step also queries the victim on its batch of adversarial images (one
    image-query per training image per epoch): the attack term is evaluated on the
    victim's memberships, its gradient taken through the surrogate, and the surrogate
    fine-tuned on those points as it goes. ``online_fraction`` < 1 asks only that share of
    each batch: the images nearest the ensemble's decision boundary (smallest lead of its
    first cluster over its second), where the victim's answer teaches the surrogate most and
    where the generator is about to move images across; the others keep the surrogate's
    memberships.

    ``augment`` shifts and flips the clean images the surrogate is distilled on (their
    memberships hold under such small moves). Fine-tuning on queried adversarial images
    (online steps and refreshes) uses them as they are: the victim's answer belongs to that
    exact image, and a shifted adversarial image is another point, often one the victim
    answers differently. On RUC, three epochs on 10,000 of a generator's adversarial images
    raised the cosine of the ensemble's gradient with the victim's from 0.383 to 0.455
    unaugmented and left it at 0.379 augmented.
    """

    distill_queries: int = 60_000
    noise_queries: int = 0
    distill_epochs: int = 8
    refresh_rounds: int = 3
    refresh_queries: int = 5_000
    refresh_epochs: int = 2
    ensemble: int = 1
    arch: str = "small"
    width: int = 16
    lr: float = 2e-3
    batch_size: int = 256
    loss: str = "kl_logit"
    augment: bool = True
    online: bool = True
    online_fraction: float = 1.0  # share of each batch queried online (the least sure first)
    pretext_epochs: int = 8  # SimCLR epochs of the attacker's own backbones (arch "pretext")

    def __post_init__(self) -> None:
        _positive_int("surrogate.distill_queries", self.distill_queries)
        _non_negative("surrogate.noise_queries", self.noise_queries)
        _positive_int("surrogate.distill_epochs", self.distill_epochs)
        _positive_int("surrogate.refresh_rounds", self.refresh_rounds, minimum=0)
        _positive_int("surrogate.refresh_queries", self.refresh_queries)
        _positive_int("surrogate.refresh_epochs", self.refresh_epochs)
        _positive_int("surrogate.ensemble", self.ensemble)
        _positive_int("surrogate.width", self.width, minimum=4)
        _positive("surrogate.lr", self.lr)
        _positive_int("surrogate.batch_size", self.batch_size)
        _choice("surrogate.loss", self.loss, SURROGATE_LOSSES)
        _choice("surrogate.arch", self.arch, SURROGATE_ARCHS)
        _positive_int("surrogate.pretext_epochs", self.pretext_epochs)
        if not isinstance(self.online_fraction, int | float) or not 0 < self.online_fraction <= 1:
            raise ValueError(f"surrogate.online_fraction must lie in (0, 1], got {self.online_fraction!r}")

    def total_queries(self) -> int:
        """Image-queries the surrogate costs in all (distillation, noise points, refreshes)."""
        return (
            self.distill_queries
            + int(self.noise_queries)
            + self.refresh_rounds * self.refresh_queries
        )


@dataclass(frozen=True)
class AttackConfig:
    """The generator attack of Chhabra et al. (NeurIPS 2022), section 4.1.

    The generator minimises ``alpha_gan * L_GAN - alpha_a * L_attack - alpha_c *
    L_constraint`` (the paper's signs: L_attack is a distance to push up, L_constraint is
    min(eps - ||G(x)||, 0)). ``attack_loss`` "paper" is the squared distance between clean
    and perturbed memberships; "mutual_info" the soft mutual information between clean
    and perturbed assignments over a batch (minimised), which breaks clusterings far more
    at the same eps (the terms are :data:`clusterattack.attacks.losses.ATTACK_TERMS`).
    ``target_cluster`` turns on the targeted variant (footnote 9).

    The perturbation is always projected onto the ``norm`` ball of radius ``eps`` and the
    image clamped to [0, 1], so the bound holds whatever the generator outputs;
    ``hard_clamp`` clamps the generator's raw tanh output at eps as the authors' code did
    (L-inf) instead of scaling it by eps.
    """

    norm: str = "linf"
    eps: float = 0.1
    attack_loss: str = "mutual_info"
    # Sharpening of perturbed memberships in the MI term; "auto": 0.3 where the victim's clean
    # memberships of the pool (queried anyway) are soft, mean largest < 0.6, else 1.
    mi_temperature: float | str = "auto"
    alpha_a: float = 10.0
    alpha_c: float = 1.0
    alpha_gan: float = 1.0
    gan_loss: str = "lsgan"
    target_cluster: int | None = None
    hard_clamp: bool = False
    gradient_source: str = "surrogate"
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    surrogate: SurrogateConfig = field(default_factory=SurrogateConfig)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = ()  # epochs at which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    train_limit: int | None = None  # train images the generator sees (None: all)
    # Held-out training images (0: none) on which, after every epoch, the victim is asked
    # for the memberships of the generator's perturbations: the epoch whose perturbed
    # assignments share the least information with the clean ones (NMI; for a targeted
    # run, the most images in the target cluster) is the generator kept. Labels are never
    # used; the queries are counted with the rest. They are held out of the generator's
    # training images (and of a surrogate's distillation pool).
    select_images: int = 0
    generator_width: int = 8  # AdvGAN: 8-16-32 channels
    generator_blocks: int = 4
    discriminator_width: int = 8
    # Convergence rule for query complexity: the epoch-mean generator loss has converged
    # when it has not improved on its best by more than ``converge_tol`` (relative to
    # its scale) for ``converge_patience`` consecutive epochs.
    converge_tol: float = 0.01
    converge_patience: int = 2
    stop_at_convergence: bool = False
    query_batch: int = 256  # images per victim call, as the paper's Table 2 counts
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": generator, discriminator and surrogate steps under autocast

    def __post_init__(self) -> None:
        _choice("norm", self.norm, NORMS)
        _positive("eps", self.eps)
        if self.norm == "linf" and self.eps > 1:
            raise ValueError(f"eps for norm 'linf' on [0, 1] images must be <= 1, got {self.eps!r}")
        _choice("attack_loss", self.attack_loss, ATTACK_LOSSES)
        if self.mi_temperature != "auto":
            try:
                _positive("mi_temperature", self.mi_temperature)
            except ValueError:
                raise ValueError(f"mi_temperature must be 'auto' or a number > 0, got {self.mi_temperature!r}") from None
        _non_negative("alpha_a", self.alpha_a)
        _non_negative("alpha_c", self.alpha_c)
        _non_negative("alpha_gan", self.alpha_gan)
        _choice("gan_loss", self.gan_loss, GAN_LOSSES)
        if self.target_cluster is not None:
            _positive_int("target_cluster", self.target_cluster, minimum=0)
        _choice("gradient_source", self.gradient_source, GRADIENT_SOURCES)
        if not isinstance(self.estimator, EstimatorConfig):
            raise ValueError(f"estimator must be an EstimatorConfig, got {type(self.estimator).__name__}")
        if not isinstance(self.surrogate, SurrogateConfig):
            raise ValueError(f"surrogate must be a SurrogateConfig, got {type(self.surrogate).__name__}")
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size, minimum=2)
        _positive("lr", self.lr)
        if not all(isinstance(m, int) and m > 0 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be positive epoch numbers, got {self.lr_milestones!r}")
        _positive("lr_gamma", self.lr_gamma)
        if self.train_limit is not None:
            _positive_int("train_limit", self.train_limit, minimum=2)
        _positive_int("select_images", self.select_images, minimum=0)
        _positive_int("generator_width", self.generator_width, minimum=2)
        _positive_int("generator_blocks", self.generator_blocks, minimum=0)
        _positive_int("discriminator_width", self.discriminator_width, minimum=2)
        _non_negative("converge_tol", self.converge_tol)
        _positive_int("converge_patience", self.converge_patience)
        _positive_int("query_batch", self.query_batch)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a torch device string such as 'cpu', got {self.device!r}")
        check_precision(self.precision)

    @property
    def black_box(self) -> bool:
        """True for the gradient sources that see the victim only through queries."""
        return self.gradient_source != "whitebox"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for MLflow params and JSON)."""
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """One level of keys (``estimator.samples`` ...), the form MLflow params take."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, EstimatorConfig | SurrogateConfig):
                for sub in fields(value):
                    out[f"{f.name}.{sub.name}"] = getattr(value, sub.name)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, retired: str = "error") -> AttackConfig:
        """Inverse of ``to_dict`` (also accepts the flat dotted form); unknown keys raise.

        Keys retired since the record was written (:data:`RETIRED_KEYS`) are dropped when
        their value is what the code now does; another value raises (``retired="error"``,
        for configs that will train) or is dropped with a warning (``retired="drop"``, for
        a record read only to perturb or to show, e.g. a saved generator).
        """
        if retired not in ("error", "drop"):
            raise ValueError(f"retired must be 'error' or 'drop', got {retired!r}")
        data = _without_retired(_flatten(data), retired)
        nested: dict[str, Any] = {}
        sub: dict[str, dict[str, Any]] = {"estimator": {}, "surrogate": {}}
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            head, _, tail = key.partition(".")
            if tail and head in sub:
                sub[head][tail] = value
            elif key in known:
                nested[key] = value
            else:
                raise ValueError(f"unknown attack config key {key!r}; expected one of {sorted(known)}")
        for head, sub_cls in (("estimator", EstimatorConfig), ("surrogate", SurrogateConfig)):
            allowed = {f.name for f in fields(sub_cls)}
            unknown = sorted(set(sub[head]) - allowed)
            if unknown:
                names = ", ".join(f"{head}.{k}" for k in unknown)
                raise ValueError(f"unknown attack config key(s) {names}; {head} takes {sorted(allowed)}")
        if "lr_milestones" in nested:
            nested["lr_milestones"] = tuple(nested["lr_milestones"])
        return cls(
            estimator=EstimatorConfig(**sub["estimator"]),
            surrogate=SurrogateConfig(**sub["surrogate"]),
            **nested,
        )

    def override(self, **changes: Any) -> AttackConfig:
        """A validated copy with fields changed (dotted keys reach the nested configs)."""
        flat = self.flat()
        for key, value in changes.items():
            if key in RETIRED_KEYS:
                raise ValueError(f"attack config key {key!r} was retired: {RETIRED_KEYS[key].replaced_by}")
            if isinstance(value, str | int | float | bool) and (key, value) in RETIRED_VALUES:
                raise ValueError(f"{key}={value!r} was retired: use {RETIRED_VALUES[(key, value)]}")
            if key not in flat and key not in ("estimator", "surrogate"):
                raise ValueError(f"unknown attack config key {key!r}")
        plain = {k: v for k, v in changes.items() if "." not in k and k not in ("estimator", "surrogate")}
        est = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("estimator.")}
        sur = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("surrogate.")}
        estimator = changes.get("estimator", self.estimator)
        surrogate = changes.get("surrogate", self.surrogate)
        return replace(
            self,
            estimator=replace(estimator, **est),
            surrogate=replace(surrogate, **sur),
            **plain,
        )


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    """``to_dict``'s nested form, or the flat dotted one, as flat dotted keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("estimator", "surrogate") and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _retired_is_noop(key: str, value: Any, data: dict[str, Any]) -> bool:
    spec = RETIRED_KEYS[key]
    if spec.any_value or value in spec.same_as:
        return True
    if key == "surrogate.backbones":
        # One backbone shared by one member, or no attacker backbone at all: as now.
        return int(data.get("surrogate.ensemble", 1)) == 1 or data.get("surrogate.arch") != "pretext"
    return False


def _without_retired(data: dict[str, Any], mode: str) -> dict[str, Any]:
    out = dict(data)
    for key in [k for k in out if k in RETIRED_KEYS]:
        value = out.pop(key)
        if _retired_is_noop(key, value, data):
            continue
        message = (
            f"{key}={value!r} was retired ({RETIRED_KEYS[key].replaced_by}): this record was made by an "
            "attack this version no longer runs"
        )
        if mode == "error":
            raise ValueError(message)
        log.warning("%s; read as if it were absent", message)
    for (key, value), instead in RETIRED_VALUES.items():
        if out.get(key) == value:
            message = f"{key}={value!r} was retired: this version uses {instead}"
            if mode == "error":
                raise ValueError(message)
            log.warning("%s; read with that", message)
            out[key] = "mutual_info"
    return out

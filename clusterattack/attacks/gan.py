"""Training loop of the generator attack: GAN steps, gradient source, convergence, budget exits."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.counting import read_counts
from clusterattack.attacks.discriminator import Discriminator
from clusterattack.attacks.generator import Generator
from clusterattack.attacks.gradients import GradientSource, make_gradient_source, query_memberships
from clusterattack.attacks.losses import (
    config_objective,
    constraint_penalty,
    discriminator_loss,
    generator_gan_loss,
    membership_distance,
    term_config,
)
from clusterattack.attacks.result import (
    STOP_BUDGET,
    STOP_CALLER,
    STOP_CONVERGED,
    AttackResult,
    ConvergenceTracker,
    EpochHook,
)
from clusterattack.precision import autocast
from clusterattack.serving.errors import BudgetExceeded
from clusterattack.victims.base import Victim

__all__ = ["AttackResult", "ConvergenceTracker", "perturb_images", "train_generator", "training_split"]

log = logging.getLogger(__name__)

def perturb_images(
    generator: Generator,
    images: torch.Tensor,
    config: AttackConfig,
    batch_size: int = 512,
) -> torch.Tensor:
    """Adversarial versions of ``images`` (CPU tensor), generated in batches without autograd."""
    was_training = generator.training
    generator.eval()
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(config.device)
            x_adv, _, _ = generator.perturb(x, config.norm, config.eps, config.hard_clamp)
            out.append(x_adv.cpu())
    generator.train(was_training)
    return torch.cat(out) if out else images.clone()


def training_split(
    images: torch.Tensor, config: AttackConfig, rng: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(pool, held-out images or None, n_train): the images an attack queries, in its order.

    The pool's first ``n_train`` images train the generator; a surrogate distils on the
    whole pool. ``rng`` is the run's generator (seeded with ``config.seed``, and this is
    its first draw); a caller outside a run gets the same split from ``config`` alone.
    """
    rng = rng if rng is not None else torch.Generator().manual_seed(config.seed)
    order = torch.randperm(images.shape[0], generator=rng)
    n_select = config.select_images
    if n_select and images.shape[0] - n_select < 2:
        raise ValueError(
            f"select_images={n_select} leaves fewer than 2 of the {images.shape[0]} images to train on"
        )
    available = images.shape[0] - n_select
    n_train = min(config.train_limit or available, available)
    n_query = n_train
    if config.gradient_source == "surrogate":
        n_query = max(n_train, min(config.surrogate.distill_queries, available))
    pool = images[order[:n_query]].float().contiguous()
    held = images[order[available:]].float().contiguous() if n_select else None
    return pool, held, n_train


def _counts_since(victim: Victim, start: tuple[int | None, int | None]) -> tuple[int | None, int | None]:
    now = read_counts(victim)
    return tuple(  # type: ignore[return-value]
        None if a is None or b is None else a - b for a, b in zip(now, start, strict=True)
    )


def _lr_factor(config: AttackConfig, epoch: int) -> float:
    """Step schedule of the authors' code: lr times gamma at each milestone passed."""
    return config.lr_gamma ** sum(1 for m in config.lr_milestones if epoch >= m)


def train_generator(
    victim: Victim,
    images: torch.Tensor,
    config: AttackConfig,
    *,
    progress: bool = True,
    source: GradientSource | None = None,
    on_epoch_end: EpochHook | None = None,
    resume: Mapping[str, Any] | None = None,
) -> AttackResult:
    """Train a generator against ``victim`` on ``images`` (float N x C x H x W in [0, 1]).

    Clean memberships M_i are queried once per training image and cached. The gradient of
    the attack term comes from ``config.gradient_source``; in the black-box modes the
    victim is reached only through ``predict_proba`` on detached inputs. A
    ``BudgetExceeded`` from the victim ends the run cleanly: the generator as trained so
    far, the history and the query counts are returned with ``stopped`` set to
    "budget_exhausted".

    With ``config.select_images`` that many images are held out of training; after each
    epoch the victim is asked about their perturbations (history key ``select_score``) and
    the generator of the best-scored epoch is the one returned (``selected_epoch``).

    Epoch by epoch (a Tune trial): ``on_epoch_end(result, state)`` runs after each epoch
    and returns True to stop. ``state`` holds everything needed to continue (epoch,
    generator, discriminator and optimiser states, RNG, history, query counts so far, the
    cached clean memberships; live tensors, so save or copy them before returning) and is
    what ``resume`` takes back: training then continues at the next epoch without
    querying the clean memberships again. The state also holds the gradient source's own
    (``GradientSource.state_dict``: a surrogate's fine-tuned ensemble, optimisers, RNG and
    every point queried for it), so a resumed surrogate or estimate run goes on exactly as
    the uninterrupted one; a state saved without it (older checkpoints) re-distils the
    surrogate from the cached memberships instead.
    """
    from tqdm.auto import tqdm

    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(victim.input_shape):
        raise ValueError(
            f"images must be N x {' x '.join(map(str, victim.input_shape))} to match the victim, "
            f"got {tuple(images.shape)}"
        )
    if config.target_cluster is not None and config.target_cluster >= victim.num_clusters:
        raise ValueError(
            f"target_cluster must lie in 0..{victim.num_clusters - 1}, got {config.target_cluster}"
        )
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    rng = torch.Generator().manual_seed(config.seed)
    device = torch.device(config.device)
    shape = tuple(int(v) for v in victim.input_shape)

    pool, held, n_train = training_split(images, config, rng)
    held_clean: torch.Tensor | None = None
    best: dict[str, Any] | None = None
    selection_used = 0  # image-queries of the hold-out so far (0 when the counter is missing)

    generator = Generator(shape, config.generator_width, config.generator_blocks).to(device)
    discriminator = Discriminator(shape, config.discriminator_width).to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr)
    source = source or make_gradient_source(victim, config)
    result = AttackResult(config, generator, discriminator, source.describe())
    tracker = ConvergenceTracker(config.converge_tol, config.converge_patience)
    start_counts = read_counts(victim)
    started = time.perf_counter()
    first_epoch, clean, offset = 1, None, (0, 0)
    if resume is not None:
        first_epoch, clean, offset = _restore(resume, result, tracker, generator, discriminator, opt_g, opt_d, rng)
        if clean is not None and tuple(clean.shape) != (pool.shape[0], victim.num_clusters):
            raise ValueError(
                f"resume state holds clean memberships of shape {tuple(clean.shape)}, expected "
                f"{(pool.shape[0], victim.num_clusters)}: it was made with another config or data set"
            )
        held_clean, best = resume.get("held_clean"), resume.get("selection")
        selection_used = _as_count(resume.get("selection_queries")) or 0

    def counts_so_far() -> tuple[int | None, int | None]:
        used = _counts_since(victim, start_counts)
        return tuple(None if u is None else u + o for u, o in zip(used, offset, strict=True))  # type: ignore[return-value]

    def perturb(x: torch.Tensor) -> torch.Tensor:
        return perturb_images(generator, x, config)

    steps_per_epoch = math.ceil(n_train / config.batch_size)
    bar = tqdm(
        total=(config.epochs - first_epoch + 1) * steps_per_epoch,
        desc=f"attack[{config.gradient_source}]",
        disable=not progress,
    )
    try:
        if clean is None:
            clean = query_memberships(victim, pool, config.query_batch)
        if held is not None and held_clean is None:
            before = read_counts(victim)
            held_clean = query_memberships(victim, held, config.query_batch).argmax(1)
            selection_used += _counts_since(victim, before)[0] or 0
        resolved, result.mi_temperature = term_config(config, clean)
        source_state = None if resume is None else resume.get("source")
        if source_state:
            source.resume(pool, clean, source_state, progress=progress)
        else:
            if resume is not None and "source" not in resume:
                log.warning(
                    "the resume state predates gradient-source states: the %s source is prepared afresh",
                    source.name,
                )
            source.prepare(pool, clean, progress=progress)
        train_x, train_m = pool[:n_train], clean[:n_train]
        for epoch in range(first_epoch, config.epochs + 1):
            for opt in (opt_g, opt_d):
                for group in opt.param_groups:
                    group["lr"] = config.lr * _lr_factor(config, epoch - 1)
            sums: dict[str, float] = {}
            seen = 0
            perm = torch.randperm(n_train, generator=rng)
            for start in range(0, n_train, config.batch_size):
                idx = perm[start : start + config.batch_size]
                if idx.numel() < 2:
                    continue  # a one-image batch has no mutual information to speak of
                stats = _step(
                    generator, discriminator, opt_g, opt_d, source, resolved,
                    train_x[idx].to(device), train_m[idx].to(device),
                )
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value * idx.numel()
                seen += idx.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss_g']:.4f}", refresh=False)
            row = {key: value / max(seen, 1) for key, value in sums.items()}
            row["epoch"] = float(epoch)
            row.update(source.end_of_epoch(epoch, perturb, train_x))
            if held is not None:
                before = read_counts(victim)
                score = _selection_score(victim, perturb(held), held_clean, config)
                selection_used += _counts_since(victim, before)[0] or 0
                row["select_score"] = score
                row["select_image_queries"] = float(selection_used)
                if best is None or score < best["score"]:
                    best = {"epoch": epoch, "score": score, "generator": _copy_state(generator)}
            used = counts_so_far()
            row["image_queries"] = float("nan") if used[0] is None else float(used[0])
            row["calls"] = float("nan") if used[1] is None else float(used[1])
            result.history.append(row)
            log.info("epoch %d: %s", epoch, {k: round(v, 5) for k, v in row.items()})
            converged_stop = False
            if tracker.update(epoch, row["loss_g"]):
                result.converged_epoch = epoch
                result.image_queries_at_convergence, result.calls_at_convergence = used
                log.info("generator loss converged at epoch %d (%s image-queries)", epoch, used[0])
                if config.stop_at_convergence:
                    result.stopped = STOP_CONVERGED
                    converged_stop = True
            if on_epoch_end is not None:
                state = {
                    "epoch": epoch,
                    "generator": generator.state_dict(),
                    "discriminator": discriminator.state_dict(),
                    "opt_g": opt_g.state_dict(),
                    "opt_d": opt_d.state_dict(),
                    "rng": rng.get_state(),
                    "history": [dict(r) for r in result.history],
                    "counts": used,
                    "clean": clean,
                    "held_clean": held_clean,
                    "selection": best,
                    "selection_queries": selection_used,
                    "source": source.state_dict(),
                }
                if on_epoch_end(result, state) and not converged_stop:
                    result.stopped = STOP_CALLER
                    break
            if converged_stop:
                break
    except BudgetExceeded as err:
        result.stopped = STOP_BUDGET
        result.error = str(err)
        log.warning("query budget exhausted after %d epochs: %s", len(result.history), err)
    finally:
        bar.close()
        source.close()
        if best is not None:
            # Also after a budget exit: the best epoch scored so far is the generator kept.
            generator.load_state_dict(best["generator"])
            result.selected_epoch = int(best["epoch"])
            log.info("kept the generator of epoch %d (selection score %.4f)", best["epoch"], best["score"])
        generator.eval()
        discriminator.eval()
        result.image_queries, result.calls = counts_so_far()
        if held is not None and result.image_queries is not None:
            result.selection_image_queries = selection_used
        result.seconds = time.perf_counter() - started
    return result


def _copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _selection_score(
    victim: Victim, perturbed: torch.Tensor, clean_labels: torch.Tensor, config: AttackConfig
) -> float:
    """Lower is a stronger attack: NMI between clean and perturbed victim assignments of the
    held-out images, or for a targeted run the fraction left outside the target cluster."""
    from sklearn.metrics import normalized_mutual_info_score

    labels = query_memberships(victim, perturbed, config.query_batch).argmax(1)
    if config.target_cluster is not None:
        return float((labels != config.target_cluster).float().mean())
    return float(normalized_mutual_info_score(clean_labels.numpy(), labels.numpy()))


def _restore(
    state: Mapping[str, Any],
    result: AttackResult,
    tracker: ConvergenceTracker,
    generator: Generator,
    discriminator: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    rng: torch.Generator,
) -> tuple[int, torch.Tensor | None, tuple[int, int]]:
    """Load a state given to ``on_epoch_end``; returns (next epoch, clean memberships, counts)."""
    missing = {"epoch", "generator", "discriminator", "opt_g", "opt_d", "rng", "history"} - set(state)
    if missing:
        raise ValueError(f"resume state lacks {sorted(missing)}; pass the state given to on_epoch_end")
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["opt_g"])
    opt_d.load_state_dict(state["opt_d"])
    rng.set_state(state["rng"])
    result.history = [dict(row) for row in state["history"]]
    # Replaying the losses restores the convergence rule (and its query complexity) exactly.
    for row in result.history:
        if tracker.update(int(row["epoch"]), float(row["loss_g"])):
            result.converged_epoch = int(row["epoch"])
            result.image_queries_at_convergence = _as_count(row.get("image_queries"))
            result.calls_at_convergence = _as_count(row.get("calls"))
    counts = tuple(0 if c is None else int(c) for c in state.get("counts") or (0, 0))
    return int(state["epoch"]) + 1, state.get("clean"), counts  # type: ignore[return-value]


def _as_count(value: Any) -> int | None:
    return None if value is None or not math.isfinite(float(value)) else int(value)


def _step(
    generator: Generator,
    discriminator: Discriminator,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    source: GradientSource,
    config: AttackConfig,
    x: torch.Tensor,
    clean: torch.Tensor,
) -> dict[str, float]:
    """One discriminator step and one generator step on a batch; returns batch statistics.

    Under ``config.precision`` "bf16" the networks run in autocast; the perturbed images
    (what a victim is queried on), memberships and losses are fp32.
    """
    with autocast(x.device, config.precision):
        x_adv, _, g = generator.perturb(x, config.norm, config.eps, config.hard_clamp)
    x_adv, g = x_adv.float(), g.float()
    loss_d = torch.zeros(())
    if config.alpha_gan > 0:
        with autocast(x.device, config.precision):
            real, fake = discriminator(x), discriminator(x_adv.detach())
        loss_d = discriminator_loss(real.float(), fake.float(), config.gan_loss)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

    with autocast(x.device, config.precision):
        perturbed = source.memberships(x_adv)
        judged = discriminator(x_adv) if config.alpha_gan > 0 else None
    perturbed = perturbed.float()
    attack = config_objective(clean, perturbed, config)
    gan = generator_gan_loss(judged.float(), config.gan_loss) if judged is not None else torch.zeros(())
    constraint = constraint_penalty(g, config.norm, config.eps)
    loss_g = config.alpha_gan * gan + config.alpha_a * attack + config.alpha_c * constraint
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    source.after_step()
    # Gradients reach the discriminator through the generator's loss as well; clear them
    # so its next step sees only its own loss.
    opt_d.zero_grad(set_to_none=True)
    with torch.no_grad():
        changed = (perturbed.argmax(1) != clean.argmax(1)).float().mean()
        distance = membership_distance(clean, perturbed)
    return {
        "loss_g": float(loss_g.detach()),
        "loss_d": float(loss_d.detach()),
        "attack_term": float(attack.detach()),
        "gan_g": float(gan.detach()),
        "constraint": float(constraint.detach()),
        "membership_distance": float(distance),
        "changed_fraction": float(changed),
    }

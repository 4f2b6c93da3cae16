"""The query-efficient recipe against a served victim: its query count is the ledger's, to the image."""

from __future__ import annotations

import pytest
import torch

from clusterattack.attacks import AttackConfig, train_generator
from clusterattack.attacks.recipes import apply_recipe
from clusterattack.serving.client import ServedVictim
from tests.serving.conftest import tiny_images

pytestmark = pytest.mark.slow


def test_the_fast_recipes_queries_are_exactly_what_the_ledger_charged(serve_env, tmp_path, monkeypatch):
    monkeypatch.setenv("CLUSTERATTACK_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    # The recipe's shape (pretext ensemble of two, online queries on half of each batch,
    # refresh rounds, a hold-out), sized for 8x8 images and seconds.
    config = AttackConfig(eps=0.2, generator_width=4, generator_blocks=1, discriminator_width=4).override(
        **apply_recipe("fast", {
            "epochs": 3, "train_limit": 96, "batch_size": 32, "select_images": 16, "surrogate.distill_queries": 96,
            "surrogate.distill_epochs": 1, "surrogate.pretext_epochs": 1, "surrogate.refresh_queries": 24,
            "surrogate.batch_size": 32,
        })
    )  # fmt: skip
    assert config.surrogate.online_fraction == 0.5 and config.surrogate.ensemble == 2
    api_key, key_id = serve_env.new_key(budget=10_000)
    images = torch.from_numpy(tiny_images(112, seed=5))
    with ServedVictim(serve_env.scores_handle, api_key, chunk_size=32) as victim:
        result = train_generator(victim, images, config, progress=False)
        assert result.stopped == "completed"
        used = serve_env.admin.key_status(key_id).used
        # Everything the attack asked, the client's count and the server's ledger agree.
        assert result.image_queries == victim.image_queries == used
    # 96 clean memberships, 16 held out once clean and once per epoch, half of each of the 3
    # batches of 32 online per epoch, and two refresh rounds of 24 (after epochs 1 and 2).
    assert used == 96 + 16 * 4 + 3 * (3 * 16) + 2 * 24
    assert result.selection_image_queries == 16 * 4

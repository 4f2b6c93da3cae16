"""The replicas' ledger client against the real ledger actor: concurrent calls travel in waves."""

from __future__ import annotations

import asyncio

import pytest

from clusterattack.serving.errors import BudgetExceeded
from clusterattack.serving.ledger_actor import AsyncLedgerClient
from clusterattack.serving.ledger_records import hash_api_key

pytestmark = pytest.mark.slow


def test_concurrent_reserves_and_commits_coalesce_and_stay_exact(serve_env):
    api_key, key_id = serve_env.new_key(budget=50)
    key_hash = hash_api_key(api_key)

    async def run():
        client = AsyncLedgerClient(serve_env.ledger_config)

        async def reserve(i: int):
            try:
                return await client.call("reserve", key_hash, 1, f"req-{i}", f"digest-{i}")
            except BudgetExceeded as exc:
                return exc

        answers = await asyncio.gather(*(reserve(i) for i in range(60)))
        reserved = [a for a in answers if not isinstance(a, BudgetExceeded)]
        after_reserve = client.actor_calls
        commits = await asyncio.gather(*(client.call("commit", key_hash, a.request_id) for a in reserved))
        return answers, reserved, commits, after_reserve, client.actor_calls

    answers, reserved, commits, after_reserve, total_calls = asyncio.run(run())
    # Exactly the budget is reserved; the refusals are typed errors naming what remains.
    assert len(reserved) == 50 and len(answers) - len(reserved) == 10
    assert all(isinstance(a, BudgetExceeded) and a.remaining == 0 for a in answers if a not in reserved)
    assert sorted(c.request_id for c in commits) == sorted(a.request_id for a in reserved)
    # 60 reserves and 50 commits took far fewer round trips than 110: they went in waves.
    assert after_reserve < 60 and total_calls - after_reserve < 50
    assert serve_env.admin.audit(key_id) == {"reserved": 0, "committed": 50, "refunded": 0, "used": 50}

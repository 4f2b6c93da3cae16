"""The tiny sweep end to end in this process: search per eps, seed runs, label-free choices.

Three sweeps share one MLflow store (the victim is trained once, by the first):

- ``main``: the tiny preset under the ``strong`` recipe (flags winning where the tiny data
  needs them), one trial at a time; one trial's worker is killed after its first epoch;
- ``poisoned``: the same sweep on a copy of the data whose test labels are shuffled, no
  kill. Labels may reach nothing but the final scores, so every choice and every
  generator must be the same, seed for seed;
- ``spent``: one trial and one seed run whose key runs out of budget in epoch 3.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch
from ray import tune

pytestmark = pytest.mark.slow

# The strong recipe on 8x8 digits: its two-member ensemble stays, the rest is sized down.
RECIPE_FLAGS = {
    "surrogate.arch": "small", "surrogate.refresh_rounds": 0, "epochs": 3,
}  # fmt: skip


class KillAfterFirstCheckpoint(tune.Callback):
    """SIGKILLs the worker process of the first search trial whose epoch-1 checkpoint is saved, once."""

    def __init__(self) -> None:
        self.killed: tuple[str, int] | None = None
        self.before: dict | None = None

    def on_trial_save(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.killed is None and result.get("epoch") == 1 and "final" not in trial.config:
            self.killed = (trial.trial_id, int(result["pid"]))
            self.before = dict(result)
            os.kill(int(result["pid"]), signal.SIGKILL)


def _poisoned_copy(src: str, dst: str) -> None:
    """The data set at ``src`` with its test labels shuffled across images (a mere renaming of the
    classes would leave NMI, ARI and ACC as they are)."""
    from clusterattack.data import read_parquet_dataset, write_parquet_dataset
    from clusterattack.data.parquet import read_manifest

    data = read_parquet_dataset(src)
    labels = data.labels.copy()
    test = data.split == "test"
    labels[test] = np.random.default_rng(0).permutation(labels[test])
    poisoned = type(data)(data.name, data.images, labels, data.split, data.class_names, data.source)
    write_parquet_dataset(poisoned, dst, spec=read_manifest(src)["spec"])


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    from clusterattack.tuning.sweep import run_sweep
    from tests.tuning.helpers import private_store, tiny_config

    tmp = tmp_path_factory.mktemp("sweep")
    with private_store(tmp):
        main = tiny_config(tmp, "main", recipe="strong", max_concurrent=1, **RECIPE_FLAGS)
        killer = KillAfterFirstCheckpoint()
        outcomes = {"main": run_sweep(main, callbacks=[killer])}
        _poisoned_copy(str(tmp / "data" / "digits"), str(tmp / "poisoned" / "digits"))
        poisoned = tiny_config(tmp, "poisoned", "poisoned", recipe="strong", max_concurrent=1, **RECIPE_FLAGS)
        outcomes["poisoned"] = run_sweep(poisoned)
        spent = tiny_config(tmp, "spent", eps_grid=(0.1,), num_samples=1, seeds=1, budget=1_500)
        outcomes["spent"] = run_sweep(spent)
        yield tmp, {"main": main, "poisoned": poisoned, "spent": spent}, outcomes, killer


def _client(tmp):
    from tests.tuning.helpers import mlflow_client

    return mlflow_client(tmp)


def _runs(tmp, name):
    from tests.tuning.helpers import sweep_runs

    parent, children = sweep_runs(_client(tmp), name)
    search = [c for c in children if c.data.tags.get("phase") == "search"]
    finals = [c for c in children if c.data.tags.get("phase") == "final"]
    assert len(search) + len(finals) == len(children)
    return parent, search, finals


def test_sweep_records_search_trials_seed_runs_tables_and_generators(swept):
    import mlflow.pytorch
    import pandas as pd

    from clusterattack.tuning.summary import TABLE1, TABLE2

    tmp, configs, outcomes, _ = swept
    config, outcome = configs["main"], outcomes["main"]
    assert not outcome.interrupted
    client = _client(tmp)
    parent, search, finals = _runs(tmp, "main")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["selection"] == "label_free" and parent.data.tags["recipe"] == "strong"
    assert parent.data.tags["eps_grid"] == "0.1,0.2" and parent.data.metrics["rows"] == 2

    # num_samples trials per eps; seeds runs per eps; parameters named alike in every run.
    assert len(search) == 2 * config.num_samples and len(finals) == 2 * config.seeds
    assert len({frozenset(c.data.params) for c in search + finals}) == 1
    for child in search + finals:
        assert child.info.status == "FINISHED"
        params = child.data.params
        assert params["gradient_source"] == "surrogate" and params["selection"] == "label_free"
        # The recipe reached the trials (its ensemble of two), the flags won over it (3 epochs).
        assert params["recipe"] == "strong" and params["surrogate.ensemble"] == "2" and params["epochs"] == "3"
        assert 0 < child.data.metrics["image_queries"] <= config.budget
    for child in search:
        # A label-free search trial reports its own score and never a test-set score.
        assert "objective" in child.data.metrics and "select_score" in child.data.metrics
        assert not {"nmi_post", "nmi_pre", "acc_post", "ari_post"} & set(child.data.metrics)
        assert child.info.run_name.startswith(f"cc-digits-surrogate-eps{float(child.data.params['eps']):g}-")
    for child in finals:
        eps = float(child.data.params["eps"])
        assert child.data.metrics["final"] == 1.0 and 0.0 <= child.data.metrics["nmi_post"] <= 1.0
        # The norm bound holds on every scored image, not only on average.
        assert child.data.metrics["linf_max"] <= eps + 1e-6
        assert child.info.run_name == f"cc-digits-surrogate-eps{eps:g}-seed{child.data.params['seed']}"

    # Seeds: per eps, distinct child runs with fresh seeds and one configuration, the chosen trial's.
    table1 = pd.read_parquet(outcome.tables[TABLE1]["parquet"])
    assert list(table1["eps"]) == [0.1, 0.2] and set(table1["selection"]) == {"label_free"}
    by_trial = {c.data.tags["trial_id"]: c for c in search}
    for row in table1.to_dict("records"):
        runs = [c for c in finals if float(c.data.params["eps"]) == row["eps"]]
        assert sorted(int(c.data.params["seed"]) for c in runs) == [1, 2] and row["seeds"] == "1,2"
        chosen = by_trial[row["best_trial"]].data.params
        for c in runs:
            assert (c.data.params["alpha_a"], c.data.params["alpha_c"]) == (chosen["alpha_a"], chosen["alpha_c"])
        scores = [c.data.metrics["nmi_post"] for c in runs]
        assert row["nmi_post"] == pytest.approx(np.mean(scores))
        assert row["nmi_post_std"] == pytest.approx(np.std(scores, ddof=1))

    # Tables: MLflow tables plus CSV and Parquet, on the parent run and on disk.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    for name in (TABLE1, TABLE2):
        assert {f"tables/{name}.json", f"tables/{name}.csv", f"tables/{name}.parquet"} <= artifacts
    table2 = pd.read_parquet(outcome.tables[TABLE2]["parquet"])
    for row in table2.to_dict("records"):
        assert row["calls_256"] == -(-int(np.ceil(row["image_queries"])) // 256)
        assert row["search_trials"] == config.num_samples
        assert row["sweep_image_queries"] == row["search_image_queries"] + row["final_image_queries"]

    # Each eps's generator is registered, tagged with how it was chosen, and perturbs 8x8 digits.
    assert set(outcome.generators) == {"cc-digits-surrogate-eps0.1", "cc-digits-surrogate-eps0.2"}
    for key, registered in outcome.generators.items():
        name, _, version = registered.partition("/")
        tags = client.get_model_version(name, version).tags
        assert tags["selection"] == "label_free" and f"eps{float(tags['eps']):g}" in key
        assert tags["trial_id"] in {c.data.tags["trial_id"] for c in finals}
        generator = mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu")
        with torch.no_grad():
            assert generator(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_the_best_trial_is_chosen_within_each_eps(swept):
    import pandas as pd

    from clusterattack.tuning.summary import TABLE1

    tmp, _, outcomes, _ = swept
    _, search, _ = _runs(tmp, "main")
    table1 = pd.read_parquet(outcomes["main"].tables[TABLE1]["parquet"])
    for row in table1.to_dict("records"):
        same_eps = [c for c in search if float(c.data.params["eps"]) == row["eps"]]
        best = min(
            min(m.value for m in _client(tmp).get_metric_history(c.info.run_id, "objective")) for c in same_eps
        )
        chosen = next(c for c in search if c.data.tags["trial_id"] == row["best_trial"])
        assert float(chosen.data.params["eps"]) == row["eps"]  # never a trial of another eps
        assert row["search_objective"] == pytest.approx(best)


def test_selection_queries_are_the_attackers_charged_to_its_key_and_in_table_2(swept):
    import sqlite3

    import pandas as pd

    from clusterattack.tuning.summary import TABLE2

    tmp, configs, outcomes, _ = swept
    config = configs["main"]
    attack = config.attack
    _, search, finals = _runs(tmp, "main")
    table2 = pd.read_parquet(outcomes["main"].tables[TABLE2]["parquet"])
    epochs = attack.epochs
    # The hold-out's clean memberships once, then its perturbations after every epoch.
    selection = attack.select_images * (1 + epochs)
    assert set(table2["selection_image_queries"]) == {selection}
    # ... on top of the attack's own: the pool's clean memberships and one online query per
    # training image per epoch (the tiny surrogate distils on the generator's 384 images).
    assert set(table2["image_queries"]) == {attack.train_limit * (1 + epochs) + selection}
    # Scoring is the experimenter's: clean and perturbed test images, counted apart.
    assert set(table2["scoring_image_queries"]) == {2 * config.eval_limit}
    # The ledger (the sweep's sqlite file, read as it is) charged each run's own key exactly
    # what the run reports, search trials and seed runs alike.
    with sqlite3.connect(tmp / "sweeps" / "main" / "ledger.sqlite") as conn:
        used = dict(conn.execute("SELECT name, used FROM api_keys").fetchall())
    for child in search + finals:
        assert used[f"trial-{child.data.tags['trial_id']}"] == child.data.metrics["image_queries"]


def test_labels_cannot_influence_selection(swept):
    """Scrambled test labels change the scores, and nothing else: choices and generators match."""
    import pandas as pd

    from clusterattack.tuning.summary import TABLE1

    tmp, _, outcomes, _ = swept
    client = _client(tmp)
    tables = {n: pd.read_parquet(outcomes[n].tables[TABLE1]["parquet"]) for n in ("main", "poisoned")}
    clean, poisoned = tables["main"], tables["poisoned"]
    # The labels did reach the scores: the victim's own NMI against scrambled labels differs.
    assert not np.allclose(clean["nmi_pre"], poisoned["nmi_pre"])
    # Every choice is the same: per eps, the chosen configuration and its search score.
    for column in ("eps", "alpha_a", "alpha_c", "mi_temperature", "search_objective", "seeds"):
        assert list(clean[column]) == list(poisoned[column]), column
    # The search trials asked and scored the same, trial by trial (the main sweep's killed
    # trial resumed from its checkpoint, which changes nothing either).
    objectives = {}
    for name in ("main", "poisoned"):
        _, search, finals = _runs(tmp, name)
        objectives[name] = sorted(
            (c.data.params["eps"], c.data.params["alpha_a"], c.data.metrics["objective"]) for c in search
        )
        assert all(float(c.data.metrics["select_score"]) >= 0 for c in finals)
    assert objectives["main"] == objectives["poisoned"]
    # The seed runs trained the same generators, seed for seed.
    for key, registered in outcomes["main"].generators.items():
        weights = []
        for outcome in (outcomes["main"], outcomes["poisoned"]):
            name, _, version = outcome.generators[key].partition("/")
            assert client.get_model_version(name, version).tags["seed"] == client.get_model_version(
                *registered.partition("/")[::2]
            ).tags["seed"]
            import mlflow.pytorch

            weights.append(mlflow.pytorch.load_model(f"models:/{name}/{version}", map_location="cpu").state_dict())
        assert weights[0].keys() == weights[1].keys()
        for k in weights[0]:
            assert torch.equal(weights[0][k], weights[1][k]), (key, k)


def test_killed_trial_is_retried_from_its_checkpoint_and_completes(swept):
    tmp, configs, _, killer = swept
    assert killer.killed is not None, "no trial reported epoch 1"
    trial_id, _ = killer.killed
    client = _client(tmp)
    _, search, _ = _runs(tmp, "main")
    run = next(c for c in search if c.data.tags["trial_id"] == trial_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.data.tags["failures"] == "1"
    # It went on past the epoch it was killed after, from that epoch's checkpoint: the
    # epochs continue without repeating, and nothing was queried twice (same key, cached
    # clean memberships): the count is what it was before the kill plus, per epoch run
    # after it, the online queries (each training image once) and the hold-out's.
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert max(m.value for m in restarts) == 1
    attack = configs["main"].attack
    assert attack.surrogate.online  # the tiny preset trains online: the check below counts its queries
    per_epoch = attack.train_limit + attack.select_images
    extra = per_epoch * (len(epochs) - killer.before["epoch"])
    assert run.data.metrics["image_queries"] == killer.before["image_queries"] + extra


def test_a_trial_that_runs_out_of_budget_inside_tune_is_recorded_as_such(swept):
    import pandas as pd

    from clusterattack.tuning.summary import TABLE1, TABLE2

    tmp, configs, outcomes, _ = swept
    budget = configs["spent"].budget
    _, search, finals = _runs(tmp, "spent")
    assert len(search) == 1 and len(finals) == 1
    for run in search + finals:
        # Two epochs cost 384 + 64 + 2 x 448 = 1,344 image-queries; the third runs out.
        assert run.data.tags["budget_exhausted"] == "True" and run.data.metrics["budget_exhausted"] == 1
        assert run.data.tags["stopped_early"] == "False"
        assert 1_344 < run.data.metrics["image_queries"] <= budget
        assert run.data.metrics["budget_remaining"] < 448
    # The seed run is still scored, on the epoch its hold-out chose, and makes its table rows.
    table1 = pd.read_parquet(outcomes["spent"].tables[TABLE1]["parquet"])
    table2 = pd.read_parquet(outcomes["spent"].tables[TABLE2]["parquet"])
    assert len(table1) == 1 and 0.0 <= table1["nmi_post"].iloc[0] <= 1.0
    assert table2["image_queries"].iloc[0] <= budget and table2["budget"].iloc[0] == budget
    assert finals[0].data.metrics["selected_epoch"] in (1.0, 2.0)


def test_the_sweep_exports_its_tables_as_a_results_record(swept, tmp_path):
    from clusterattack.reports.records import load_record, render_table
    from clusterattack.tuning.export import export_sweep_record

    tmp, configs, outcomes, _ = swept
    path = export_sweep_record(outcomes["main"], "sweep-main", folder=tmp_path)
    record = load_record(path)  # validated against the schema: full provenance, stats over seeds
    assert record.provenance == "full" and len(record.rows) == 2
    common = record.common
    assert common["sweep"] == "main" and len(common["commit"]) == 40 and isinstance(common["dirty"], bool)
    assert "CPUs" in common["machine"] or "GPU" in common["machine"]
    for row, table_row in zip(record.rows, outcomes["main"].table1, strict=True):
        assert (row["eps"], row["selection"], row["recipe"], row["seeds"]) == (table_row["eps"], "label_free", "strong", [1, 2])
        assert row["metrics"]["nmi_drop"]["n"] == 2
        assert row["metrics"]["nmi_post"]["mean"] == pytest.approx(table_row["nmi_post"])
        assert row["calls_256"] == -(-row["image_queries"] // 256)
    assert "label_free" in render_table(record)


def test_a_completed_sweep_read_back_exports_the_same_record(swept, tmp_path):
    # jobs/sweep.py --resume --record NAME on a completed sweep: the record comes from its folder
    # (state file and saved tables) and the parent run's code tags, not from this process.
    from clusterattack.reports.records import load_record
    from clusterattack.tuning.export import completed_outcome, export_sweep_record

    tmp, configs, outcomes, _ = swept
    live = load_record(export_sweep_record(outcomes["main"], "live", folder=tmp_path / "live"))
    reread = completed_outcome(configs["main"])
    assert reread.reread and reread.parent_run_id == outcomes["main"].parent_run_id
    again = load_record(export_sweep_record(reread, "again", folder=tmp_path / "again"))
    named = ("victim", "victim_version", "gradient_source", "eps", "selection", "recipe", "seeds", "image_queries",
             "calls", "generator")  # fmt: skip
    assert len(again.rows) == len(live.rows) == 2
    for read, made in zip(again.rows, live.rows, strict=True):
        assert {k: read.get(k) for k in named} == {k: made.get(k) for k in named}
        assert read["metrics"].keys() == made["metrics"].keys()
        for name, stat in made["metrics"].items():  # the saved tables hold 15 significant digits
            assert read["metrics"][name].keys() == stat.keys(), name
            for field, value in stat.items():
                expected = pytest.approx(value, rel=1e-12, abs=1e-15) if isinstance(value, float) else value
                assert read["metrics"][name][field] == expected, (name, field)
    parent = _client(tmp).get_run(outcomes["main"].parent_run_id)
    assert again.common["commit"] == parent.data.tags["clusterattack.git_commit"]
    assert again.common["command"].startswith("jobs/sweep.py --preset tiny (sweep main); exported by: ")
    assert again.common["wall_s"] >= live.common["wall_s"] - 0.1  # the state's total over invocations

"""jobs/sweep.py flags become the SweepConfig they describe; bad ones fail with exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from clusterattack.tuning.space import ParamSpec

_PATH = Path(__file__).resolve().parents[2] / "jobs" / "sweep.py"
_spec = importlib.util.spec_from_file_location("jobs_sweep", _PATH)
sweep_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_cli)


def _config(*argv: str):
    return sweep_cli.build_config(sweep_cli.parse_args(list(argv)))


def test_flags_set_targets_space_resources_and_attack():
    config = _config(
        "--preset", "demo", "--models", "cc,scan,spice", "--datasets", "fashion_mnist,mnist5k",
        "--gradient-source", "estimate,surrogate", "--eps", "0.05,0.1", "--space", "alpha_c=uniform:0.5:2",
        "--num-samples", "4", "--budget", "5000", "--epochs", "4", "--cpus-per-trial", "2", "--max-concurrent", "3",
        "--experiment", "flags", "--seed", "7", "--time-attr", "image_queries", "--objective", "oracle",
        "--seeds", "3",
    )  # fmt: skip
    assert len(config.targets) == 6 and ("spice", "mnist5k") in config.targets
    assert config.gradient_sources == ("estimate", "surrogate") and config.attack.seed == 7
    assert config.eps_grid == (0.05, 0.1) and (config.objective, config.seeds) == ("oracle", 3)
    assert {s.name: s for s in config.space}["alpha_c"] == ParamSpec("alpha_c", "uniform", 0.5, 2.0)
    assert (config.num_samples, config.budget, config.attack.epochs) == (4, 5000, 4)
    assert (config.cpus_per_trial, config.max_concurrent, config.experiment) == (2.0, 3, "flags")
    assert config.time_attr == "image_queries" and config.asha_max_t == 5000
    assert config.grace_period <= config.attack.epochs


def test_recipe_and_set_reach_the_attack_as_in_the_attack_job():
    config = _config(
        "--preset", "tiny", "--recipe", "strong", "--set", "surrogate.refresh_rounds=0",
        "--set", "select_images=32", "--epochs", "2",
    )  # fmt: skip
    assert config.recipe == "strong" and config.attack.surrogate.ensemble == 2  # from the recipe
    assert config.attack.surrogate.refresh_rounds == 0 and config.attack.select_images == 32  # --set wins
    assert config.attack.epochs == 2


def test_gpus_per_trial_moves_the_attack_to_cuda_and_back():
    assert _config("--preset", "tiny", "--gpus-per-trial", "1").attack.device == "cuda"
    cpu_only = _config("--preset", "paper", "--gpus-per-trial", "0")
    assert cpu_only.attack.device == "cpu" and cpu_only.replica_gpus == 0


def test_bad_flags_exit_with_code_2_and_name_the_value(capsys):
    assert sweep_cli.main(["--preset", "tiny", "--budget", "0"]) == 2
    assert "budget" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--space", "alpha_a=uniform:0.3:0.1"]) == 2
    assert "low < high" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--space", "eps=uniform:0.05:0.2"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--gradient-source", "whitebox"]) == 2
    assert "not black-box" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--eps", "0.1,big"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--set", "eps=0.2"]) == 2
    assert "--eps" in capsys.readouterr().err
    assert sweep_cli.main(["--preset", "tiny", "--set", "surrogate.nope=1"]) == 2
    assert "surrogate.nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_cli.parse_args(["--recipe", "huge"])
    with pytest.raises(SystemExit):
        sweep_cli.parse_args(["--objective", "labels"])


def test_resume_without_a_sweep_to_resume_says_so(tmp_path, capsys):
    assert sweep_cli.main(["--resume", "--storage", str(tmp_path)]) == 2
    assert "no unfinished sweep" in capsys.readouterr().err

"""jobs/serve.py argument parsing: victims, keys and the config they build."""

from __future__ import annotations

import argparse

import pytest

from jobs.serve import build_config, parse_args, parse_key, parse_victim


def test_victims_take_an_app_name_or_derive_one():
    assert parse_victim("cc-fm=models:/victim-cc-fashion_mnist/1") == ("cc-fm", "models:/victim-cc-fashion_mnist/1")
    assert parse_victim("cc/fashion_mnist") == ("cc-fashion_mnist", "cc/fashion_mnist")
    assert parse_victim("runs/checkpoints/scan.pt") == ("scan", "runs/checkpoints/scan.pt")
    with pytest.raises(argparse.ArgumentTypeError, match=r"\[APP=\]SOURCE"):
        parse_victim("app=")


def test_keys_are_name_budget_rate_burst():
    key = parse_key("team-a:60000:2000:4096")
    assert (key.name, key.budget, key.rate_per_s, key.burst) == ("team-a", 60000, 2000.0, 4096.0)
    assert parse_key("b:10").rate_per_s is None
    for bad in ("a", "a:ten", ":5", "a:1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME:BUDGET"):
            parse_key(bad)


def test_arguments_build_a_validated_config():
    args = parse_args(["--victim", "cc/mnist", "--mode", "labels", "--autoscale", "1:3", "--num-gpus", "0.5",
                       "--max-request-mb", "2", "--key", "a:5"])
    config = build_config(args)
    assert (config.mode, config.num_gpus, config.resolved_device) == ("labels", 0.5, "cuda")
    assert config.autoscaling.max_replicas == 3 and config.max_request_bytes == 2 * 1024 * 1024
    assert "autoscaling_config" in config.deployment_options()
    with pytest.raises(ValueError, match="min_replicas"):
        build_config(parse_args(["--victim", "x", "--autoscale", "3:1"]))
    with pytest.raises(SystemExit):
        parse_args(["--victim", "x", "--mode", "logits"])


def test_detection_is_a_policy_of_the_job():
    assert parse_args(["--victim", "cc/mnist"]).detection == "off"
    assert parse_args(["--victim", "cc/mnist", "--detection", "block"]).detection == "block"
    with pytest.raises(SystemExit):
        parse_args(["--victim", "cc/mnist", "--detection", "alarm"])


def test_access_log_is_on_unless_the_config_turns_it_off():
    from clusterattack.serving.config import ServeConfig

    assert "logging_config" not in ServeConfig().deployment_options()
    assert ServeConfig(access_log=False).deployment_options()["logging_config"] == {"enable_access_log": False}

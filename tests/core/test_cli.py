"""The KEY=VALUE option every job's --set takes."""

from __future__ import annotations

import argparse

import pytest

from clusterattack.cli import key_value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("estimator.samples=4", ("estimator.samples", 4)),
        ("lr=1e-3", ("lr", 0.001)),
        ("online=true", ("online", True)),
        ("lr_milestones=[50, 80]", ("lr_milestones", [50, 80])),
        ("arch=resnet", ("arch", "resnet")),  # not JSON: kept as the string
        ("path=a=b", ("path", "a=b")),  # only the first '=' splits
        ("name=", ("name", "")),
    ],
)
def test_values_parse_as_json_or_stay_strings(text, expected):
    assert key_value(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", ""])
def test_a_malformed_pair_is_an_argparse_error(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
        key_value(text)

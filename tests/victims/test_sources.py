"""Victim specifications: the grammar, every kind of source, and every bad spec failing before a query."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterattack.attacks import AttackConfig, CountingVictim
from clusterattack.attacks.gan import perturb_images, train_generator
from clusterattack.attacks.gradients import query_memberships
from clusterattack.victims.registry import get_spec
from clusterattack.victims.sources import (
    DecisionOnlyError,
    OneHotMemberships,
    VictimAnswerError,
    VictimSpecError,
    for_gradient_source,
    parse_victim_spec,
    resolve_victim,
)
from clusterattack.victims.sources.export import export_onnx, export_torchscript

HERE = Path(__file__).resolve().parent
MODELS = HERE / "own_models.py"
SHAPE = (1, 8, 8)


def spec(factory: str, options: str = "") -> str:
    return f"{MODELS}:{factory}" + (f"?{options}" if options else "")


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- grammar
@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        ("victim-cc-fashion_mnist", "registry", "victim-cc-fashion_mnist"),
        ("cc/fashion_mnist", "registry", "victim-cc-fashion_mnist"),
        ("runs/checkpoints/cc.pt", "file", "runs/checkpoints/cc.pt"),
        ("models:/victim-cc-digits/3", "mlflow", "models:/victim-cc-digits/3"),
        ("runs:/abc123/model", "mlflow", "runs:/abc123/model"),
        ("mlflow:/tmp/my-model", "mlflow", "/tmp/my-model"),
        ("py:examples.sklearn_digits:build", "python", "examples.sklearn_digits:build"),
        ("examples/sklearn_digits.py:build?components=8", "python", "examples/sklearn_digits.py:build"),
        ("onnx:models/cc.onnx?clusters=10&output=logits", "onnx", "models/cc.onnx"),
        ("models/cc.onnx", "onnx", "models/cc.onnx"),
        ("torchscript:cc.ts", "torchscript", "cc.ts"),
        ("adapter:service.yaml", "adapter", "service.yaml"),
        ("http://127.0.0.1:8000/cc?x=1", "served", "http://127.0.0.1:8000/cc?x=1"),
    ],
)
def test_parse_names_the_kind_and_target(text, kind, target):
    parsed = parse_victim_spec(text)
    assert (parsed.kind, parsed.target) == (kind, target)


def test_parse_reads_options_and_display_names():
    parsed = parse_victim_spec("onnx:m/cc.onnx?clusters=10&shape=1,28,28&output=logits")
    assert dict(parsed.options) == {"clusters": "10", "shape": "1,28,28", "output": "logits"}
    assert parsed.display_name == "cc"
    assert parse_victim_spec("py:examples.sklearn_digits:build").display_name == "sklearn_digits.build"
    assert parse_victim_spec("py:a.b:f?name=mine").display_name == "mine"
    assert parse_victim_spec(("cc", "digits")).target == "victim-cc-digits"


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("onnx:cc.onnx?clusters=1", "clusters must be an integer >= 2"),
        ("onnx:cc.onnx?clusters=ten", "clusters must be an integer >= 2"),
        ("onnx:cc.onnx?shape=28,28", "shape must be C,H,W"),
        ("onnx:cc.onnx?output=scores", "output must be one of"),
        ("onnx:cc.onnx?colour=red", "takes no option \\['colour'\\]"),
        ("victim-cc-digits?clusters=3", "takes no option \\['clusters'\\]"),
        ("py:examples.sklearn_digits", "py:PACKAGE.MODULE:FACTORY"),
        ("py:examples/sklearn digits:build", "not a dotted module name"),
        ("py:examples.x:9lives", "not a Python identifier"),
        ("onnx:cc.onnx?clusters", "key=value"),
        ("onnx:", "names no onnx target"),
        ("", "non-empty string"),
    ],
)
def test_parse_rejects_bad_text_naming_the_fault(text, fault):
    with pytest.raises(VictimSpecError, match=fault):
        parse_victim_spec(text)


# ---------------------------------------------------------------------------- Python factories
def test_python_factory_in_numpy_becomes_a_checked_victim():
    victim = resolve_victim(spec("good"), dataset=SHAPE)
    x = images()
    probs = victim.predict_proba(x)
    assert probs.shape == (16, 3) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(16))
    expected = torch.as_tensor(victim._backend.obj.predict_proba(x.numpy()), dtype=torch.float32)
    torch.testing.assert_close(probs, expected)
    assert victim.predict(x).tolist() == probs.argmax(1).tolist()
    assert victim.describe()["kind"] == "python"


def test_python_factory_options_are_keyword_arguments():
    hot = resolve_victim(spec("good", "temperature=0.1"))
    cold = resolve_victim(spec("good", "temperature=10"))
    x = images()
    assert hot.predict_proba(x).max(1).values.mean() > cold.predict_proba(x).max(1).values.mean()


def test_python_torch_module_is_kept_as_it_is_for_white_box():
    from torch import nn

    victim = resolve_victim(spec("torch_victim"))
    assert isinstance(victim, nn.Module)
    x = images(4).requires_grad_(True)
    victim.predict_proba(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert for_gradient_source(victim, "whitebox") is victim


def test_example_sklearn_digits_factory_by_module_and_by_file():
    victim = resolve_victim("py:examples.sklearn_digits:build?components=8", dataset="digits")
    assert victim.num_clusters == 10 and victim.input_shape == (1, 8, 8)
    from clusterattack.data import load_dataset
    from clusterattack.metrics import clustering_scores

    x, y = load_dataset("digits").subset("test").as_float()
    nmi = clustering_scores(y.numpy(), victim.predict(x).numpy())["nmi"]
    assert nmi > 0.6
    bare = resolve_victim("examples/sklearn_digits.py:build_pipeline?components=8&input=flat", dataset="digits")
    assert bare.num_clusters == 10  # read from its first answer
    torch.testing.assert_close(bare.predict_proba(x[:20]), victim.predict_proba(x[:20]))


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("py:no_such_package.models:build", "no module named 'no_such_package'"),
        (spec("biuld"), "has no attribute 'biuld' \\(it has: .*good"),
        (str(HERE / "nowhere.py") + ":build", "no Python file"),
        (spec("no_predict"), "returned a _Nothing without predict_proba .* or predict"),
        (spec("NOT_A_FACTORY"), "is a int, expected a factory"),
        (spec("good", "bogus=1"), "calling good\\(bogus=1\\) failed"),
        (spec("labels_only", "output=memberships"), "has no predict_proba"),
    ],
)
def test_bad_python_specs_name_the_fault(text, fault):
    with pytest.raises(VictimSpecError, match=fault):
        resolve_victim(text, dataset=SHAPE)


@pytest.mark.parametrize(
    ("factory", "fault"),
    [
        ("logits_model", "negative memberships \\(row \\d+"),
        ("unnormalised", "rows do not sum to 1 \\(row 0 sums to 2"),
        ("nan_model", "NaN memberships \\(row 1"),
    ],
)
def test_memberships_that_are_not_probabilities_fail_at_resolve(factory, fault):
    with pytest.raises(VictimAnswerError, match=fault):
        resolve_victim(spec(factory), dataset=SHAPE)


def test_without_the_probe_the_first_answer_is_checked():
    victim = resolve_victim(spec("unnormalised"), dataset=SHAPE, probe=False)
    with pytest.raises(VictimAnswerError, match="rows do not sum to 1"):
        query_memberships(CountingVictim(victim), images(), 8)


def test_scores_before_a_softmax_are_accepted_as_logits():
    victim = resolve_victim(spec("logits_model", "output=logits"))
    good = resolve_victim(spec("good"))
    torch.testing.assert_close(victim.predict_proba(images()), good.predict_proba(images()))


def test_shape_mismatch_with_the_data_set_fails_naming_both():
    with pytest.raises(VictimSpecError, match="takes images 1x8x8 .* has images 1x28x28"):
        resolve_victim(spec("good"), dataset=(1, 28, 28))
    with pytest.raises(VictimSpecError, match="takes images 1x28x28 .* has images 1x8x8"):
        resolve_victim(spec("wrong_shape"), dataset=SHAPE)
    with pytest.raises(VictimSpecError, match="option clusters=4 contradicts the model, which says 3"):
        resolve_victim(spec("good", "clusters=4"))


# ---------------------------------------------------------------------------- decision-only
def test_decision_only_victims_go_to_the_surrogate_path_and_estimate_refuses():
    victim = resolve_victim(spec("labels_only"))
    assert not hasattr(victim, "predict_proba")
    assert victim.predict(images()).dtype == torch.int64
    seen = for_gradient_source(victim, "surrogate")
    assert isinstance(seen, OneHotMemberships)
    onehot = seen.predict_proba(images())
    assert onehot.sum(1).eq(1).all() and onehot.max(1).values.eq(1).all()
    with pytest.raises(DecisionOnlyError, match="decision-only .*'estimate'.* zero almost everywhere"):
        for_gradient_source(victim, "estimate")
    with pytest.raises(DecisionOnlyError, match="decision-only .*'whitebox'"):
        for_gradient_source(victim, "whitebox")
    with pytest.raises(DecisionOnlyError, match="no autograd graph"):
        for_gradient_source(resolve_victim(spec("good")), "whitebox")


def test_labels_out_of_range_are_caught():
    with pytest.raises(VictimSpecError, match="answers cluster ids and does not say how many clusters"):
        resolve_victim(spec("labels_undeclared"))
    victim = resolve_victim(spec("labels_undeclared", "clusters=2"), probe=False)
    with pytest.raises(VictimAnswerError, match="cluster id 2, outside 0..1"):
        for _ in range(3):
            victim.predict(images(64, seed=_))


# ---------------------------------------------------------------------------- ONNX and TorchScript
def tiny_zoo_victim():
    """A CC victim of width 4 on 8x8 images, seeded (untrained: the export only needs weights)."""
    model_spec = get_spec("cc")
    config = model_spec.config(SHAPE, 3, "demo")
    config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, width=4))
    torch.manual_seed(0)
    return model_spec.build(config).eval()


def blobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(3, *SHAPE, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return (protos[labels] + 0.15 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1), labels


TINY_ATTACK = AttackConfig(
    eps=0.1, epochs=1, train_limit=96, batch_size=32, query_batch=64, gradient_source="surrogate", seed=3,
).override(**{
    "surrogate.distill_queries": 96, "surrogate.distill_epochs": 1, "surrogate.refresh_rounds": 0,
    "surrogate.online": False, "surrogate.width": 4, "surrogate.batch_size": 32,
})


def attack_outcome(victim, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    counted = CountingVictim(victim)
    torch.manual_seed(0)
    result = train_generator(counted, x, TINY_ATTACK, progress=False)
    adv = perturb_images(result.generator, x, TINY_ATTACK)
    return query_memberships(victim, adv, 64).argmax(1), result.image_queries


def test_onnx_export_of_a_zoo_victim_matches_torch_and_the_attack(tmp_path):
    model = tiny_zoo_victim()
    path = export_onnx(model, tmp_path / "cc.onnx")
    victim = resolve_victim(f"onnx:{path}", dataset=SHAPE)
    assert (victim.num_clusters, victim.input_shape, victim.output) == (3, SHAPE, "logits")
    x, _ = blobs(96)
    with torch.no_grad():
        expected = model.predict_proba(x)
    assert (victim.predict_proba(x) - expected).abs().max().item() < 1e-5
    torch_labels, torch_queries = attack_outcome(model, x)
    onnx_labels, onnx_queries = attack_outcome(victim, x)
    assert onnx_queries == torch_queries
    assert torch.equal(onnx_labels, torch_labels)


def test_torchscript_export_matches_and_keeps_autograd(tmp_path):
    model = tiny_zoo_victim()
    victim = resolve_victim(f"torchscript:{export_torchscript(model, tmp_path / 'cc.ts')}")
    x = images(8).requires_grad_(True)
    probs = victim.predict_proba(x)
    with torch.no_grad():
        assert (probs - model.predict_proba(x)).abs().max().item() < 1e-5
    probs[:, 0].sum().backward()
    assert x.grad is not None and for_gradient_source(victim, "whitebox") is victim


def bare_onnx(tmp_path: Path, output_name: str = "out") -> Path:
    path = tmp_path / "bare.onnx"
    torch.onnx.export(
        tiny_zoo_victim(), (images(2),), str(path), dynamo=False, input_names=["x"], output_names=[output_name],
        dynamic_axes={"x": {0: "n"}, output_name: {0: "n"}},
    )
    return path


def test_onnx_without_metadata_asks_for_what_it_cannot_read(tmp_path):
    path = bare_onnx(tmp_path)
    with pytest.raises(VictimSpecError, match="\\?output=logits or \\?output=memberships"):
        resolve_victim(f"onnx:{path}")
    victim = resolve_victim(f"onnx:{path}?output=logits")
    assert victim.num_clusters == 3 and victim.input_shape == SHAPE
    with pytest.raises(VictimSpecError, match="option clusters=5 contradicts the model, which says 3"):
        resolve_victim(f"onnx:{path}?output=logits&clusters=5")
    with pytest.raises(VictimAnswerError, match="negative memberships"):
        resolve_victim(f"onnx:{path}?output=memberships")
    with pytest.raises(VictimSpecError, match="takes images 1x8x8 .* has images 3x32x32"):
        resolve_victim(f"onnx:{path}?output=logits", dataset=(3, 32, 32))
    named = resolve_victim(f"onnx:{bare_onnx(tmp_path, 'logits')}")  # the output's name says it
    assert named.output == "logits"


def test_missing_and_broken_model_files(tmp_path):
    with pytest.raises(VictimSpecError, match="no ONNX file"):
        resolve_victim(f"onnx:{tmp_path / 'none.onnx'}")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(VictimSpecError, match="onnxruntime cannot open"):
        resolve_victim(f"onnx:{broken}")
    with pytest.raises(VictimSpecError, match="torch.jit.load cannot read"):
        resolve_victim(f"torchscript:{broken}")


def test_onnx_victim_pickles_by_path(tmp_path):
    import pickle

    victim = resolve_victim(f"onnx:{export_onnx(tiny_zoo_victim(), tmp_path / 'cc.onnx')}")
    copy = pickle.loads(pickle.dumps(victim))
    torch.testing.assert_close(copy.predict_proba(images()), victim.predict_proba(images()))


# ---------------------------------------------------------------------------- MLflow pyfunc
def test_mlflow_pyfunc_models_answer_memberships_or_labels(tmp_path, mlflow_uri):
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture
    from sklearn.pipeline import make_pipeline

    rows = images(120).numpy().reshape(120, -1)
    pipe = make_pipeline(PCA(4, random_state=0), GaussianMixture(3, random_state=0)).fit(rows)
    proba_dir, labels_dir = tmp_path / "proba", tmp_path / "labels"
    mlflow.sklearn.save_model(
        pipe, proba_dir, signature=infer_signature(rows[:2], pipe.predict_proba(rows[:2])),
        pyfunc_predict_fn="predict_proba", pip_requirements=["scikit-learn"],
    )
    mlflow.sklearn.save_model(
        pipe, labels_dir, signature=infer_signature(rows[:2], pipe.predict(rows[:2])),
        metadata={"clusterattack.num_clusters": 3, "clusterattack.input_shape": "1,8,8"},
        pip_requirements=["scikit-learn"],
    )
    victim = resolve_victim(f"mlflow:{proba_dir}", dataset=SHAPE)
    assert victim.num_clusters == 3 and victim.output == "memberships"
    expected = torch.as_tensor(pipe.predict_proba(rows[:10]), dtype=torch.float32)
    torch.testing.assert_close(victim.predict_proba(images(120)[:10]), expected)
    labels = resolve_victim(str(labels_dir))  # a directory with an MLmodel file
    assert labels.output == "labels" and labels.input_shape == SHAPE
    assert labels.predict(images(120)[:10]).tolist() == pipe.predict(rows[:10]).tolist()
    with pytest.raises(VictimSpecError, match="cannot read the MLflow model"):
        resolve_victim(f"mlflow:{tmp_path / 'nothing'}")


# ---------------------------------------------------------------------------- zoo kinds unchanged
def test_zoo_files_still_load_and_are_checked_against_the_data_set(tmp_path):
    from clusterattack.victims import ClusteringModel, load_victim, save_victim

    model = tiny_zoo_victim()
    path = save_victim(model, tmp_path / "cc.pt")
    loaded = load_victim(path)
    assert isinstance(loaded, ClusteringModel) and loaded.name == "cc"
    with pytest.raises(VictimSpecError, match="has images 1x28x28"):
        resolve_victim(str(path), dataset=(1, 28, 28))
    with pytest.raises(ValueError, match="cannot resolve victim source 'no-such-thing'"):
        load_victim("no-such-thing")


def test_a_served_url_needs_a_key_or_an_adapter_and_must_be_reachable():
    import socket

    with pytest.raises(VictimSpecError, match="API key is required .* adapter"):
        resolve_victim("http://127.0.0.1:9/cc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(VictimSpecError, match=f"cannot reach http://127.0.0.1:{port}/cc"):
        resolve_victim(f"http://127.0.0.1:{port}/cc", api_key="k")


def test_probe_uses_few_seeded_images():
    from clusterattack.victims.sources.resolve import PROBE_IMAGES

    assert PROBE_IMAGES == 4 and math.isfinite(float(np.float32(1)))

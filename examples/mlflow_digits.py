"""Log the digits PCA + Gaussian mixture to MLflow as a scikit-learn model and print its victim spec.

    python examples/mlflow_digits.py                 # pyfunc predict = predict_proba: memberships
    python examples/mlflow_digits.py --labels        # pyfunc predict = predict: cluster ids only

The model goes to the project's MLflow store (``MLFLOW_TRACKING_URI``, else
``sqlite:///mlruns/mlflow.db``). Its signature tells the platform that it takes rows of 64
values (images 1 x 8 x 8 flattened) and answers 10 columns; the metadata says the input
shape, which a flat signature cannot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow
import mlflow.sklearn
from mlflow.models import infer_signature

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sklearn_digits import _train_rows, build_pipeline  # noqa: E402

from clusterattack import tracking  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--labels", action="store_true", help="log predict (cluster ids), not predict_proba")
    p.add_argument("--components", type=int, default=16)
    args = p.parse_args(argv)
    tracking.configure()
    pipeline = build_pipeline(components=args.components)
    rows = _train_rows()[:4]
    method = "predict" if args.labels else "predict_proba"
    with mlflow.start_run(experiment_id=tracking.ensure_experiment("own-models"), run_name=f"digits-gmm-{method}"):
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(rows, getattr(pipeline, method)(rows)),
            pyfunc_predict_fn=method,
            metadata={"clusterattack.input_shape": "1,8,8", "clusterattack.num_clusters": 10},
            pip_requirements=["scikit-learn"],
        )
    print(info.model_uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""clusterattack: attack and defend deep clustering models at scale.

Victims are trained here and served as budgeted Ray Serve deployments; the generator
attack of Chhabra et al. (NeurIPS 2022) runs black-box against them, swept with Ray Tune
and recorded in MLflow.
"""

__version__ = "0.1.0"

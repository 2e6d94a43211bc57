"""steerlab: steer language models by editing their activations at inference time.

This module re-exports the public API. The modules behind it form layers (foundations, values,
hooks, the model, building blocks, workflows, tuning, evaluations, applications) in which no
module imports a higher one and no imports form a cycle; docs/architecture.md lists them and
tests/test_layering.py checks it.

>>> import steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> vec = sl.mean_diff(model, ["i love it"], ["i hate it"], layers=[1])
>>> with model.steer(vec, strength=4.0):
...     text = model.generate(["the weather today is"], max_new_tokens=5)
>>> len(text)
1
"""

from steerlab import ablation, analysis, data, editing, evaluation, methods, sweeps, vectors
from steerlab.ablation import (
    AblationScan,
    ActivationMeans,
    DirectionalAblation,
    MeanAblation,
    ReplaceActivation,
    ZeroAblation,
    ablation_scan,
    compute_means,
)
from steerlab.adapter import ArchitectureSpec, ModelAdapter, register_architecture
from steerlab.analysis import (
    CosineMatrix,
    LayerScan,
    LogitLens,
    cosine_matrix,
    logit_lens,
    residual_norms,
    scan_layers,
)
from steerlab.conditions import Condition, fit_condition
from steerlab.data import ContrastDataset, ContrastPair, load_builtin, load_dataset
from steerlab.editing import EditedModel, bake, export_gguf, read_gguf
from steerlab.errors import (
    BakeError,
    DataError,
    EditRemovedError,
    FileWriteError,
    InvalidInputError,
    LayerIndexError,
    LayerNotFoundError,
    ModelNotAvailableError,
    SteerlabError,
    UnsupportedModelError,
    VectorFileError,
    VectorFileNotFoundError,
    VectorMismatchError,
)
from steerlab.evaluation import METRICS as EVAL_METRICS
from steerlab.evaluation import evaluate, kl_divergence, logprob_diff, register_metric
from steerlab.interventions import HookHandle, Intervention, RowSteering, Steering
from steerlab.loading import DEFAULT_MODEL_ID, load_model
from steerlab.methods import METHODS, compute_vector, mean_diff, register_method
from steerlab.model import Batch, LayerActivations, PrefixCache, SteeredModel, wrap
from steerlab.operators import OPERATORS, Operator, register_operator
from steerlab.positions import Positions
from steerlab.sae import SAE, TopFeatures, load_sae
from steerlab.site_methods import expert_attribution, head_probes, iti_vector
from steerlab.sweeps import SweepPoint, SweepResult, compare, sweep
from steerlab.training import (
    PreferenceItem,
    intervention_loss,
    preference_items,
    train_intervention,
    train_vector,
    training_loss,
)
from steerlab.tuning import TuneResult, tune
from steerlab.vectors import SteeringVector
from steerlab.version import __version__

__all__ = [
    "DEFAULT_MODEL_ID",
    "EVAL_METRICS",
    "METHODS",
    "OPERATORS",
    "AblationScan",
    "ActivationMeans",
    "ArchitectureSpec",
    "BakeError",
    "Batch",
    "ContrastDataset",
    "ContrastPair",
    "Condition",
    "CosineMatrix",
    "DataError",
    "DirectionalAblation",
    "EditRemovedError",
    "FileWriteError",
    "EditedModel",
    "HookHandle",
    "Intervention",
    "InvalidInputError",
    "LayerActivations",
    "LayerIndexError",
    "LayerNotFoundError",
    "LayerScan",
    "LogitLens",
    "MeanAblation",
    "ModelAdapter",
    "ModelNotAvailableError",
    "Operator",
    "Positions",
    "PreferenceItem",
    "PrefixCache",
    "ReplaceActivation",
    "RowSteering",
    "SAE",
    "SteeredModel",
    "Steering",
    "SteeringVector",
    "SteerlabError",
    "SweepPoint",
    "SweepResult",
    "TopFeatures",
    "TuneResult",
    "UnsupportedModelError",
    "VectorFileError",
    "VectorFileNotFoundError",
    "VectorMismatchError",
    "ZeroAblation",
    "__version__",
    "ablation",
    "ablation_scan",
    "analysis",
    "bake",
    "compare",
    "compute_means",
    "compute_vector",
    "cosine_matrix",
    "data",
    "editing",
    "evaluation",
    "evaluate",
    "export_gguf",
    "fit_condition",
    "intervention_loss",
    "kl_divergence",
    "load_builtin",
    "load_dataset",
    "load_model",
    "load_sae",
    "logit_lens",
    "logprob_diff",
    "mean_diff",
    "expert_attribution",
    "head_probes",
    "iti_vector",
    "preference_items",
    "methods",
    "read_gguf",
    "register_architecture",
    "register_method",
    "register_metric",
    "register_operator",
    "residual_norms",
    "scan_layers",
    "sweep",
    "sweeps",
    "train_intervention",
    "train_vector",
    "training_loss",
    "tune",
    "vectors",
    "wrap",
]

"""steerlab: steer language models by editing their activations at inference time.

>>> import steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> vec = sl.mean_diff(model, ["i love it"], ["i hate it"], layers=[1])
>>> with model.steer(vec, strength=4.0):
...     text = model.generate(["the weather today is"], max_new_tokens=5)
>>> len(text)
1
"""

from steerlab.adapter import ArchitectureSpec, ModelAdapter, register_architecture
from steerlab.errors import (
    DataError,
    InvalidInputError,
    LayerIndexError,
    ModelNotAvailableError,
    SteerlabError,
    UnsupportedModelError,
    VectorFileError,
    VectorMismatchError,
)
from steerlab.interventions import HookHandle, Intervention, RowSteering, Steering
from steerlab.loading import DEFAULT_MODEL_ID, load_model
from steerlab.methods import METHODS, compute_vector, mean_diff, register_method
from steerlab.model import Batch, LayerActivations, SteeredModel, wrap
from steerlab.positions import Positions
from steerlab.vectors import SteeringVector

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL_ID",
    "METHODS",
    "ArchitectureSpec",
    "Batch",
    "DataError",
    "HookHandle",
    "Intervention",
    "InvalidInputError",
    "LayerActivations",
    "LayerIndexError",
    "ModelAdapter",
    "ModelNotAvailableError",
    "Positions",
    "RowSteering",
    "SteeredModel",
    "Steering",
    "SteeringVector",
    "SteerlabError",
    "UnsupportedModelError",
    "VectorFileError",
    "VectorMismatchError",
    "__version__",
    "compute_vector",
    "load_model",
    "mean_diff",
    "register_architecture",
    "register_method",
    "wrap",
]

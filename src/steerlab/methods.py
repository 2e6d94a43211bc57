"""Methods: how a steering direction is computed from contrasting examples.

Each method is a small function registered in :data:`METHODS` under a name. They share one
signature, on the activations of one layer::

    fn(positive: Tensor[n, d_model], negative: Tensor[m, d_model], *, paired: bool, seed: int,
       **options) -> Tensor[d_model] | MethodResult

so :func:`compute_vector` extracts activations once for every layer and applies the method per
layer. ``paired=True`` means ``positive[i]`` and ``negative[i]`` are the same prompt with the
concept flipped (``n == m``). A method may return a :class:`MethodResult` to report numbers
(the probe's held-out accuracy); they land in the vector's ``layer_info`` metadata.

=============  ===========================================================================
method         direction
=============  ===========================================================================
``mean_diff``  ``mean(positive) - mean(negative)`` (contrastive activation addition, CAA); the
               reference every other method is tested against
``pca``        first principal axis of the paired differences ``positive[i] - negative[i]``,
               uncentred (RepE's reading vector; for unpaired sets, of every positive minus
               every negative)
``pca_center`` first principal axis of all activations pooled and centred on their mean
               (unsupervised: the labels only fix the sign)
``probe``      weights of a logistic-regression probe (scikit-learn), trained on a seeded split
               and scored on the held-out rest
=============  ===========================================================================

Sign and scale: ``pca``, ``pca_center`` and ``probe`` give an axis ``u`` (unit norm) whose sign
is fixed so that positive examples project higher than negative ones on average; by default
(``scale="mean_diff"``) the returned direction is ``(u · mean_diff) u``, the mean difference's
component along the axis, so a strength means the same for every method. ``scale="unit"``
returns ``u`` itself.

>>> import torch
>>> METHODS["mean_diff"](torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])).tolist()
[2.0, -1.0]
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from steerlab.checks import check_prompt_list
from steerlab.deprecation import renamed_keyword
from steerlab.errors import InvalidInputError
from steerlab.operators import angular_plane
from steerlab.sites import check_site
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "METHODS",
    "ContrastInputs",
    "MethodResult",
    "compute_vector",
    "extract_activations",
    "fit_probe",
    "mean_diff",
    "probe_accuracy",
    "register_method",
    "resolve_inputs",
    "run_method",
    "split_classes",
    "split_indices",
]


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """A direction plus JSON-able numbers about it (accuracy, explained variance...)."""

    direction: torch.Tensor
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)


MethodFn = Callable[..., "torch.Tensor | MethodResult"]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a direction method to :data:`METHODS`.

    The function gets the activations of one layer, ``(positive[n, d], negative[m, d])``, plus
    the keywords ``paired`` and ``seed`` if its signature accepts them (or ``**kwargs``), plus
    any extra options given to :func:`compute_vector`.

    >>> import torch
    >>> @register_method("first_minus_first")
    ... def _first(pos, neg):
    ...     return pos[0] - neg[0]
    >>> METHODS["first_minus_first"](torch.ones(2, 3), torch.zeros(2, 3)).tolist()
    [1.0, 1.0, 1.0]
    >>> del METHODS["first_minus_first"]
    """

    def add(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return add


# --- the methods ------------------------------------------------------------------------------
@register_method("mean_diff")
def _mean_diff_direction(positive: torch.Tensor, negative: torch.Tensor, **_: Any) -> torch.Tensor:
    """Difference of class means (CAA); exact, no randomness."""
    return positive.double().mean(dim=0).float() - negative.double().mean(dim=0).float()


def _top_axis(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """First right singular vector of ``matrix`` and the share of its squared norm it explains."""
    _, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
    total = float((singular**2).sum())
    share = float(singular[0] ** 2) / total if total > 0 else float("nan")
    return vh[0], share


def _oriented(
    axis: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, scale: str
) -> torch.Tensor:
    """``axis`` signed so positives project higher, scaled per ``scale``, as float32."""
    if scale not in ("mean_diff", "unit"):
        raise InvalidInputError(f"scale must be 'mean_diff' or 'unit', not {scale!r}")
    diff = positive.double().mean(dim=0) - negative.double().mean(dim=0)
    unit = axis.double() / axis.double().norm()
    along = float(unit @ diff)
    if along < 0:
        unit, along = -unit, -along
    return (unit if scale == "unit" else unit * along).float()


@register_method("pca")
def _pca_direction(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    paired: bool = False,
    scale: str = "mean_diff",
    **_: Any,
) -> MethodResult:
    """First principal axis of the pairwise differences (RepE), sign fixed by the class means.

    Paired: the uncentred second moment of ``d_i = positive[i] - negative[i]``; this is what
    RepE's PCA on differences with random sign flips estimates, without the randomness.
    Unpaired: of every difference ``positive[i] - negative[j]``, computed in closed form from
    the class covariances and the mean difference (no n×m matrix is built).
    """
    p, n = positive.double(), negative.double()
    if paired:
        if p.shape != n.shape:
            raise InvalidInputError(
                f"paired pca needs as many positive as negative rows ({p.shape[0]} vs {n.shape[0]})"
            )
        rows = p - n
    else:
        mp, mn = p.mean(dim=0), n.mean(dim=0)
        count_p, count_n = p.shape[0], n.shape[0]
        # sum_ij (p_i - n_j)(p_i - n_j)^T = m P'^T P' + n N'^T N' + m n D D^T (P', N' centred)
        rows = torch.cat(
            [
                math.sqrt(count_n) * (p - mp),
                math.sqrt(count_p) * (n - mn),
                math.sqrt(count_p * count_n) * (mp - mn)[None],
            ]
        )
    axis, share = _top_axis(rows)
    return MethodResult(_oriented(axis, p, n, scale), {"explained_variance": share})


@register_method("pca_center")
def _pca_center_direction(
    positive: torch.Tensor, negative: torch.Tensor, *, scale: str = "mean_diff", **_: Any
) -> MethodResult:
    """First principal axis of both classes pooled and centred on the pooled mean.

    Unsupervised: it finds the concept only when the concept is the main way the activations
    vary; the labels only fix the sign. Its ``explained_variance`` says how dominant that is.
    """
    pooled = torch.cat([positive.double(), negative.double()])
    axis, share = _top_axis(pooled - pooled.mean(dim=0))
    return MethodResult(_oriented(axis, positive, negative, scale), {"explained_variance": share})


def split_indices(
    count: int, test_fraction: float, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """Seeded ``(train, test)`` index lists: ``round(count * test_fraction)`` test items, at
    least one and at most ``count - 1``, both sorted.

    >>> g = torch.Generator().manual_seed(0)
    >>> train, test = split_indices(8, 0.25, g)
    >>> len(train), len(test), sorted(train + test) == list(range(8))
    (6, 2, True)
    """
    if not 0 < test_fraction < 1:
        raise InvalidInputError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction}"
        )
    if count < 2:
        raise InvalidInputError(
            f"a held-out split needs at least 2 examples per class, got {count}"
        )
    n_test = min(count - 1, max(1, round(count * test_fraction)))
    order = torch.randperm(count, generator=generator).tolist()
    return sorted(order[n_test:]), sorted(order[:n_test])


def split_classes(
    n_positive: int, n_negative: int, *, paired: bool, test_fraction: float, seed: int
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """``((pos_train, pos_test), (neg_train, neg_test))`` row indices; pairs stay together.

    >>> (pt, ps), (nt, ns) = split_classes(4, 4, paired=True, test_fraction=0.5, seed=0)
    >>> pt == nt and ps == ns, len(ps)
    (True, 2)
    """
    generator = torch.Generator().manual_seed(seed)
    if paired:
        if n_positive != n_negative:
            raise InvalidInputError("paired data needs as many positive as negative examples")
        split = split_indices(n_positive, test_fraction, generator)
        return split, split
    return (
        split_indices(n_positive, test_fraction, generator),
        split_indices(n_negative, test_fraction, generator),
    )


def fit_probe(
    positive: torch.Tensor, negative: torch.Tensor, *, C: float = 1.0, max_iter: int = 2000
) -> Any:
    """A scikit-learn ``LogisticRegression`` fitted on positive (1) vs negative (0) rows."""
    from sklearn.linear_model import LogisticRegression

    features = torch.cat([positive, negative]).double().numpy()
    labels = [1] * positive.shape[0] + [0] * negative.shape[0]
    probe = LogisticRegression(C=C, max_iter=max_iter)
    probe.fit(features, labels)
    return probe


def probe_accuracy(probe: Any, positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Fraction of rows a fitted probe classifies correctly."""
    features = torch.cat([positive, negative]).double().numpy()
    labels = [1] * positive.shape[0] + [0] * negative.shape[0]
    return float(probe.score(features, labels))


def _check_test_fraction(test_fraction: object) -> float:
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0 <= test_fraction < 1
    ):
        raise InvalidInputError(
            f"test_fraction must be at least 0 and below 1 (0: no held-out rows), got "
            f"{test_fraction!r}"
        )
    return float(test_fraction)


@register_method("probe")
def _probe_direction(
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    paired: bool = False,
    seed: int = 0,
    test_fraction: float = 0.25,
    C: float = 1.0,
    scale: str = "mean_diff",
    **_: Any,
) -> MethodResult:
    """Logistic-regression weights (the seed's "linear probing for steering").

    The probe is trained on a seeded split (pairs stay on one side) and its accuracy measured
    on the held-out rest, so the reported ``heldout_accuracy`` belongs to the returned
    direction. ``test_fraction=0`` fits on every row, as the seed does; so does a class with
    fewer than two examples. Without held-out rows ``heldout_accuracy`` is ``None``. ``C`` is the
    inverse L2 regularisation strength. ``info["split"]`` lists the row indices used:
    ``{"positive_train", "positive_test", "negative_train", "negative_test"}``.

    >>> import torch
    >>> pos, neg = torch.randn(6, 4) + 2, torch.randn(6, 4) - 2
    >>> info = METHODS["probe"](pos, neg, test_fraction=0).info
    >>> info["split"]["positive_train"], info["heldout_accuracy"]
    ([0, 1, 2, 3, 4, 5], None)
    """
    test_fraction = _check_test_fraction(test_fraction)
    n_pos, n_neg = positive.shape[0], negative.shape[0]
    if test_fraction > 0 and min(n_pos, n_neg) >= 2:
        (pos_train, pos_test), (neg_train, neg_test) = split_classes(
            n_pos, n_neg, paired=paired, test_fraction=test_fraction, seed=seed
        )
    else:
        pos_train, pos_test = list(range(n_pos)), []
        neg_train, neg_test = list(range(n_neg)), []
    probe = fit_probe(positive[pos_train], negative[neg_train], C=C)
    heldout = probe_accuracy(probe, positive[pos_test], negative[neg_test]) if pos_test else None
    info = {
        "train_accuracy": probe_accuracy(probe, positive[pos_train], negative[neg_train]),
        "heldout_accuracy": heldout,
        "n_train": len(pos_train) + len(neg_train),
        "n_test": len(pos_test) + len(neg_test),
        "split": {
            "positive_train": pos_train,
            "positive_test": pos_test,
            "negative_train": neg_train,
            "negative_test": neg_test,
        },
    }
    axis = torch.from_numpy(probe.coef_[0].copy())
    if float(axis.norm()) == 0.0:
        raise InvalidInputError("the probe learned a zero weight vector (identical classes?)")
    return MethodResult(_oriented(axis, positive, negative, scale), info)


def run_method(
    method: str,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    paired: bool,
    seed: int = 0,
    **options: Any,
) -> MethodResult:
    """Apply the registered ``method`` to one layer's activations; always a MethodResult.

    >>> import torch
    >>> run_method("mean_diff", torch.ones(2, 3), torch.zeros(2, 3), paired=True).direction
    tensor([1., 1., 1.])
    """
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    fn = METHODS[method]
    extra: dict[str, Any] = {}
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in (("paired", paired), ("seed", seed)):
        if takes_all or key in params:
            extra[key] = value
    out = fn(positive, negative, **extra, **options)
    result = out if isinstance(out, MethodResult) else MethodResult(out)
    direction = result.direction
    if not isinstance(direction, torch.Tensor) or direction.shape != positive.shape[1:]:
        raise InvalidInputError(
            f"method {method!r} must return a Tensor[d_model] ({positive.shape[1]}), got "
            f"{getattr(direction, 'shape', type(direction))}"
        )
    return result


# --- inputs -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ContrastInputs:
    """Positive and negative prompts in one normal form, with how they were given."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    paired: bool
    dataset: Mapping[str, Any]


def resolve_inputs(
    positive: Any, negative: Any = None, *, paired: bool | None = None
) -> ContrastInputs:
    """Normalise what :func:`compute_vector` accepts into two prompt tuples.

    Accepted: two lists of strings; a :class:`~steerlab.data.ContrastDataset` (``negative``
    omitted); or a list of :class:`~steerlab.data.ContrastPair` / ``(positive, negative)``
    tuples. ``paired=None`` takes the dataset's own flag, ``True`` for pairs, and for two lists
    ``True`` exactly when they have the same length (``positive[i]`` then pairs with
    ``negative[i]``, as in the seed's parallel lists). Only ``pca`` and ``probe`` (which keeps
    pairs on one side of its split) look at pairing.

    >>> inputs = resolve_inputs([("so good", "so bad"), ("great", "awful")])
    >>> inputs.positive, inputs.paired
    (('so good', 'great'), True)
    """
    dataset: dict[str, Any]
    if negative is None:
        if hasattr(positive, "positive") and hasattr(positive, "negative"):
            pos = check_prompt_list(list(positive.positive), "positive")
            neg = check_prompt_list(list(positive.negative), "negative")
            own = bool(getattr(positive, "paired", len(pos) == len(neg)))
            dataset = {
                "name": str(getattr(positive, "name", "")),
                "description": str(getattr(positive, "description", "")),
                "source": str(getattr(positive, "source", "")),
            }
            if paired is None:
                paired = own
        elif isinstance(positive, Sequence) and not isinstance(positive, str) and positive:
            pos_list, neg_list = [], []
            for i, item in enumerate(positive):
                if hasattr(item, "positive") and hasattr(item, "negative"):
                    pos_list.append(item.positive)
                    neg_list.append(item.negative)
                elif isinstance(item, tuple) and len(item) == 2:
                    pos_list.append(item[0])
                    neg_list.append(item[1])
                else:
                    raise InvalidInputError(
                        f"item {i}: without negative=, positive must be a ContrastDataset or a "
                        f"list of ContrastPair / (positive, negative) tuples, got "
                        f"{type(item).__name__}"
                    )
            pos, neg = (
                check_prompt_list(pos_list, "positive"),
                check_prompt_list(neg_list, "negative"),
            )
            dataset = {"name": "pairs", "description": "", "source": "python"}
            if paired is None:
                paired = True
        else:
            raise InvalidInputError(
                "give positive and negative prompt lists, a ContrastDataset, or a list of pairs"
            )
    else:
        pos, neg = check_prompt_list(positive, "positive"), check_prompt_list(negative, "negative")
        dataset = {"name": "prompts", "description": "", "source": "python"}
        if paired is None:
            paired = len(pos) == len(neg)
    if paired and len(pos) != len(neg):
        raise InvalidInputError(
            f"paired inputs need as many positive as negative prompts ({len(pos)} vs {len(neg)})"
        )
    dataset.update(n_positive=len(pos), n_negative=len(neg), paired=bool(paired))
    return ContrastInputs(pos, neg, bool(paired), dataset)


# --- extraction -------------------------------------------------------------------------------
def _check_positions(positions: str | int) -> str | int:
    if isinstance(positions, bool) or not isinstance(positions, (str, int)):
        raise InvalidInputError(f"read_at must be 'last', 'mean' or an int, got {positions!r}")
    if isinstance(positions, str) and positions not in ("last", "mean"):
        raise InvalidInputError(f"read_at must be 'last', 'mean' or an int, not {positions!r}")
    return positions


def extract_activations(
    model: Any,
    prompts: Sequence[str],
    *,
    layers: Sequence[int],
    read_at: str | int | None = None,
    batch_size: int = 16,
    chat: bool = False,
    progress: bool | None = None,
    site: str = "resid",
    positions: str | int | None = None,
) -> dict[int, torch.Tensor]:
    """``{layer: Tensor[n, d_model]}`` at one position per prompt, in one pass over the prompts
    (at another ``site`` of the blocks, :mod:`steerlab.sites`, the site's width).

    ``read_at``: ``"last"`` (default), ``"mean"`` (over the prompt's tokens), or an int index
    into each prompt's tokens (``-2`` is the answer letter of CAA items ending ``"(A)"``; ``0``
    the first). An int reads full sequences one batch at a time, so memory stays bounded by the
    batch. ``positions=`` is the deprecated name of ``read_at=``.

    >>> from steerlab.testing import tiny_model
    >>> acts = extract_activations(tiny_model("gpt2"), ["the cat sat"], layers=[0, 2],
    ...                            read_at=-2)
    >>> sorted(acts), tuple(acts[2].shape)
    ([0, 2], (1, 32))
    """
    read_at = renamed_keyword(
        "extract_activations",
        old="positions",
        new="read_at",
        old_value=positions,
        new_value=read_at,
        default="last",
    )
    positions = _check_positions(read_at)
    items = list(prompts)
    if isinstance(positions, str):
        acts = model.activations(
            items,
            layers=list(layers),
            read_at=positions,
            batch_size=batch_size,
            chat=chat,
            progress=progress,
            site=site,
        )
        return {layer: acts[layer] for layer in layers}
    index = positions
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        acts = model.activations(
            chunk,
            layers=list(layers),
            read_at="all",
            batch_size=batch_size,
            chat=chat,
            progress=False,
            site=site,
        )
        for layer in layers:
            for row, seq in enumerate(acts[layer]):
                if not -seq.shape[0] <= index < seq.shape[0]:
                    raise InvalidInputError(
                        f"position {index} is outside prompt {start + row} "
                        f"({seq.shape[0]} tokens): {chunk[row]!r}"
                    )
                out[layer].append(seq[index])
    return {layer: torch.stack(rows) for layer, rows in out.items()}


# --- the public entry point -------------------------------------------------------------------
def compute_vector(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    method: str = "mean_diff",
    read_at: str | int | None = None,
    paired: bool | None = None,
    seed: int = 0,
    batch_size: int = 16,
    chat: bool = False,
    progress: bool | None = None,
    site: str = "resid",
    plane: bool | None = None,
    positions: str | int | None = None,
    **options: Any,
) -> SteeringVector:
    """Compute a steering vector with a registered method at every requested layer.

    ``positive``/``negative``: two prompt lists, or a :class:`~steerlab.data.ContrastDataset`
    (or list of pairs) as ``positive`` with ``negative`` omitted; see :func:`resolve_inputs`
    for pairing. ``layers``: an index, a list (negative indices allowed) or ``None`` for all.
    ``read_at``: where each prompt is read, ``"last"`` (default), ``"mean"`` or an int index
    (see :func:`extract_activations`; ``positions=`` is its deprecated name, recorded in the
    vector's metadata as ``positions``). Activations are read once for all layers. ``seed``
    drives the probe's split; other ``options`` go to the method (``scale="unit"``, the
    probe's ``C`` and ``test_fraction``).
    ``site`` (:mod:`steerlab.sites`) reads the activations there (``"attn_out"``,
    ``"mlp_out"``, ``"head"``...) and records it in the vector, which then steers there.
    The result carries the full metadata schema of :mod:`steerlab.vectors`, plus per-layer
    numbers the method reports under ``layer_info`` (``{"<layer>": {...}}``).

    ``method="mean_diff"`` also stores what the ``affine`` and ``rotate`` operators read
    (``vec.extras``): the negative prompts' mean at each layer, and angular steering's rotation
    ``plane``, which is defined over the candidate directions of *every* layer. The forward pass
    stops after the deepest layer it needs, so ``plane`` decides the cost: ``None`` (default)
    stores the plane when the requested layers include the last one (the pass reads every layer
    anyway), ``True`` always (a full forward pass), ``False`` never. Directions and means are
    the same, bit for bit, whichever is chosen.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> vec = sl.compute_vector(model, ["i love it"], ["i hate it"], layers=[1])
    >>> vec.layers, vec.metadata["method"], vec.metadata["dataset"]["paired"]
    ((1,), 'mean_diff', True)
    """
    positions = renamed_keyword(
        "compute_vector",
        old="positions",
        new="read_at",
        old_value=positions,
        new_value=read_at,
        default="last",
    )
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}; available: {sorted(METHODS)}")
    inputs = resolve_inputs(positive, negative, paired=paired)
    site = check_site(site)
    resolved = model.adapter.resolve_layers(layers)
    if plane is not None and not isinstance(plane, bool):
        raise InvalidInputError(f"plane must be True, False or None, got {plane!r}")
    # angular steering's plane needs every layer's activations; without it the pass stops at
    # the deepest requested layer (model.activations ends the forward there)
    if plane is None:
        plane = max(resolved) == model.n_layers - 1
    store_plane = method == "mean_diff" and plane and model.n_layers >= 2
    read_layers = list(range(model.n_layers)) if store_plane else list(resolved)
    acts = extract_activations(
        model,
        inputs.positive + inputs.negative,
        layers=read_layers,
        read_at=positions,
        batch_size=batch_size,
        chat=chat,
        progress=progress,
        site=site,
    )
    n_pos = len(inputs.positive)
    directions: dict[int, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    for layer in resolved:
        result = run_method(
            method,
            acts[layer][:n_pos],
            acts[layer][n_pos:],
            paired=inputs.paired,
            seed=seed,
            **options,
        )
        directions[layer] = result.direction
        if result.info:
            layer_info[str(layer)] = dict(result.info)
    extra: dict[str, Any] = {"chat": chat}
    if layer_info:
        extra["layer_info"] = layer_info
    if options:
        extra["method_options"] = {k: v for k, v in options.items() if _jsonable(v)}
    metadata = vector_metadata(
        model,
        method=method,
        positions=positions,
        normalization="unit" if options.get("scale") == "unit" else None,
        dataset=inputs.dataset,
        site=site,
        **extra,
    )
    extras: dict[str, dict[int, torch.Tensor]] = {}
    if method == "mean_diff":
        # affine concept editing's reference: the mean activation of the negative prompts;
        # angular steering's second basis vector, one for every layer (stored once)
        extras["reference"] = {
            layer: acts[layer][n_pos:].double().mean(dim=0).float() for layer in resolved
        }
        if store_plane:
            second = angular_plane(
                {layer: acts[layer][:n_pos] for layer in read_layers},
                {layer: acts[layer][n_pos:] for layer in read_layers},
            )
            extras["plane"] = {resolved[0]: second}
    return SteeringVector(directions, metadata=metadata, extras=extras)


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def mean_diff(
    model: Any,
    positive: Any,
    negative: Sequence[str] | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    read_at: str | int | None = None,
    batch_size: int = 16,
    progress: bool | None = None,
    site: str = "resid",
    plane: bool | None = None,
    positions: str | int | None = None,
) -> SteeringVector:
    """Contrastive mean-difference vector: ``mean(acts(positive)) - mean(acts(negative))``,
    read at ``site`` (:mod:`steerlab.sites`; ``"attn_out"``/``"mlp_out"`` give a vector that
    steers the attention or MLP output).

    ``plane``: whether to store angular steering's rotation plane, ``read_at``: where each
    prompt is read, as in :func:`compute_vector` (``positions=``: the deprecated name).

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> vec = sl.mean_diff(model, ["i love it", "so happy"], ["i hate it", "so sad"], layers=[-1])
    >>> vec.layers
    (2,)
    """
    return compute_vector(
        model,
        positive,
        negative,
        layers=layers,
        method="mean_diff",
        read_at=renamed_keyword(
            "mean_diff",
            old="positions",
            new="read_at",
            old_value=positions,
            new_value=read_at,
            default="last",
        ),
        batch_size=batch_size,
        progress=progress,
        site=site,
        plane=plane,
    )

"""Trained steering: vectors optimised for a behaviour, and low-rank (LoReFT) interventions.

The one-shot methods of :mod:`steerlab.methods` read a direction off activation statistics;
the functions here *optimise* it on prompts with a chosen and a rejected completion:

* :func:`train_vector` with ``objective="preference"``: the bidirectional preference
  objective (BiPO, Cao et al. 2024, arXiv 2406.00045). With ``+v`` the chosen completion gains
  over the rejected one relative to the unsteered model, with ``-v`` the reverse:
  ``L = −log σ(β·Δ(+v)) − log σ(−β·Δ(−v))``, where ``Δ(x) = [log p_x(chosen) − log p_0(chosen)]
  − [log p_x(rejected) − log p_0(rejected)]`` (``p_x``: the model steered by ``x``).
* :func:`train_vector` with ``objective="likelihood"``: the mean negative log-likelihood per
  token of the chosen completions under ``+v``, plus ``penalty·‖v‖²`` keeping the vector small
  (ReFT-r1 / AxBench style; the rejected completions are not used).
* :func:`train_intervention`: a LoReFT intervention (operator ``"loreft"``,
  ``h + Rᵀ(W h + b − R h)``) trained with the likelihood objective, the penalty on
  ``‖W − R‖² + ‖b‖²`` (its distance from the identity).

Training runs the model through the same hooks as inference (a
:class:`~steerlab.interventions.Steering` whose operator constants are the live parameters),
so a trained vector does at inference exactly what it did in training. The parameters being
trained are the only tensors that get a gradient: the model's weights are never written, and
their ``.grad`` stays as it was. A fixed ``seed`` gives the identical result twice.

>>> import steerlab as sl
>>> from steerlab.testing import tiny_model
>>> model = tiny_model("llama")
>>> data = [{"prompt": "the movie was", "chosen": " good", "rejected": " bad"}] * 4
>>> vec = sl.train_vector(model, data, layer=1, steps=5, lr=0.05)
>>> vec.metadata["objective"], vec.metadata["steps"], vec.layers
('preference', 5, (1,))
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch

from steerlab.batch import Batch
from steerlab.checks import as_finite_float, as_int, as_positive_int
from steerlab.data import ContrastDataset, load_caa
from steerlab.dispatch import activate
from steerlab.errors import DataError, InvalidInputError
from steerlab.model import SteeredModel
from steerlab.operators import get_operator, loreft_extras, loreft_matrices
from steerlab.positions import Positions, PositionSpec
from steerlab.progress import progress_bar
from steerlab.steering import Steering
from steerlab.vectors import SteeringVector, vector_metadata

__all__ = [
    "OBJECTIVES",
    "PreferenceItem",
    "intervention_loss",
    "preference_items",
    "train_intervention",
    "train_vector",
    "training_loss",
]

OBJECTIVES = ("preference", "likelihood")
"""The objectives :func:`train_vector` optimises."""

TrainingData = Union[ContrastDataset, str, Path, Sequence[Any]]
Progress = Union[bool, None, Callable[[int, float], Any]]


@dataclasses.dataclass(frozen=True)
class PreferenceItem:
    """One training item: a prompt, the completion to prefer and the one to avoid.

    >>> PreferenceItem("Is it good?", " Yes", " No").chosen
    ' Yes'
    """

    prompt: str
    chosen: str
    rejected: str

    def __post_init__(self) -> None:
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{name} must be a non-empty string, got {value!r}")


_CAA_KEYS = ("question", "answer_matching_behavior", "answer_not_matching_behavior")


def _item(raw: object, where: str) -> PreferenceItem:
    if isinstance(raw, PreferenceItem):
        return raw
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a dict with prompt/chosen/rejected, got {raw!r}")
    try:
        if all(k in raw for k in ("prompt", "chosen", "rejected")):
            return PreferenceItem(raw["prompt"], raw["chosen"], raw["rejected"])
        if all(k in raw for k in _CAA_KEYS):  # a CAA A/B item as it appears in the files
            return PreferenceItem(
                f"{raw['question']}\n\nAnswer:",
                f" {str(raw['answer_matching_behavior']).strip()}",
                f" {str(raw['answer_not_matching_behavior']).strip()}",
            )
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    raise DataError(
        f"{where}: needs the keys 'prompt', 'chosen', 'rejected' (or a CAA A/B item), has "
        f"{sorted(map(str, raw))}"
    )


def _from_dataset(dataset: ContrastDataset) -> list[PreferenceItem]:
    if dataset.prompts and dataset.answers:  # A/B items: the question and the two answers
        return [
            PreferenceItem(f"{q}\n\nAnswer:", f" {a.strip()}", f" {b.strip()}")
            for q, (a, b) in zip(dataset.prompts, dataset.answers, strict=True)
        ]
    if not dataset.paired:
        raise DataError(
            f"dataset {dataset.name!r} is unpaired; training needs pairs that share a prompt "
            f"(a paired dataset, or dicts with prompt/chosen/rejected)"
        )
    items = []
    for i, (pos, neg) in enumerate(zip(dataset.positive, dataset.negative, strict=True)):
        # the shared beginning is the prompt, cut back to a word boundary
        cut = 0
        while cut < min(len(pos), len(neg)) and pos[cut] == neg[cut]:
            cut += 1
        cut = pos.rfind(" ", 0, cut + 1) if cut < len(pos) else cut
        if cut <= 0 or not pos[:cut].strip():
            raise DataError(
                f"dataset {dataset.name!r}, pair {i}: the two texts share no beginning to use "
                f"as the prompt ({pos!r} / {neg!r})"
            )
        items.append(PreferenceItem(pos[:cut], pos[cut:], neg[cut:]))
    return items


def preference_items(data: TrainingData) -> list[PreferenceItem]:
    """Training data in any accepted form as a list of :class:`PreferenceItem`.

    Accepted: a list of dicts ``{"prompt", "chosen", "rejected"}`` (or of
    :class:`PreferenceItem`, or of CAA A/B items ``{"question", "answer_matching_behavior",
    "answer_not_matching_behavior"}``); a :class:`~steerlab.data.ContrastDataset` (A/B items
    from :func:`~steerlab.data.load_caa` give question → matching / other answer; a paired set
    gives the texts' shared beginning → the two endings); a path to a JSONL file of such dicts
    or to a CAA ``.json`` file.

    >>> from steerlab.data import ContrastDataset
    >>> ds = ContrastDataset(name="t", positive=("the film was good",),
    ...                      negative=("the film was bad",), paired=True)
    >>> preference_items(ds)[0]
    PreferenceItem(prompt='the film was', chosen=' good', rejected=' bad')
    """
    if isinstance(data, ContrastDataset):
        items = _from_dataset(data)
    elif isinstance(data, (str, Path)):
        items = _read_file(Path(data))
    elif isinstance(data, Sequence):
        items = [_item(raw, f"item {i}") for i, raw in enumerate(data)]
    else:
        raise InvalidInputError(
            f"data must be a list of {{'prompt','chosen','rejected'}} dicts, a ContrastDataset "
            f"or a path to a .jsonl file, not {type(data).__name__}"
        )
    if not items:
        raise DataError("data has no items")
    return items


def _read_file(file: Path) -> list[PreferenceItem]:
    if not file.is_file():
        raise DataError(f"no data file at {file}")
    if file.suffix == ".json":
        return _from_dataset(load_caa(file))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {file}: {err}") from None
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}, line {number}: not JSON ({err.msg})") from None
        items.append(_item(raw, f"{file}, line {number}"))
    return items


def data_hash(items: Sequence[PreferenceItem]) -> str:
    """SHA-256 of the items (order included), recorded in the trained vector's metadata.

    >>> data_hash([PreferenceItem("a", " b", " c")])[:12]
    '03302de5e50e'
    """
    text = json.dumps([[i.prompt, i.chosen, i.rejected] for i in items], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- running completions through the model --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Encoded:
    """Token ids of each item's prompt and completions (``chosen`` and ``rejected``)."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]


def _encode(model: SteeredModel, items: Sequence[PreferenceItem], chat: bool) -> _Encoded:
    tok = model.tokenizer

    def ids(text: str, special: bool) -> list[int]:
        return list(tok(text, add_special_tokens=special)["input_ids"])

    out = _Encoded([], [], [])
    for i, item in enumerate(items):
        prompt = model.format_chat(item.prompt) if chat else item.prompt
        out.prompt.append(ids(prompt, not chat))
        for name in ("chosen", "rejected"):
            tail = ids(getattr(item, name), False)
            if not tail:
                raise DataError(f"item {i}: the {name} completion has no tokens")
            getattr(out, name).append(tail)
        if not out.prompt[-1]:
            raise DataError(f"item {i}: the prompt has no tokens")
    return out


def _batch(prompts: Sequence[list[int]], tails: Sequence[list[int]], pad: int) -> Batch:
    """Prompt + completion, left-padded; ``prompt_lengths`` are the prompts' (so positions
    ``"generated"`` select the completion, as in generation)."""
    rows = [p + t for p, t in zip(prompts, tails, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    lengths = torch.tensor([len(p) for p in prompts])
    return Batch(ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0), lengths, "left")


def _takes_logits_to_keep(model: SteeredModel) -> bool:
    """Whether ``hf_model`` names a ``logits_to_keep`` argument (every causal LM of recent
    transformers does; a custom model may not, and then gets every position's logits)."""
    try:
        return "logits_to_keep" in inspect.signature(model.hf_model.forward).parameters
    except (TypeError, ValueError):
        return False


def _completion_logprobs(
    model: SteeredModel, batch: Batch, tails: Sequence[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of log p(completion tokens), number of completion tokens)`` per row."""
    longest = max(len(t) for t in tails)
    # Rows are left-padded, so every completion lies in the last ``longest`` positions and is
    # predicted from the ``longest + 1`` before the end. Asking the head for only those keeps the
    # [rows, prompt + completion, vocab] logits (12 GB for a CAA-sized batch) out of the graph;
    # the model's own head still applies the final norm, soft-capping and scaling.
    head = {"logits_to_keep": longest + 1} if _takes_logits_to_keep(model) else {}
    with model.call_scope(batch):
        logits = model.forward_batch(batch, **head).logits
    logits = logits[:, -longest - 1 : -1]  # also right for a model that returned every position
    logits = logits if logits.dtype == torch.float64 else logits.float()
    logp = logits.log_softmax(dim=-1)
    targets = batch.input_ids[:, -longest:].to(logp.device)
    picked = logp.gather(-1, targets[..., None])[..., 0]
    keep = torch.zeros_like(picked, dtype=torch.bool)
    for i, tail in enumerate(tails):
        keep[i, longest - len(tail) :] = True
    counts = torch.tensor([len(t) for t in tails], dtype=picked.dtype, device=picked.device)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(dim=-1), counts


@dataclasses.dataclass(frozen=True)
class _LiveSteering(Steering):
    """A :class:`Steering` whose operator constants come from live (trainable) tensors.

    ``live`` maps the resolved layer to ``(direction, extras)``; the inherited hooks
    (:class:`~steerlab.interventions.RowSteering`) apply them exactly as at inference, and the
    autograd graph runs through them.
    """

    live: Mapping[int, tuple[torch.Tensor, Mapping[str, torch.Tensor]]] = dataclasses.field(
        default_factory=dict
    )

    def layer_params(self, adapter: Any) -> dict[int, dict[str, torch.Tensor]]:
        op = self.operator
        strength = float(self.strength) if not isinstance(self.strength, Mapping) else 1.0
        return {
            layer: op.params(direction, strength, extras)
            for layer, (direction, extras) in self.live.items()
        }


def _steered_logprobs(
    model: SteeredModel,
    steering: _LiveSteering | None,
    batch: Batch,
    tails: Sequence[list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    if steering is None:
        return _completion_logprobs(model, batch, tails)
    with activate(model.adapter, [steering]):
        return _completion_logprobs(model, batch, tails)


# --- the optimisation loop ------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """What the loop reports: the parameters after the last completed step and the losses."""

    snapshot: list[torch.Tensor]
    losses: list[float]
    interrupted: bool


def _minibatches(n: int, size: int, gen: torch.Generator) -> Iterator[list[int]]:
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, size):
            yield order[start : start + size]


def _optimise(
    params: list[torch.Tensor],
    loss_of: Callable[[list[int]], torch.Tensor],
    *,
    n_items: int,
    steps: int,
    lr: float,
    batch_size: int,
    gen: torch.Generator,
    progress: Progress,
    desc: str,
) -> _Run:
    optimizer = torch.optim.Adam(params, lr=lr)
    batches = _minibatches(n_items, min(batch_size, n_items), gen)
    run = _Run([p.detach().clone() for p in params], [], False)
    callback = progress if callable(progress) else None
    bar = progress_bar(steps, desc, None if callable(progress) else progress)
    try:
        for step in range(steps):
            rows = next(batches)
            loss = loss_of(rows)
            # only the trained tensors: the weights' .grad is never touched
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            optimizer.step()
            value = float(loss.detach())
            # a step counts once it is complete; an interrupt before this line discards it
            run.snapshot = [p.detach().clone() for p in params]
            run.losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if callback is not None:
                callback(step + 1, value)
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        bar.close()
    return run


def _check_common(
    model: SteeredModel,
    layer: object,
    steps: object,
    lr: object,
    positions: PositionSpec,
    seed: object,
    batch_size: object,
    penalty: object,
    progress: object,
) -> tuple[int, int, float, int, int, float]:
    if not isinstance(model, SteeredModel):
        raise InvalidInputError(
            f"model must be a SteeredModel (sl.load_model / sl.wrap), not {type(model).__name__}"
        )
    resolved = model.adapter.resolve_layer(as_int(layer, "layer"))
    n_steps = as_positive_int(steps, "steps")
    rate = as_finite_float(lr, "lr")
    if rate <= 0:
        raise InvalidInputError(f"lr must be positive, got {rate}")
    Positions.parse(positions)
    if isinstance(positions, str) and ":" in positions:
        raise InvalidInputError(
            f"positions {positions!r}: training takes 'all', 'prompt', 'generated', 'last' or "
            f"token indices, not marker text"
        )
    weight = as_finite_float(penalty, "penalty")
    if weight < 0:
        raise InvalidInputError(f"penalty must be non-negative, got {weight}")
    if not (progress is None or isinstance(progress, bool) or callable(progress)):
        raise InvalidInputError(
            f"progress must be True, False, None or a callable(step, loss), got {progress!r}"
        )
    return (
        resolved,
        n_steps,
        rate,
        as_int(seed, "seed"),
        as_positive_int(batch_size, "batch_size"),
        weight,
    )


def _metadata(
    model: SteeredModel,
    *,
    method: str,
    objective: str,
    items: Sequence[PreferenceItem],
    run: _Run,
    steps: int,
    lr: float,
    positions: PositionSpec,
    **extra: Any,
) -> dict[str, Any]:
    return vector_metadata(
        model,
        method=method,
        positions=positions
        if isinstance(positions, (str, int))
        else Positions.parse(positions).describe(),
        objective=objective,
        steps=len(run.losses),
        steps_requested=steps,
        lr=lr,
        final_loss=run.losses[-1] if run.losses else None,
        loss_curve=list(run.losses),
        interrupted=run.interrupted,
        data_hash=data_hash(items),
        n_items=len(items),
        recommended_strength=1.0,
        **extra,
    )


class _VectorObjective:
    """The loss of :func:`train_vector` on rows of ``items``, as a function of the vector."""

    def __init__(
        self,
        model: SteeredModel,
        items: Sequence[PreferenceItem],
        *,
        layer: int,
        objective: str,
        positions: PositionSpec,
        beta: float,
        penalty: float,
        chat: bool,
        batch_size: int,
    ) -> None:
        self.model = model
        self.enc = _encode(model, items, chat)
        self.layer = layer
        self.objective = objective
        self.positions = positions
        self.beta = beta
        self.penalty = penalty
        self.base = SteeringVector({layer: torch.zeros(model.d_model)})
        self.reference: dict[str, torch.Tensor] = {}
        if objective == "preference":  # log p_0 of both completions, once
            every = list(range(len(items)))
            with torch.no_grad():
                for which in ("chosen", "rejected"):
                    parts = [
                        self.logprobs(every[s : s + batch_size], None, which)[0].detach()
                        for s in range(0, len(every), batch_size)
                    ]
                    self.reference[which] = torch.cat(parts)

    def logprobs(
        self, rows: Sequence[int], steering: _LiveSteering | None, which: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tails = [getattr(self.enc, which)[i] for i in rows]
        batch = _batch([self.enc.prompt[i] for i in rows], tails, self.model.pad_token_id)
        return _steered_logprobs(self.model, steering, batch, tails)

    def steering(self, vector: torch.Tensor, sign: float) -> _LiveSteering:
        return _LiveSteering(
            self.base, strength=sign, positions=self.positions, live={self.layer: (vector, {})}
        )

    def __call__(self, rows: Sequence[int], vector: torch.Tensor) -> torch.Tensor:
        if self.objective == "likelihood":
            total, counts = self.logprobs(rows, self.steering(vector, 1.0), "chosen")
            return -total.sum() / counts.sum() + self.penalty * (vector * vector).sum()
        index = torch.tensor(list(rows))
        margin = {}
        for sign in (1.0, -1.0):
            live = self.steering(vector, sign)
            gains = [
                self.logprobs(rows, live, which)[0] - self.reference[which][index].to(vector.device)
                for which in ("chosen", "rejected")
            ]
            margin[sign] = gains[0] - gains[1]
        loss = -torch.nn.functional.logsigmoid(self.beta * margin[1.0])
        loss = loss - torch.nn.functional.logsigmoid(-self.beta * margin[-1.0])
        return loss.mean()


def _check_objective(objective: object, beta: object) -> float:
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    value = as_finite_float(beta, "beta")
    if value <= 0:
        raise InvalidInputError(f"beta must be positive, got {value}")
    return value


def training_loss(
    model: SteeredModel,
    data: TrainingData,
    vector: torch.Tensor | SteeringVector,
    *,
    layer: int,
    objective: str = "preference",
    positions: PositionSpec = "all",
    beta: float = 0.1,
    penalty: float = 1e-3,
    chat: bool = False,
) -> torch.Tensor:
    """The objective :func:`train_vector` minimises, at ``vector``, over all of ``data``.

    ``vector`` is a ``[d_model]`` tensor (differentiable: with ``requires_grad`` the result
    has its gradient, as in training) or a :class:`~steerlab.vectors.SteeringVector` (its
    direction at ``layer``). Use it for the loss on held-out items.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> data = [{"prompt": "the movie was", "chosen": " good", "rejected": " bad"}]
    >>> with torch.no_grad():  # evaluation only: no graph
    ...     loss = sl.training_loss(model, data, torch.zeros(32), layer=1)
    >>> round(float(loss), 6)  # 2·log 2 at v = 0
    1.386294
    """
    if not isinstance(model, SteeredModel):
        raise InvalidInputError(f"model must be a SteeredModel, not {type(model).__name__}")
    resolved = model.adapter.resolve_layer(as_int(layer, "layer"))
    beta = _check_objective(objective, beta)
    if isinstance(vector, SteeringVector):
        vector = vector.directions[resolved] if resolved in vector else vector[vector.layers[0]]
    if not isinstance(vector, torch.Tensor) or vector.shape != (model.d_model,):
        raise InvalidInputError(f"vector must be a tensor of shape [{model.d_model}]")
    items = preference_items(data)
    loss = _VectorObjective(
        model,
        items,
        layer=resolved,
        objective=objective,
        positions=positions,
        beta=beta,
        penalty=as_finite_float(penalty, "penalty"),
        chat=bool(chat),
        batch_size=len(items),
    )
    return loss(range(len(items)), vector.to(model.device))


def train_vector(
    model: SteeredModel,
    data: TrainingData,
    *,
    layer: int,
    objective: str = "preference",
    steps: int = 100,
    lr: float = 0.01,
    positions: PositionSpec = "all",
    seed: int = 0,
    progress: Progress = None,
    batch_size: int = 8,
    beta: float = 0.1,
    penalty: float = 1e-3,
    chat: bool = False,
) -> SteeringVector:
    """A steering vector at ``layer`` optimised on ``data`` (see :func:`preference_items`).

    ``objective="preference"`` is BiPO (arXiv 2406.00045; ``beta`` its β), ``"likelihood"``
    the chosen completions' per-token log-likelihood with ``penalty·‖v‖²`` (see the module
    docstring and :func:`training_loss`). The vector starts at zero and takes ``steps`` Adam
    steps of learning rate ``lr`` on mini-batches of ``batch_size`` items drawn without
    replacement (order from ``seed``), steering ``positions`` (counted as in generation: the
    prompt, then the completion as the generated tokens). Apply it at strength 1 (``-1`` for
    the opposite behaviour): its norm is its dose.

    ``progress``: a bar with the loss on a terminal (``None``: on long runs only; ``True`` /
    ``False`` force it), or a callable ``progress(step, loss)`` called after each step. Ctrl-C
    (``KeyboardInterrupt``) stops at a step boundary: the vector after the last completed step
    is returned, with ``metadata["interrupted"] = True``. Metadata also records ``method``
    (``"trained"``), ``objective``, ``steps`` (completed), ``lr``, ``final_loss``,
    ``loss_curve`` and ``data_hash``.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("gpt2")
    >>> data = [{"prompt": "i think the film was", "chosen": " good", "rejected": " bad"}]
    >>> vec = sl.train_vector(model, data, layer=1, objective="likelihood", steps=3, lr=0.1)
    >>> vec.metadata["objective"], len(vec.metadata["loss_curve"])
    ('likelihood', 3)
    """
    resolved, steps, lr, seed, batch_size, penalty = _check_common(
        model, layer, steps, lr, positions, seed, batch_size, penalty, progress
    )
    beta = _check_objective(objective, beta)
    items = preference_items(data)
    loss = _VectorObjective(
        model,
        items,
        layer=resolved,
        objective=objective,
        positions=positions,
        beta=beta,
        penalty=penalty,
        chat=bool(chat),
        batch_size=batch_size,
    )
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    vector = torch.zeros(model.d_model, dtype=dtype, device=model.device, requires_grad=True)
    run = _optimise(
        [vector],
        lambda rows: loss(rows, vector),
        n_items=len(items),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        gen=torch.Generator().manual_seed(seed),
        progress=progress,
        desc=f"train {objective}",
    )
    extra: dict[str, Any] = {"beta": beta} if objective == "preference" else {"penalty": penalty}
    metadata = _metadata(
        model,
        method="trained",
        objective=objective,
        items=items,
        run=run,
        steps=steps,
        lr=lr,
        positions=positions,
        seed=seed,
        batch_size=batch_size,
        chat=bool(chat),
        **extra,
    )
    return SteeringVector({resolved: run.snapshot[0].detach().cpu()}, metadata=metadata)


def _orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """``R`` with orthonormal rows spanning the rows of ``raw`` (differentiable, via QR)."""
    q, r = torch.linalg.qr(raw.transpose(0, 1))
    # QR's signs are arbitrary; fixing diag(r) > 0 makes R a function of ``raw`` alone
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).transpose(0, 1)


def _loreft_steering(
    d_model: int,
    layer: int,
    positions: PositionSpec,
    r: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
) -> _LiveSteering:
    rank = r.shape[0]
    extras = {f"loreft_r{i}": r[i] for i in range(rank)}
    extras.update({f"loreft_w{i}": w[i] for i in range(rank)})
    extras["loreft_b"] = torch.cat([b, b.new_zeros(d_model - rank)])
    return _LiveSteering(
        SteeringVector({layer: torch.zeros(d_model)}),
        strength=1.0,
        positions=positions,
        op=get_operator("loreft"),
        live={layer: (r[0], extras)},
    )


def _loreft_loss(
    model: SteeredModel,
    enc: _Encoded,
    rows: Sequence[int],
    matrices: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    layer: int,
    positions: PositionSpec,
    penalty: float,
) -> torch.Tensor:
    r, w, b = matrices
    tails = [enc.chosen[i] for i in rows]
    batch = _batch([enc.prompt[i] for i in rows], tails, model.pad_token_id)
    live = _loreft_steering(model.d_model, layer, positions, r, w, b)
    total, counts = _steered_logprobs(model, live, batch, tails)
    size = ((w - r) ** 2).sum() + (b * b).sum()
    return -total.sum() / counts.sum() + penalty * size


def intervention_loss(
    model: SteeredModel,
    data: TrainingData,
    intervention: SteeringVector | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    layer: int,
    positions: PositionSpec = "all",
    penalty: float = 1e-3,
    chat: bool = False,
) -> torch.Tensor:
    """The objective :func:`train_intervention` minimises, over all of ``data``.

    ``intervention`` is a LoReFT vector (its matrices at ``layer``) or the matrices
    ``(R, W, b)`` themselves (``[rank, d_model]``, ``[rank, d_model]``, ``[rank]``;
    differentiable, as in training, where ``R`` is the QR-orthonormalised form of the trained
    matrix). Use it for the loss on held-out items.

    >>> import torch, steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> data = [{"prompt": "the movie was", "chosen": " good", "rejected": " bad"}]
    >>> r = torch.eye(32)[:2]
    >>> with torch.no_grad():  # W = R, b = 0: the identity, so the unsteered NLL
    ...     same = sl.intervention_loss(model, data, (r, r, torch.zeros(2)), layer=1)
    ...     plain = sl.training_loss(model, data, torch.zeros(32), layer=1,
    ...                              objective="likelihood")
    >>> bool(torch.isclose(same, plain))
    True
    """
    if not isinstance(model, SteeredModel):
        raise InvalidInputError(f"model must be a SteeredModel, not {type(model).__name__}")
    resolved = model.adapter.resolve_layer(as_int(layer, "layer"))
    if isinstance(intervention, SteeringVector):
        per_layer = {}
        for name, tensors in intervention.extras.items():
            if resolved in tensors or len(tensors) == 1:
                per_layer[name] = tensors.get(resolved, next(iter(tensors.values())))
        intervention = loreft_matrices(per_layer)
    if not (isinstance(intervention, tuple) and len(intervention) == 3):
        raise InvalidInputError("intervention must be a LoReFT vector or a tuple (R, W, b)")
    r, w, b = intervention
    if r.ndim != 2 or w.shape != r.shape or b.shape != (r.shape[0],) or r.shape[1] != model.d_model:
        raise InvalidInputError(
            f"LoReFT matrices must be R, W [rank, {model.d_model}] and b [rank], got "
            f"{tuple(r.shape)}, {tuple(w.shape)}, {tuple(b.shape)}"
        )
    Positions.parse(positions)
    items = preference_items(data)
    device = model.device
    return _loreft_loss(
        model,
        _encode(model, items, bool(chat)),
        range(len(items)),
        (r.to(device), w.to(device), b.to(device)),
        layer=resolved,
        positions=positions,
        penalty=as_finite_float(penalty, "penalty"),
    )


def train_intervention(
    model: SteeredModel,
    data: TrainingData,
    *,
    layer: int,
    rank: int = 4,
    steps: int = 100,
    lr: float = 0.01,
    positions: PositionSpec = "all",
    seed: int = 0,
    progress: Progress = None,
    batch_size: int = 8,
    penalty: float = 1e-3,
    chat: bool = False,
) -> SteeringVector:
    """A LoReFT intervention at ``layer`` (operator ``"loreft"``) trained on ``data``.

    Learns ``R`` (``rank`` orthonormal rows, kept orthonormal by a QR parametrisation), ``W``
    and ``b`` so that the chosen completions become likely under ``h + Rᵀ(W h + b − R h)``
    (per-token negative log-likelihood plus ``penalty·(‖W − R‖² + ‖b‖²)``; the rejected
    completions are not used). It starts as the identity (``W = R``, ``b = 0``, ``R`` random
    from ``seed``). The result is a :class:`~steerlab.vectors.SteeringVector` whose extras hold
    the matrices (:func:`~steerlab.operators.loreft_extras`) and whose direction is ``Rᵀb``
    (the edit's constant part); use it with ``op="loreft"`` anywhere ``op=`` is taken. Other
    options, progress and Ctrl-C are as in :func:`train_vector`.

    >>> import steerlab as sl
    >>> from steerlab.testing import tiny_model
    >>> model = tiny_model("llama")
    >>> data = [{"prompt": "the weather today is", "chosen": " cold", "rejected": " warm"}]
    >>> ref = sl.train_intervention(model, data, layer=1, rank=2, steps=3, lr=0.05)
    >>> sorted(ref.extras)[:3], ref.metadata["rank"]
    (['loreft_b', 'loreft_r0', 'loreft_r1'], 2)
    >>> logits = model.logits(["the weather today is"], steering=ref, op="loreft")
    """
    resolved, steps, lr, seed, batch_size, penalty = _check_common(
        model, layer, steps, lr, positions, seed, batch_size, penalty, progress
    )
    rank = as_positive_int(rank, "rank")
    if rank > model.d_model:
        raise InvalidInputError(f"rank must be at most d_model={model.d_model}, got {rank}")
    items = preference_items(data)
    enc = _encode(model, items, bool(chat))
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    init = torch.randn(rank, model.d_model, generator=gen, dtype=torch.float64)
    # a copy: on a float64 model ``to`` would return ``init`` itself, and ``weight`` below would
    # then be computed from a tensor that requires grad (not a leaf the optimiser can take)
    raw = init.to(dtype=dtype, device=model.device, copy=True).requires_grad_(True)
    weight = _orthonormal_rows(init).to(dtype=dtype, device=model.device).requires_grad_(True)
    bias = torch.zeros(rank, dtype=dtype, device=model.device, requires_grad=True)

    def loss_of(rows: list[int]) -> torch.Tensor:
        matrices = (_orthonormal_rows(raw), weight, bias)
        return _loreft_loss(
            model, enc, rows, matrices, layer=resolved, positions=positions, penalty=penalty
        )

    run = _optimise(
        [raw, weight, bias],
        loss_of,
        n_items=len(items),
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        gen=gen,
        progress=progress,
        desc="train loreft",
    )
    raw_final, w_final, b_final = (t.detach().cpu() for t in run.snapshot)
    r_final = _orthonormal_rows(raw_final)
    metadata = _metadata(
        model,
        method="loreft",
        objective="likelihood",
        items=items,
        run=run,
        steps=steps,
        lr=lr,
        positions=positions,
        rank=rank,
        penalty=penalty,
        seed=seed,
        batch_size=batch_size,
        chat=bool(chat),
        recommended_op="loreft",
    )
    return SteeringVector(
        {resolved: (b_final @ r_final).float()},
        metadata=metadata,
        extras=loreft_extras(r_final.float(), w_final.float(), b_final.float(), resolved),
    )

"""The position tracker without a 2-D padding mask: 4-D masks (Gemma 2's HybridCache generation on
transformers 4.x) and bare ``position_ids`` give the same absolute positions as the 2-D mask."""

from __future__ import annotations

import torch

from steerlab.interventions import PositionTracker
from steerlab.positions import Positions


def _four_d(mask_2d: torch.Tensor, queries: int, *, keys: int | None = None) -> torch.Tensor:
    """HF-style additive 4-D mask: 0 where a query may attend, the dtype's min elsewhere."""
    batch, total = mask_2d.shape
    keys = keys or total
    padded = torch.zeros(batch, keys, dtype=torch.bool)
    padded[:, :total] = mask_2d.bool()
    q_pos = torch.arange(total - queries, total)[:, None]
    causal = torch.arange(keys)[None, :] <= q_pos
    allowed = causal[None] & padded[:, None, :]
    out = torch.zeros(batch, 1, queries, keys)
    return out.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


def _run(kwargs: dict[str, object]) -> PositionTracker:
    tracker = PositionTracker()
    tracker.pre_hook(torch.nn.Identity(), (), kwargs)
    return tracker


def test_four_d_mask_gives_the_same_positions_as_the_padding_mask() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    ids = torch.zeros(2, 5, dtype=torch.long)
    flat = _run({"input_ids": ids, "attention_mask": mask})
    # static cache of 8 slots (HybridCache): keys past the prompt are future, masked
    four = _run(
        {
            "input_ids": ids,
            "attention_mask": _four_d(mask, 5, keys=8),
            "cache_position": torch.arange(5),
        }
    )
    assert flat.abs_index is not None and four.abs_index is not None
    assert (
        four.abs_index.tolist() == flat.abs_index.tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    )
    assert four.prompt_lengths is not None and four.prompt_lengths.tolist() == [3, 5]
    assert not four.all_real
    last = Positions.parse("last")
    assert torch.equal(four.mask(last), flat.mask(last))


def test_a_generation_step_with_a_four_d_mask_counts_from_the_real_start() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # prompt + one new token
    tracker = PositionTracker()
    tracker.prompt_lengths = torch.tensor([3, 5])
    tracker.pre_hook(
        torch.nn.Identity(),
        (),
        {
            "input_ids": torch.zeros(2, 1, dtype=torch.long),
            "attention_mask": _four_d(mask, 1, keys=8),
            "cache_position": torch.tensor([5]),
        },
    )
    assert tracker.abs_index is not None and tracker.abs_index.tolist() == [[3], [5]]
    assert tracker.all_real


def test_position_ids_without_a_mask_are_the_positions() -> None:
    tracker = _run(
        {"input_ids": torch.zeros(2, 1, dtype=torch.long), "position_ids": torch.tensor([[3], [5]])}
    )
    assert tracker.abs_index is not None and tracker.abs_index.tolist() == [[3], [5]]
    plain = _run({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    assert plain.abs_index is not None and plain.abs_index.tolist() == [[0, 1, 2]]

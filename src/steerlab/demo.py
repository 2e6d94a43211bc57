"""The main job, ``steerlab demo``: a sentiment vector on the default model, end to end.

1. load the model (default: the embedded SmolLM2-135M-Instruct);
2. split the built-in sentiment pairs and neutral prompts into train and held-out halves (seeded);
3. compute mean-difference vectors on the train pairs and let :func:`steerlab.tuning.tune` pick
   the layer and strength (best behaviour under a KL damage budget, on train prompts only);
4. print held-out continuations side by side at several strengths, and the measured held-out shift
   in log-probability of positive vs negative words, with its damage (KL);
5. save the vector, with the recommended strength in its metadata.

>>> from steerlab.testing import tiny_model
>>> from steerlab.demo import run_demo
>>> import tempfile, pathlib, io, contextlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "v.safetensors"
>>> with contextlib.redirect_stdout(io.StringIO()):
...     summary = run_demo(model=tiny_model("llama"), layers=[1], strengths=[1.0, 2.0],
...                        max_new_tokens=3, n_prompts=1, out=out)
>>> out.exists(), sorted(summary)[:3]
(True, ['baseline', 'damage', 'layer'])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEMO_STRENGTHS", "run_demo"]

DEMO_STRENGTHS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)


def run_demo(
    *,
    model: Any = None,
    model_name: str | None = None,
    layers: Sequence[int] | None = None,
    strengths: Sequence[float] = DEMO_STRENGTHS,
    max_new_tokens: int = 24,
    n_prompts: int = 3,
    out: Path = Path("steerlab-sentiment.safetensors"),
    seed: int = 0,
    max_kl: float | None = None,
) -> dict[str, float]:
    """Run the demo and return its held-out numbers (``layer``, ``strength``, ``baseline``,
    ``steered``, ``shift``, ``damage``). Prints tables through rich."""
    from rich.console import Console
    from rich.table import Table

    import steerlab as sl
    from steerlab.sweeps import DEFAULT_MAX_KL
    from steerlab.tuning import tune

    console = Console(width=max(Console().width, 120))
    if model is None:
        with console.status("loading the model (the first run converts the embedded GGUF)..."):
            model = sl.load_model(model_name)
    console.print(
        f"[bold]model[/bold] {model.name}: {model.n_layers} layers, d_model {model.d_model}"
    )
    result = tune(
        model,
        "sentiment",
        layers=layers,
        strengths=[0.0, *[s for s in strengths if s != 0.0]],
        max_kl=DEFAULT_MAX_KL if max_kl is None else max_kl,
        seed=seed,
        n_examples=0,
        max_new_tokens=max_new_tokens,
    )
    console.print(result.summary())
    layer, strength = result.recommended
    vector = result.recommended_vector
    if strength == 0.0:  # nothing within budget: still show what steering does
        strength = min(s for s in strengths if s > 0)

    prompts = list(result.settings.get("test_prompts", ()))[:n_prompts] or list(
        sl.data.neutral_prompts("sentiment")[-n_prompts:]
    )
    shown = [-strength, 0.0, strength / 2, strength]
    texts = {
        s: model.generate(prompts, max_new_tokens=max_new_tokens, steering=vector.scaled(s))
        if s != 0.0
        else model.generate(prompts, max_new_tokens=max_new_tokens)
        for s in shown
    }
    table = Table(title=f"held-out prompts, layer {layer}", show_lines=True)
    table.add_column("prompt", style="bold")
    for s in shown:
        table.add_column("unsteered" if s == 0 else f"strength {s:+g}")
    for i, prompt in enumerate(prompts):
        table.add_row(prompt, *[texts[s][i] for s in shown])
    console.print(table)

    held = result.heldout
    console.print(
        f"[bold]held-out shift[/bold] (log P(positive words) - log P(negative words), "
        f"{held.n_prompts} prompts the vector never saw): {held.baseline:.3f} -> "
        f"{held.steered:.3f} ({held.shift:+.3f} ± {held.shift_sem:.3f}); "
        f"KL(unsteered || steered) {held.damage:.3f} nats"
    )
    saved = vector.with_metadata(recommended_strength=strength, recommended_layer=layer).save(out)
    console.print(
        f'saved the vector to {saved}; try: steerlab generate "The weather today is" '
        f"-v {saved} -s {strength:g} --compare"
    )
    return {
        "layer": float(layer),
        "strength": float(strength),
        "baseline": float(held.baseline),
        "steered": float(held.steered),
        "shift": float(held.shift),
        "damage": float(held.damage),
    }

"""The issue's targets, evaluated on a results dict (ratios of medians)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from benchmarks.common import ratio


@dataclass(frozen=True)
class Target:
    """One target row: ``value op threshold`` on a ratio of two timing medians."""

    id: str
    workload: str
    what: str
    op: str  # "<=" or ">="
    threshold: float

    def check(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold


_FLOOR = {"extraction": "transformers_bare_forward", "generation": "transformers_unsteered"}


def _timing(results: dict[str, Any], workload: str, name: str) -> dict[str, Any] | None:
    data = results.get("workloads", {}).get(workload, {})
    timing = data.get("timings", {}).get(name) if isinstance(data, dict) else None
    return timing if isinstance(timing, dict) else None


def _row(
    target: Target,
    value: float | None,
    *,
    status: str | None = None,
    note: str = "",
    profile_key: str | None = None,
    timings: tuple[dict[str, Any], dict[str, Any]] | None = None,
    paired: bool = True,
) -> dict[str, Any]:
    """One target row. With ``timings`` (numerator, denominator) it also carries the ratio of
    the fastest runs and, for variants timed in the same rounds (``paired``), the range of the
    per-round ratios: when the threshold lies inside that range the verdict is within the
    machine's run-to-run noise, and the note says so."""
    if status is None:
        status = "n/a" if value is None else ("pass" if target.check(value) else "miss")
    row: dict[str, Any] = {
        "id": target.id,
        "workload": target.workload,
        "what": target.what,
        "ratio": None if value is None else round(value, 4),
        "ratio_of_min": None,
        "round_ratios": None,
        "target": f"{target.op} {target.threshold:g}",
        "status": status,
        "note": note,
        "profile_key": profile_key,
    }
    if timings is not None:
        num, den = timings
        row["ratio_of_min"] = round(float(num["min"]) / float(den["min"]), 4)
        a, b = num.get("times", []), den.get("times", [])
        if paired and len(a) == len(b) and len(a) >= 2:
            per_round = sorted(x / y for x, y in zip(a, b))
            row["round_ratios"] = [round(r, 4) for r in per_round]
            if per_round[0] <= target.threshold <= per_round[-1]:
                spread = f"per-round ratios {per_round[0]:.3f}-{per_round[-1]:.3f}"
                row["note"] = "; ".join(
                    x for x in (note, f"within run-to-run noise ({spread})") if x
                )
    return row


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target row: measured ratio, the target, pass / miss / n/a (with the reason)."""
    rows: list[dict[str, Any]] = []

    def timed(
        target: Target,
        workload: str,
        num: str,
        den: str,
        profile_key: str | None = None,
        note: str = "",
    ) -> None:
        a, b = _timing(results, workload, num), _timing(results, workload, den)
        if a is None or b is None:
            missing = num if a is None else den
            rows.append(_row(target, None, note=f"not measured ({missing})"))
            return
        rows.append(_row(target, ratio(a, b), note=note, profile_key=profile_key, timings=(a, b)))

    gen, ext = "generation", "extraction"
    for config, label in (("one_layer", "1 layer"), ("four_layers", "4 layers")):
        timed(
            Target(
                f"gen_{config}_vs_transformers",
                gen,
                f"steered generation ({label}) / unsteered transformers generate",
                "<=",
                1.03,
            ),
            gen,
            f"steerlab_{config}_all",
            "transformers_unsteered",
            profile_key=f"generation/steerlab_{config}_all",
        )
    timed(
        Target(
            "extraction_vs_bare_forward",
            ext,
            "extraction (all layers, last token) / bare batched forward",
            "<=",
            1.05,
        ),
        ext,
        "steerlab",
        "transformers_bare_forward",
        profile_key="extraction/steerlab",
    )
    timed(
        Target(
            "extraction_vs_nnsight", ext, "extraction: steerlab / nnsight (seed recipe)", "<=", 1.0
        ),
        ext,
        "steerlab",
        "nnsight",
    )
    for config, label in (("one_layer", "1 layer"), ("four_layers", "4 layers")):
        timed(
            Target(
                f"gen_{config}_vs_nnsight",
                gen,
                f"steered generation ({label}): steerlab / nnsight (seed recipe)",
                "<=",
                1.0,
            ),
            gen,
            f"steerlab_{config}_all",
            f"nnsight_{config}",
            note="steerlab steers every token, nnsight the seed's [:, -1] at every step",
        )
    for peer, data in results.get("peers", {}).items():
        status = data.get("status")
        peer_load = data.get("workloads", {})
        for workload, ours, theirs, label in (
            ("extraction", ("extraction", "steerlab"), ("extraction", "peer"), "extraction"),
            (
                "one_layer",
                ("generation", "steerlab_one_layer_all"),
                ("generation", "one_layer"),
                "steered generation (1 layer)",
            ),
            (
                "four_layers",
                ("generation", "steerlab_four_layers_all"),
                ("generation", "four_layers"),
                "steered generation (4 layers)",
            ),
        ):
            target = Target(
                f"{workload}_vs_{peer}", ours[0], f"{label}: steerlab / {peer}", "<=", 1.0
            )
            if status != "ok":
                rows.append(
                    _row(
                        target,
                        None,
                        status="n/a",
                        note=f"{peer} {status}: {data.get('reason', '')[:200]}",
                    )
                )
                continue
            a = _timing(results, *ours)
            b = peer_load.get(theirs[0], {}).get("timings", {}).get(theirs[1])
            if a is None or b is None:
                reason = peer_load.get(theirs[0], {}).get("error", "not measured")
                rows.append(_row(target, None, note=str(reason)[:200]))
                continue
            version = data.get("versions", {}).get("transformers")
            floor_ours = _timing(results, ours[0], _FLOOR[ours[0]])
            floor_theirs = peer_load.get(theirs[0], {}).get("timings", {}).get("floor")
            context = ""
            if floor_ours and floor_theirs:
                context = (
                    f"; vs own floor: steerlab {ratio(a, floor_ours):.3f}, "
                    f"{peer} {ratio(b, floor_theirs):.3f}"
                )
            rows.append(
                _row(
                    target,
                    ratio(a, b),
                    note=f"{peer} ran on transformers {version}, in its own process{context}",
                    timings=(a, b),
                    paired=False,
                )
            )
    for workload, label in (("strength_sweep", "strength sweep"), ("layer_sweep", "layer sweep")):
        data = results.get("workloads", {}).get(workload, {})
        target = Target(
            f"{workload}_speedup",
            workload,
            f"{label}: one-at-a-time / batched + prefix reuse (sweeps.sweep)",
            ">=",
            3.0,
        )
        if isinstance(data, dict) and data.get("status") == "pending":
            rows.append(_row(target, None, status="pending", note=data.get("reason", "")))
            continue
        timed(
            target,
            workload,
            "steerlab_one_at_a_time",
            "steerlab_batched_prefix",
            profile_key=f"{workload}/steerlab_batched_prefix",
        )
    ablation = results.get("workloads", {}).get("head_ablation", {})
    target = Target(
        "head_ablation_speedup",
        "head_ablation",
        "head ablation scan: one-at-a-time / ablation_scan",
        ">=",
        3.0,
    )
    if isinstance(ablation, dict) and ablation.get("status") == "pending":
        rows.append(_row(target, None, status="pending", note=ablation.get("reason", "")))
    else:
        timed(
            target,
            "head_ablation",
            "steerlab_one_at_a_time",
            "ablation_scan_fast",
            profile_key="head_ablation/ablation_scan_fast",
        )
    rows.append(_memory_row(results))
    _add_direct_notes(results, rows)
    return rows


def _add_direct_notes(results: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Append the direct overhead measurements to the overhead targets' notes."""
    loads = results.get("workloads", {})
    checks = {w: (loads.get(w) or {}).get("checks") or {} for w in ("extraction", "generation")}
    direct = {
        "extraction_vs_bare_forward": checks["extraction"].get("steerlab_own_time"),
        "gen_one_layer_vs_transformers": checks["generation"].get("one_layer_hook_time"),
        "gen_four_layers_vs_transformers": checks["generation"].get("four_layers_hook_time"),
    }
    for row in rows:
        measured = direct.get(row["id"])
        if isinstance(measured, dict) and "share" in measured:
            what = "steerlab's own code" if row["id"].startswith("extraction") else "steering hooks"
            extra = f"measured directly: {what} took {100 * measured['share']:.2f}% of the time"
            row["direct_share"] = measured["share"]
            row["note"] = "; ".join(x for x in (row["note"], extra) if x)


def _memory_row(results: dict[str, Any]) -> dict[str, Any]:
    target = Target(
        "memory_flat",
        "memory",
        "extraction peak memory growth / growth of the returned activations "
        "(1.0 = only the answer grows)",
        "<=",
        1.10,
    )
    data = results.get("workloads", {}).get("memory")
    rows = [r for r in (data or {}).get("rows", []) if "error" not in r]
    if len(rows) < 2:
        return _row(target, None, note="fewer than two sizes measured")
    first, last = rows[0], rows[-1]
    grown = (last["peak_rss_bytes"] - last["rss_before_bytes"]) - (
        first["peak_rss_bytes"] - first["rss_before_bytes"]
    )
    answer = last["result_bytes"] - first["result_bytes"]
    if answer <= 0:
        return _row(target, None, note="result size did not grow")
    return _row(
        target,
        grown / answer,
        note=f"{first['n_prompts']} -> {last['n_prompts']} prompts: extraction memory "
        f"+{grown / 2**20:.0f} MiB for +{answer / 2**20:.0f} MiB of activations",
    )

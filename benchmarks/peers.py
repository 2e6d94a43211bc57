"""Peers in their own virtual environments: steering-vectors and repeng.

Both pin older stacks than steerlab (steering-vectors needs ``transformers<5``; repeng brings
``numpy<2``), so each gets a venv under the benchmark work dir (``benchmarks/work/venvs/<peer>``,
git-ignored), built once and reused while its recipe is unchanged:

1. ``python3 -m venv``;
2. the same torch as the main environment, CPU build: from the local wheel directory
   (``/opt/wheels``) when it exists, else from PyTorch's CPU index; a constraints file pins it so
   installing the peer can never replace it (for example by a CUDA build);
3. the peer at a pinned version, with whatever dependencies it declares.

A driver script (``benchmarks/drivers/<peer>_driver.py``) then runs the workloads in a subprocess
and prints JSON. A peer that cannot be installed or fails a workload is reported with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BENCH_DIR, log

WHEEL_DIR = Path("/opt/wheels")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Peer:
    """A peer library: its pip requirement and the driver that runs it."""

    name: str
    requirement: str
    driver: str


PEERS: dict[str, Peer] = {
    "steering-vectors": Peer(
        "steering-vectors", "steering-vectors==0.12.2", "steering_vectors_driver.py"
    ),
    "repeng": Peer("repeng", "repeng==0.4.0", "repeng_driver.py"),
}


class PeerUnavailable(Exception):
    """The peer's environment could not be built; the message says why."""


def _torch_requirement() -> str:
    return "torch==" + torch.__version__.split("+")[0]


def _run(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _tail(text: str, limit: int = 1500) -> str:
    lines = [line for line in text.strip().splitlines() if "Location 'file://" not in line]
    return "\n".join(lines)[-limit:]


def ensure_venv(peer: Peer, work_dir: Path, *, timeout: float = 1800) -> Path:
    """The peer venv's python, building the venv if its recipe changed; or PeerUnavailable."""
    venv = work_dir / "venvs" / peer.name
    python = venv / "bin" / "python"
    recipe = {"torch": _torch_requirement(), "peer": peer.requirement, "python": sys.version}
    marker = venv / "steerlab-bench-recipe.json"
    if python.exists() and marker.exists() and json.loads(marker.read_text()) == recipe:
        return python
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"  building venv for {peer.name} in {venv} ...")
    constraints = venv / "constraints.txt"
    source = (
        ["--find-links", str(WHEEL_DIR)] if WHEEL_DIR.is_dir() else ["--index-url", TORCH_CPU_INDEX]
    )
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    try:
        done = _run([sys.executable, "-m", "venv", str(venv)], timeout=timeout)
        if done.returncode != 0:
            raise PeerUnavailable(f"venv creation failed: {_tail(done.stderr)}")
        constraints.write_text(recipe["torch"] + "\n")
        done = _run([*pip, *source, recipe["torch"]], timeout=timeout)
        if done.returncode != 0:
            raise PeerUnavailable(
                f"installing {recipe['torch']} (CPU) failed: {_tail(done.stderr or done.stdout)}"
            )
        extra = ["--find-links", str(WHEEL_DIR)] if WHEEL_DIR.is_dir() else []
        done = _run([*pip, *extra, "-c", str(constraints), peer.requirement], timeout=timeout)
        if done.returncode != 0:
            raise PeerUnavailable(
                f"pip install {peer.requirement} failed: {_tail(done.stderr or done.stdout)}"
            )
        check = _run(
            [str(python), "-c", "import torch; print(torch.version.cuda is None)"], timeout=300
        )
        if check.stdout.strip() != "True":
            raise PeerUnavailable(f"the venv's torch is not a CPU build: {_tail(check.stderr)}")
    except subprocess.TimeoutExpired as error:
        raise PeerUnavailable(f"building the venv timed out: {error}") from None
    marker.write_text(json.dumps(recipe))
    return python


def run_peer(
    peer: Peer, spec: dict[str, Any], work_dir: Path, *, timeout: float = 3600
) -> dict[str, Any]:
    """Build (or reuse) the venv, run the driver on ``spec``; always returns a status dict."""
    try:
        python = ensure_venv(peer, work_dir)
    except PeerUnavailable as error:
        return {"status": "unavailable", "reason": str(error), "requirement": peer.requirement}
    spec_path = work_dir / f"{peer.name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    driver = BENCH_DIR / "drivers" / peer.driver
    log(f"  running {peer.name} driver ...")
    try:
        done = subprocess.run(
            [str(python), str(driver), str(spec_path)],
            stdout=subprocess.PIPE,
            stderr=None,  # the driver's progress lines go straight to our stderr
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"driver timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {
            "status": "failed",
            "reason": f"driver exited with {done.returncode} and printed no JSON",
            "stdout_tail": _tail(done.stdout),
        }
    result: dict[str, Any] = json.loads(lines[-1])
    result["requirement"] = peer.requirement
    return result

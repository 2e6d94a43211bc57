"""``steerlab serve`` as users run it: a subprocess on a free port, stopped with Ctrl-C (SIGINT).

The fast test serves a tiny model saved to disk; the slow one the real default model, checked
against the library token for token."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

import steerlab as sl  # noqa: E402
from steerlab.server.app import free_port  # noqa: E402
from steerlab.testing import tiny_model  # noqa: E402

_SRC = str(Path(sl.__file__).resolve().parents[1])


@contextmanager
def _serve(args: list[str], timeout: float = 240.0) -> Iterator[tuple[str, list[str]]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": _SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from steerlab.cli import main; main()",
            "serve",
            "--port",
            str(port),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"server exited early: {proc.stdout.read() if proc.stdout else ''}"
                )
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not become ready")
            time.sleep(0.2)
        yield url, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            lines.extend(proc.stdout.read().splitlines())


def test_serve_cli_with_a_saved_model_and_vector_folder(tmp_path: Path) -> None:
    model = tiny_model("llama")
    folder = tmp_path / "model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    vec = sl.SteeringVector(
        {1: torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))}
    )
    vec.save(vectors / "calm.safetensors")
    conditions = tmp_path / "conditions"
    conditions.mkdir()
    # never fires (a cosine is never above 1): its entries must leave the output unsteered
    never = sl.Condition(torch.ones(model.d_model), layer=1, threshold=1.0)
    never.save(conditions / "never.safetensors")
    with _serve(
        [
            "--model",
            str(folder),
            "--vectors",
            str(vectors),
            "--conditions",
            str(conditions),
            "--api-key",
            "k",
            "--max-tokens-cap",
            "20",
            "--max-body-bytes",
            "4096",
            "--max-steering-entries",
            "2",
            "--max-vectors",
            "1",
        ]
    ) as (url, lines):
        limits = httpx.get(url + "/health").json()["limits"]
        assert limits["max_body_bytes"] == 4096 and limits["max_steering_entries"] == 2
        auth = {"Authorization": "Bearer k"}
        too_long = httpx.post(url + "/v1/completions", json={"prompt": "a" * 5000}, headers=auth)
        assert too_long.status_code == 413 and "--max-body-bytes" in too_long.text
        full = httpx.post(
            url + "/v1/vectors",
            files={"file": ("more.safetensors", (vectors / "calm.safetensors").read_bytes())},
            headers=auth,
        )
        assert full.status_code == 409 and "--max-vectors" in full.text
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        served = [m.id for m in client.models.list()]
        assert served == [str(folder)]
        listed = httpx.get(url + "/v1/vectors", headers={"Authorization": "Bearer k"}).json()
        assert [v["id"] for v in listed["data"]] == ["calm"]
        steering = [{"vector": "calm", "strength": 6.0, "positions": "last"}]
        reply = client.completions.create(
            model="default",
            prompt="the cat sat",
            max_tokens=8,
            temperature=0,
            extra_body={"steering": steering},
        )
        expected = model.generate(
            "the cat sat", steering=vec, strength=6.0, positions="last", max_new_tokens=8
        )
        assert reply.choices[0].text == expected
        gated = client.completions.create(
            model="default",
            prompt="the cat sat",
            max_tokens=8,
            temperature=0,
            extra_body={"steering": [{**steering[0], "when": "never"}]},
        )
        assert gated.choices[0].text == model.generate("the cat sat", max_new_tokens=8)
        assert gated.choices[0].text != expected
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="default", prompt="a", max_tokens=21)
        with pytest.raises(openai.BadRequestError, match="--max-steering-entries"):
            client.completions.create(
                model="default", prompt="a", max_tokens=2, extra_body={"steering": steering * 3}
            )
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="other", prompt="a", max_tokens=2)
    output = "\n".join(lines)
    assert f"{url}" in output and "calm" in output and "1 condition(s) (never)" in output
    assert "stopped" in output and "Traceback" not in output


def test_serve_cli_reports_a_bad_vector_folder_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.safetensors").write_bytes(b"not a vector")
    model = tiny_model("gpt2")
    folder = tmp_path / "model"
    model.hf_model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    env = {**os.environ, "PYTHONPATH": _SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from steerlab.cli import main; main()",
            "serve",
            "--model",
            str(folder),
            "--vectors",
            str(tmp_path),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 1
    assert "error:" in done.stderr and "bad.safetensors" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_serve_cli_refuses_limits_that_are_not_positive() -> None:
    env = {**os.environ, "PYTHONPATH": _SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from steerlab.cli import main; main()",
            "serve",
            "--max-vectors",
            "0",
            "--max-body-bytes",
            "-1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "error: --max-body-bytes, --max-vectors must be positive"


@pytest.mark.slow
def test_serve_default_model_matches_library(
    default_model: sl.SteeredModel, tmp_path: Path
) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = default_model.n_layers // 2
    probe = default_model.activations(["I love this, it is wonderful."], layers=[layer])[layer][0]
    direction = torch.randn(default_model.d_model, generator=gen)
    direction = direction / direction.norm() * float(probe.norm()) * 0.5
    vec = sl.SteeringVector({layer: direction})
    vec.save(tmp_path / "push.safetensors")
    prompts = ["The weather today is", "My favourite food is", "Tell me about cats."]
    with _serve(["--vectors", str(tmp_path)]) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i, prompt in enumerate(prompts):
            strength = [2.0, -2.0, 3.0][i]
            positions = ["all", "last", "generated"][i]
            steering = [{"vector": "push", "strength": strength, "positions": positions}]
            if i == 2:
                reply = client.chat.completions.create(
                    model=sl.loading.DEFAULT_MODEL_ID,
                    temperature=0,
                    max_tokens=16,
                    messages=[{"role": "user", "content": prompt}],
                    extra_body={"steering": steering},
                )
                text = reply.choices[0].message.content
            else:
                reply = client.completions.create(
                    model="default",
                    prompt=prompt,
                    temperature=0,
                    max_tokens=16,
                    extra_body={"steering": steering},
                )
                text = reply.choices[0].text
            expected = default_model.generate(
                prompt,
                steering=vec,
                strength=strength,
                positions=positions,
                max_new_tokens=16,
                chat=i == 2,
            )
            assert text == expected

"""Issue 20: vLLM's CPU backend starts beside other processes with no ``VLLM_*`` variable set,
and memory that is really short gives one line naming the setting.

The option tests need no vLLM; the start test (marked ``vllm``) runs from ``.venv-vllm``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

import steerlab as sl
from steerlab.errors import InsufficientMemoryError
from steerlab.vllm.memory import KV_CACHE_ENV, kv_cache_options

GiB = 1 << 30
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_default_kv_cache_is_sized_from_free_memory() -> None:
    plenty = kv_cache_options({"dtype": "float32"}, on_cpu=True, available=20 * GiB, environ={})
    assert plenty == {"dtype": "float32", "kv_cache_memory_bytes": 2 * GiB}
    # a quarter of what is free when that is less than the default, whole MiB
    tight = kv_cache_options({}, on_cpu=True, available=3 * GiB + 12345, environ={})
    assert tight["kv_cache_memory_bytes"] == (3 * GiB + 12345) // 4 // (1 << 20) * (1 << 20)
    # the user's choices win: nothing added
    for chosen in ({"kv_cache_memory_bytes": GiB}, {"gpu_memory_utilization": 0.01}):
        assert kv_cache_options(chosen, on_cpu=True, available=8 * GiB, environ={}) == chosen
    assert kv_cache_options({}, on_cpu=True, available=8 * GiB, environ={KV_CACHE_ENV: "1"}) == {}
    assert kv_cache_options({}, on_cpu=False, available=0, environ={}) == {}


@pytest.mark.parametrize(
    ("options", "environ", "setting"),
    [
        ({}, {}, KV_CACHE_ENV),
        ({}, {KV_CACHE_ENV: "4"}, KV_CACHE_ENV),
        ({"kv_cache_memory_bytes": 4 * GiB}, {}, "kv_cache_memory_bytes"),
        ({"gpu_memory_utilization": 0.9}, {}, "gpu_memory_utilization"),
    ],
)
def test_short_memory_names_the_setting(
    options: dict[str, object], environ: dict[str, str], setting: str
) -> None:
    with pytest.raises(InsufficientMemoryError, match=setting) as caught:
        kv_cache_options(options, on_cpu=True, available=GiB // 2, environ=environ)
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, sl.SteerlabError)
    assert "\n" not in str(caught.value)


def test_kv_cache_env_must_be_whole_gib() -> None:
    with pytest.raises(sl.InvalidInputError, match=KV_CACHE_ENV):
        kv_cache_options({}, on_cpu=True, available=8 * GiB, environ={KV_CACHE_ENV: "1.5"})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = SRC
    env.update(extra)
    return env


@pytest.mark.vllm
def test_serve_refuses_in_one_line_when_memory_is_short() -> None:
    """``steerlab serve --engine vllm`` with 0.1 GiB free (faked): one line, no traceback,
    before vLLM starts."""
    code = (
        "import sys, steerlab.vllm.memory as m; m._available = lambda: 100 << 20; "
        "from steerlab.cli import main; sys.argv = ['steerlab', 'serve', '--engine', 'vllm']; "
        "main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: only 0.10 GiB of memory is free")
    assert KV_CACHE_ENV in lines[0]


@pytest.mark.vllm
@pytest.mark.slow
def test_load_starts_beside_a_process_holding_3_gib() -> None:
    """No ``VLLM_*`` variable, another process holding 3 GiB: ``load()`` starts and generates,
    with the KV cache steerlab chose (the server's engine takes its options the same way)."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; b = b'\\1' * (3 << 30); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert psutil.Process(holder.pid).memory_info().rss >= 3 * GiB
        code = (
            "import steerlab.vllm as slv\n"
            "from steerlab.vllm.engine import VLLMEngine\n"
            "from steerlab.vllm.memory import kv_cache_options\n"
            "if __name__ == '__main__':\n"
            "    options = VLLMEngine(max_model_len=256)._options\n"
            "    print('server_kv', options['kv_cache_memory_bytes'])\n"
            "    llm = slv.load(max_model_len=256)\n"
            "    config = llm.llm_engine.vllm_config.cache_config\n"
            "    print('load_kv', config.kv_cache_memory_bytes)\n"
            "    print('text', repr(slv.generate(llm, 'The cat sat', max_new_tokens=4)))\n"
            "    llm.llm_engine.engine_core.shutdown()\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    server_kv, load_kv = int(out["server_kv"]), int(out["load_kv"])
    assert 0.25 * GiB <= load_kv <= 2 * GiB and 0.25 * GiB <= server_kv <= 2 * GiB
    assert len(out["text"]) > 3
    print(f"KV cache chosen: load {load_kv / GiB:.2f} GiB, server {server_kv / GiB:.2f} GiB")

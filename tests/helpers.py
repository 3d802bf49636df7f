"""Helpers shared by test files: fresh Python processes (optionally without hf_vitprune) and a Hub cache layout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Prepended to a script, makes `import hf_vitprune` fail, as on a machine where it is not installed.
BLOCK_HF_VITPRUNE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _BlockHfVitprune(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "hf_vitprune" or name.startswith("hf_vitprune."):
                raise ImportError("hf_vitprune is blocked in this test")
    sys.meta_path.insert(0, _BlockHfVitprune())
    """
)


def run_python(script: str, cwd: Path, with_hf_vitprune: bool, **env: str) -> str:
    """Run `script` in a fresh offline interpreter (`HF_HUB_OFFLINE=1`, `HF_HOME` under `cwd`, plus `env`); with
    `with_hf_vitprune=False` the package cannot be imported. Returns stdout; fails the test on a non-zero exit."""
    script = textwrap.dedent(script)
    if not with_hf_vitprune:
        script = BLOCK_HF_VITPRUNE + script
    environment = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(cwd / "hf_home"), **env}
    if with_hf_vitprune:
        environment["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def populate_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> Path:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded model repo (`models--owner--name/snapshots/
    <revision>/...` and `refs/main`), so `from_pretrained(repo_id)` resolves it offline with `HF_HUB_CACHE=cache`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


#: Runs before the body of a `run_one_and_two_processes` script: joins the gloo group under torchrun.
_DISTRIBUTED_PRELUDE = """
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
distributed = "WORLD_SIZE" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
"""
_DISTRIBUTED_EPILOGUE = """
with open(os.path.join({out!r}, f"result-{{world}}-{{rank}}.json"), "w") as f:
    json.dump({{"world": world, **result}}, f)
if distributed:
    dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_and_two_processes(body: str, tmp_path: Path) -> tuple[dict, dict, dict]:
    """Run `body` (Python that may use `rank`, `world`, the tests' modules, and sets a JSON-able dict `result`) in
    one process, then in two gloo processes under torchrun; returns the results of (single, rank 0, rank 1)."""
    import json
    import os

    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "two_processes.py"
    script.write_text(
        _DISTRIBUTED_PRELUDE.format(tests=tests)
        + textwrap.dedent(body)
        + _DISTRIBUTED_EPILOGUE.format(out=str(tmp_path))
    )
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    for command in ([sys.executable, str(script)], [*launch, str(script)]):
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    single, first, second = (json.loads((tmp_path / f"result-{n}.json").read_text()) for n in ("1-0", "2-0", "2-1"))
    assert single["world"] == 1 and first["world"] == second["world"] == 2
    return single, first, second

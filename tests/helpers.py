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

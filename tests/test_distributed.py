"""Two CPU processes (gloo) score their own shards and must choose exactly the plan of one process on all data."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from test_modeling import randomize
    from hf_vitprune import PrunedViTForImageClassification
    from hf_vitprune.budget import Selector, make_budget
    from hf_vitprune.importance import taylor_scores

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    generator = torch.Generator().manual_seed(0)
    data = [
        {{"pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
          "labels": torch.randint(0, 10, (4,), generator=generator)}}
        for _ in range(4)
    ]
    model = randomize(PrunedViTForImageClassification(tiny_config()))
    kinds = ("embed", "head", "mlp")
    scores = taylor_scores(model, data[rank::world], kinds)
    plan = Selector(model, make_budget(target_macs_ratio=0.5), kinds, {{"embed": 8, "mlp": 8}}).select(scores)
    with open(os.path.join({out!r}, f"plan-{{world}}-{{rank}}.json"), "w") as f:
        json.dump({{"world": world, "plan": plan.to_dict(), "head": scores["head"][0].tolist()}}, f)
    if distributed:
        dist.destroy_process_group()
    """
)


@pytest.mark.distributed
def test_two_processes_choose_the_single_process_plan(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "score.py"
    script.write_text(SCRIPT.format(tests=tests, out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    double = subprocess.run([*launch, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    results = {
        name: json.loads((tmp_path / name).read_text()) for name in ("plan-1-0.json", "plan-2-0.json", "plan-2-1.json")
    }
    assert results["plan-2-0.json"]["world"] == 2 and results["plan-2-1.json"]["world"] == 2
    assert results["plan-2-0.json"]["plan"] == results["plan-2-1.json"]["plan"]
    assert results["plan-2-0.json"]["plan"] == results["plan-1-0.json"]["plan"]
    for a, b in zip(results["plan-2-0.json"]["head"], results["plan-1-0.json"]["head"]):
        assert abs(a - b) <= 1e-6 * max(abs(b), 1e-12)

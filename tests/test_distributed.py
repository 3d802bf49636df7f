"""Two CPU processes (gloo) score their own shards and must choose exactly the plan of one process on all data."""

import pytest
from helpers import run_one_and_two_processes

BODY = """
from conftest import tiny_config
from test_modeling import randomize
from hf_vitprune import PrunedViTForImageClassification
from hf_vitprune.budget import Selector, make_budget
from hf_vitprune.importance import taylor_scores

generator = torch.Generator().manual_seed(0)
data = [
    {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
     "labels": torch.randint(0, 10, (4,), generator=generator)}
    for _ in range(4)
]
model = randomize(PrunedViTForImageClassification(tiny_config()))
kinds = ("embed", "head", "mlp")
scores = taylor_scores(model, data[rank::world], kinds)
plan = Selector(model, make_budget(target_macs_ratio=0.5), kinds, {"embed": 8, "mlp": 8}).select(scores)
result = {"plan": plan.to_dict(), "head": scores["head"][0].tolist()}
"""


@pytest.mark.distributed
def test_two_processes_choose_the_single_process_plan(tmp_path):
    one, first, second = run_one_and_two_processes(BODY, tmp_path)
    assert first["plan"] == second["plan"] == one["plan"]
    for a, b in zip(first["head"], one["head"]):
        assert abs(a - b) <= 1e-6 * max(abs(b), 1e-12)

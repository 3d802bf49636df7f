"""`evaluate` metric modules shipped with hf_vitprune, as paths for `evaluate.load` (they work offline)."""

from pathlib import Path

#: Folder of the top-k accuracy module:
#: `evaluate.load(TOP_K_ACCURACY).compute(predictions=ranked_labels, references=labels, k=[1, 5])`.
TOP_K_ACCURACY = str(Path(__file__).parent / "top_k_accuracy")

__all__ = ["TOP_K_ACCURACY"]

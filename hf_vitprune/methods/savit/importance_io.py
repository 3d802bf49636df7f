"""SAViT's statistics (unit scores per component and layer, and the 3x3 Hessian Ĥ) on disk, without pickles.

The original pickled them (`criteria_m2l{0,1,2}_final.pickle`, `hessian.pickle`); here they are a safetensors
file (tensors `scores.<kind>.<layer>` and `hessian`, with the bookkeeping as string metadata) or, for reading by
eye, a JSON file of the same content. Both load back to the same `SAViTImportance`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ...importance import Scores

FORMAT = "hf_vitprune.savit.importance/1"


@dataclass
class SAViTImportance:
    """Unit scores `{kind: [tensor per layer]}` (higher = keep), Ĥ (3x3, rows and columns ordered head, mlp,
    embed; None when not estimated) and free-form metadata (batches used, seed, κ; strings once saved)."""

    scores: Scores
    hessian: torch.Tensor | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path`: JSON when it ends in .json, else safetensors (through a temporary file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        metadata = {"format": FORMAT, **{k: str(v) for k, v in self.metadata.items()}}
        if path.suffix == ".json":
            data = {
                "metadata": metadata,
                "scores": {kind: [s.tolist() for s in layers] for kind, layers in self.scores.items()},
                "hessian": None if self.hessian is None else self.hessian.tolist(),
            }
            tmp.write_text(json.dumps(data))
        else:
            tensors = {
                f"scores.{kind}.{layer}": score.detach().float().cpu().contiguous()
                for kind, layers in self.scores.items()
                for layer, score in enumerate(layers)
            }
            if self.hessian is not None:
                tensors["hessian"] = self.hessian.detach().double().cpu().contiguous()
            save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SAViTImportance:
        """Read a file written by `save`; a file of another format raises a ValueError naming it."""
        path = Path(path)
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                metadata = data["metadata"]
                scores = {k: [torch.tensor(s, dtype=torch.float32) for s in v] for k, v in data["scores"].items()}
                hessian = None if data["hessian"] is None else torch.tensor(data["hessian"], dtype=torch.float64)
            else:
                tensors = load_file(str(path))
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                hessian = tensors.pop("hessian", None)
                scores = {}
                for name in sorted(tensors, key=lambda n: (n.split(".")[1], int(n.split(".")[2]))):
                    scores.setdefault(name.split(".")[1], []).append(tensors[name])
        except (OSError, ValueError, KeyError, IndexError, SafetensorError) as error:
            raise ValueError(f"importance_from={str(path)!r} is not a SAViT statistics file: {error}") from None
        if metadata.get("format") != FORMAT:
            raise ValueError(f"importance_from={str(path)!r} has format {metadata.get('format')!r}, not {FORMAT!r}.")
        if hessian is not None and tuple(hessian.shape) != (3, 3):
            raise ValueError(f"importance_from={str(path)!r} holds a Hessian of shape {tuple(hessian.shape)}, not 3x3.")
        metadata = {k: v for k, v in metadata.items() if k != "format"}
        return cls(scores=scores, hessian=hessian, metadata=metadata)

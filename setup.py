"""Packaging of hf_vitprune (metadata here; build system, ruff and pytest settings in pyproject.toml)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
MODEL_CARDS = ROOT / "model_cards"
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "hf_vitprune" / "__init__.py").read_text(encoding="utf-8"), re.M
).group(1)

install_requires = [
    "torch>=2.4",
    "torchvision",
    "transformers>=5.15",  # per_layer_config (heterogeneous per-block geometry)
    "timm>=1.0.16",  # `local-dir:` model sources
    "datasets>=4",
    "accelerate>=1.4",
    "evaluate>=0.4.6",
    "huggingface_hub>=1.0",
    "safetensors",
    "tqdm",
    "scikit-learn",  # the digits data set and the top-k accuracy metric
    "pillow",
    "numpy",
    "pyyaml",  # recipe configs
    "jinja2",  # model card templates
]

extras = {
    "dev": ["pytest", "pytest-timeout", "ruff", "playwright"],  # playwright drives the system Chromium
    "space": ["gradio>=6,<7", "matplotlib"],
    "timm": ["torch-pruning>=1.6"],
}

setup(
    name="hf_vitprune",
    version=VERSION,
    description="Structured pruning of Vision Transformers for the Hugging Face ecosystem",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hf_vitprune", "hf_vitprune.*"]),
    package_data={
        "hf_vitprune": ["sample_model/*", "**/*.py", "**/*.json", "**/*.md"],
    },
    # the model card templates (hf_vitprune.hub.template_path looks here when the package is not a source checkout)
    data_files=[("share/hf_vitprune/model_cards", sorted(str(p.relative_to(ROOT)) for p in MODEL_CARDS.glob("*.j2")))],
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["hf-vitprune = hf_vitprune.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)

"""The Gradio Space (space/app.py): models config, building the pruned sample model, odd inputs, clear errors, the
HTTP API (with hf_vitprune, and as a Space runs it: `python app.py` without hf_vitprune, models from the Hub cache
through trust_remote_code) and the page in headless Chromium.

The pair under test is the shipped digits ViT and a magnitude-pruned copy that the app builds in a temporary
folder. The browser test needs Debian's chromium and the playwright package (`.ci/install_browser.sh`); it is
skipped without them.
"""

import ast
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from helpers import BLOCK_HF_VITPRUNE, populate_hub_cache
from huggingface_hub import metadata_load
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

import hf_vitprune
from hf_vitprune.sample import SAMPLE_MODEL_DIR, load_sample_model

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
PAIR = "digits: magnitude 50%"
BUILD = {"method": "magnitude", "target_macs_ratio": 0.5}
HUB_DENSE, HUB_PRUNED = "your-org/vit-digits", "your-org/vit-digits-magnitude-50"


def _import_app():
    """space/app.py as a module (space/ is not a package)."""
    spec = importlib.util.spec_from_file_location("space_app", ROOT / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


app = _import_app()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def models_json(tmp_path_factory) -> Path:
    """A models config: the sample model and a magnitude-pruned copy the app builds (`build`), plus a pair whose
    folder is missing and one with an invalid model entry."""
    folder = tmp_path_factory.mktemp("space")
    pairs = [
        {"name": PAIR, "dense": app.SAMPLE_MODEL, "pruned": "./pruned", "build": BUILD},
        {"name": "not written", "dense": app.SAMPLE_MODEL, "pruned": "./missing"},
        {"name": "bad entry", "dense": "not a model id!", "pruned": "./pruned"},
    ]
    path = folder / "models.json"
    path.write_text(json.dumps({"pairs": pairs}))
    return path


@pytest.fixture(scope="module")
def space(models_json):
    """The app as the page uses it, configured through the environment (1 timed run to keep tests fast)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(app.CONFIG_ENV, str(models_json))
        patch.setenv(app.RUNS_ENV, "1")
        return app.SpaceApp()


def _digit_image() -> Image.Image:
    return Image.open(ROOT / "space" / "examples" / "digit-7.png")


def _library_top5(folder: str | Path, image: Image.Image) -> dict[str, float]:
    """What hf_vitprune and transformers compute for `image`, without the app."""
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        logits = model(**processor(images=image.convert("RGB"), return_tensors="pt")).logits[0]
    probabilities, indices = logits.softmax(-1).topk(5)
    return {model.config.id2label[int(i)]: float(p) for p, i in zip(probabilities, indices)}


def _assert_same_top5(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(expected)
    np.testing.assert_allclose(list(actual.values()), list(expected.values()), atol=1e-5)


def _label_dict(result: dict) -> dict[str, float]:
    """A `gr.Label` value as the HTTP API returns it, as `{label: confidence}`."""
    return {c["label"]: c["confidence"] for c in result["confidences"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# The models config and the built pruned model


def test_config_lists_usable_pairs_and_notes_skipped_ones(space, models_json):
    assert space.config_path == models_json
    assert list(space.pairs) == [PAIR]
    pair = space.pairs[PAIR]
    assert pair.dense == str(SAMPLE_MODEL_DIR.resolve()) and pair.pruned == str(models_json.parent / "pruned")
    assert pair.build == {**BUILD, "calibration_batches": 4}
    assert len(space.notes) == 2
    assert "not written" in space.notes[0] and "./missing" in space.notes[0]
    assert "bad entry" in space.notes[1] and "neither a folder" in space.notes[1]


def test_default_config_builds_the_sample_model_pair():
    entries = json.loads((ROOT / "space" / "models.json").read_text())["pairs"]
    assert all(entry["dense"] == app.SAMPLE_MODEL for entry in entries)
    pairs, notes = app.load_pairs(ROOT / "space" / "models.json")
    assert len(pairs) + len(notes) == len(entries)
    first = pairs[entries[0]["name"]]  # usable on a fresh clone: the app writes it on first use
    assert first.build is not None and first.build["method"] in hf_vitprune.methods.METHODS


def _sample_pair_config(build) -> str:
    return json.dumps({"pairs": [{"name": "a", "dense": app.SAMPLE_MODEL, "pruned": "./y", "build": build}]})


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "expected a JSON object"),
        ('{"models": []}', "expected a JSON object"),
        ('{"pairs": [{"name": "a", "dense": "./x"}]}', r"pairs\[0\] must have"),
        (json.dumps({"pairs": [{"name": "a", "dense": "./x", "pruned": "./y"}] * 2}), "appears twice"),
        (json.dumps({"pairs": [{"name": "a", "dense": "./x", "pruned": "./y", "build": BUILD}]}), "'build' needs"),
        (_sample_pair_config("taylor"), "must be an object"),
        (_sample_pair_config({"method": "x"}), "target_macs_ratio must be a number in"),
        (_sample_pair_config({**BUILD, "method": "x"}), r"method must be one of \["),
        (_sample_pair_config({**BUILD, "calibration_batches": 0}), "calibration_batches must be a positive integer"),
        (_sample_pair_config({**BUILD, "steps": 3}), "only the keys"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        app.load_pairs(path)


def test_built_pruned_model_is_reused_and_never_overwrites_other_folders(space, tmp_path):
    folder = Path(space.model(space.pairs[PAIR].pruned).model.name_or_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["pruning"]["method"] == "magnitude" and abs(config["pruning"]["macs_ratio"] - 0.5) < 0.02
    assert (folder / "architecture.png").is_file() and (folder / "modeling_pruned_vit.py").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert app.build_pruned_sample(folder, space.pairs[PAIR].build) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == written  # same sample weights and recipe: reused
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not written by the Space"):
        app.build_pruned_sample(foreign, space.pairs[PAIR].build)
    assert (foreign / "config.json").read_text() == "{}"


def test_digits_calibration_batches():
    processor = AutoImageProcessor.from_pretrained(SAMPLE_MODEL_DIR)
    batches = app._digits_calibration(processor, 2)
    assert [tuple(x.shape) for x, _ in batches] == [(app.CALIBRATION_BATCH_SIZE, 3, 32, 32)] * 2
    assert all(y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9 for _, y in batches)
    assert len({int(y) for _, labels in batches for y in labels}) > 5  # shuffled over the classes


# ----------------------------------------------------------------------------------------------------------------
# Predictions and messages


def test_predict_matches_the_library(space):
    image = _digit_image()
    dense, pruned, costs, status = space.predict(image, PAIR)
    _assert_same_top5(dense, _library_top5(SAMPLE_MODEL_DIR, image))
    _assert_same_top5(pruned, _library_top5(space.pairs[PAIR].pruned, image))
    assert next(iter(dense)) == "7"  # a validation image the sample model classifies correctly
    assert status.startswith("Top-1 labels agree" if next(iter(pruned)) == "7" else "Top-1 labels **disagree**")
    assert "latency (batch 1, median of 1, cpu)" in costs and "MACs per image" in costs


def test_costs_are_the_library_counts_and_flop_counter_agrees(space):
    dense, pruned = space.model(space.pairs[PAIR].dense), space.model(space.pairs[PAIR].pruned)
    for loaded in (dense, pruned):
        assert loaded.macs == hf_vitprune.count_macs(loaded.model)
        assert (
            loaded.params == hf_vitprune.count_params(loaded.model) == sum(p.numel() for p in loaded.model.parameters())
        )
        pixel_values = torch.zeros(1, 3, 32, 32)
        assert app.counted_macs(loaded.model, pixel_values) == loaded.macs  # what the app shows without hf_vitprune
    assert loaded.model.config._attn_implementation == "sdpa"  # restored after counting


def test_a_model_hf_vitprune_cannot_convert_is_shown_as_it_is(space, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    labels = dict(enumerate("0123456789"))
    resnet = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], id2label=labels)
    )
    resnet.save_pretrained(tmp_path / "resnet")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "resnet")
    config = tmp_path / "models.json"
    pruned = space.pairs[PAIR].pruned
    space.model(pruned)  # built
    config.write_text(json.dumps({"pairs": [{"name": "resnet", "dense": "./resnet", "pruned": pruned}]}))
    other = app.SpaceApp(config)
    dense_top, _, costs, _ = other.predict(_digit_image(), "resnet")
    _assert_same_top5(dense_top, _library_top5(tmp_path / "resnet", _digit_image()))
    loaded = other.model(str(tmp_path / "resnet"))
    assert type(loaded.model) is ResNetForImageClassification and loaded.macs > 0
    assert loaded.params == sum(p.numel() for p in resnet.parameters())
    chart, _, _ = other.describe("resnet")
    assert chart.size == other.model(pruned).chart.size  # the pruned repo's architecture.png


def _odd_images() -> dict[str, tuple[Image.Image | np.ndarray, str]]:
    """Inputs of every odd kind, each with a note the status line must carry ("" for none)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(48) < 24, 0, 255).astype(np.uint8)[None].repeat(40, 0)))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 0
    deep = Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).convert("I;16")
    return {
        "grayscale": (rgb.convert("L"), "converted from L to RGB"),
        "rgba": (rgba, "transparent areas put on white"),
        "palette": (palette, "converted from P to RGB"),
        "palette-transparent": (transparent_palette, "transparent areas put on white"),
        "tiny": (Image.new("RGB", (1, 1), (250, 20, 20)), ""),
        "large": (Image.new("RGB", (4000, 2500), (20, 200, 20)), "downscaled from 4000x2500 to 2048x1280"),
        "16-bit": (deep, "high bit-depth image stretched to 8 bits"),
        "numpy": (np.asarray(rgb), ""),
    }


@pytest.mark.parametrize("kind", list(_odd_images()))
def test_predict_accepts_odd_images(space, kind):
    image, note = _odd_images()[kind]
    dense, pruned, costs, status = space.predict(image, PAIR)
    assert status.startswith("Top-1 labels") and note in status
    for top in (dense, pruned):
        assert len(top) == 5
        values = list(top.values())
        assert values == sorted(values, reverse=True) and 0 < sum(values) <= 1 + 1e-6
    assert "latency (batch 1, median of 1" in costs


def test_transparent_pixels_are_put_on_white(space):
    image, _ = _odd_images()["rgba"]
    on_white = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    assert space.predict(image, PAIR)[:2] == space.predict(on_white, PAIR)[:2]


def test_large_image_is_downscaled_before_processing():
    prepared, notes = app.prepare_image(Image.new("L", (3000, 6000), 128))
    assert prepared.size == (1024, 2048) and prepared.mode == "RGB"
    assert notes == ["downscaled from 3000x6000 to 1024x2048", "converted from L to RGB"]


@pytest.mark.parametrize(
    "image, match",
    [(None, "No image: upload one"), (np.zeros((0, 4, 3), np.uint8), "Cannot read an image array"), ("x", "Expected")],
)
def test_bad_image_is_a_clear_error(space, image, match):
    with pytest.raises(gr.Error, match=match) as error:
        space.predict(image, PAIR)
    assert error.value.print_exception is False  # an input problem, not a failure: no traceback in the logs


def test_unknown_pair_is_a_clear_error_and_loads_nothing(models_json):
    fresh = app.SpaceApp(models_json)
    for name in ("nope", "not written", str(SAMPLE_MODEL_DIR), None):
        with pytest.raises(gr.Error, match=rf"Unknown model pair .*choose one of: '{PAIR}'"):
            fresh.predict(_digit_image(), name)
        with pytest.raises(gr.Error, match="Unknown model pair"):
            fresh.describe(name)
    with pytest.raises(app.InputError, match="not a model of this Space"):
        fresh.model(str(SAMPLE_MODEL_DIR.parent))
    assert fresh._models == {}


def test_describe_shows_chart_summary_record_and_costs(space):
    chart, summary, costs = space.describe(PAIR)
    assert chart.width > 300 and len(set(chart.convert("RGB").getdata())) > 10
    assert summary.startswith("A structurally pruned Vision Transformer")
    assert "\n### Model details" in summary and "Magnitude" in summary
    record = summary.split("### Pruning record (`config.pruning`)")[1]
    assert record.index("| method | `magnitude` |") < record.index("| source |") < record.index("| macs_ratio |")
    dense, pruned = space.model(space.pairs[PAIR].dense), space.model(space.pairs[PAIR].pruned)
    assert f"| macs | `{pruned.macs:,}` |" in record
    assert f"{pruned.macs / dense.macs:.2f}x" in costs and "Press **Predict**" in costs
    assert space.describe(PAIR)[0] is chart  # drawn once


def test_method_summary_keeps_intro_and_details():
    card = (
        "---\nlicense: mit\n---\n\n# name\n\nShort summary.\n<!-- hidden -->\n\n## Model details\n\n- method: x\n\n"
        "## Cost\n\n| a |\n"
    )
    assert app.method_summary(card) == "Short summary.\n\n### Model details\n\n- method: x"
    assert app.method_summary("") == ""


def test_time_forwards_measures_each_model():
    class Sleep(torch.nn.Module):
        def __init__(self, seconds: float):
            super().__init__()
            self.seconds = seconds

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            time.sleep(self.seconds)
            return pixel_values

    x = torch.zeros(1)
    fast, slow = app.time_forwards([(Sleep(0.0), x), (Sleep(0.02), x)], runs=2)
    assert 0 <= fast < 0.015 <= 0.02 <= slow < 0.5


def test_requirements_cover_the_app_imports():
    """A Space installs requirements.txt (and gradio from the front matter): every third-party import of app.py
    but the optional hf_vitprune must be there, and neither gradio nor hf_vitprune (not on PyPI) may be."""
    tree = ast.parse((ROOT / "space" / "app.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    third_party = imported - set(sys.stdlib_module_names) - {"__future__", "gradio", "hf_vitprune"}
    lines = (ROOT / "space" / "requirements.txt").read_text().splitlines()
    required = {
        re.split(r"[\[<>=~! @]", line.strip())[0].lower() for line in lines if line.strip() and not line.startswith("#")
    }
    assert third_party >= {"torch", "transformers", "huggingface_hub", "numpy", "PIL"}
    assert {{"PIL": "pillow"}.get(name, name).lower() for name in third_party} - required == set()
    assert not required & {"gradio", "hf_vitprune"}
    front_matter = metadata_load(ROOT / "space" / "README.md")
    assert front_matter["sdk"] == "gradio" and front_matter["app_file"] == "app.py" and front_matter["license"]
    assert front_matter["sdk_version"].split(".")[0] == gr.__version__.split(".")[0]  # the major version tested


def test_no_usable_pair_shows_the_notes(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"pairs": [{"name": "gone", "dense": app.SAMPLE_MODEL, "pruned": "./gone"}]}))
    empty = app.SpaceApp(path)
    assert empty.pairs == {} and empty.describe(None) == (None, "", "")
    demo = app.build_demo(empty)
    assert isinstance(demo, gr.Blocks)
    text = json.dumps(demo.get_config_file())
    assert "Skipped **gone**" in text and "No model pair is available" in text


# ----------------------------------------------------------------------------------------------------------------
# Served: the HTTP API, `python app.py` as a Space runs it, the page in a browser


@pytest.fixture(scope="module")
def served(space):
    """The page served on localhost from a thread: its URL."""
    demo = app.build_demo(space)
    assert isinstance(demo, gr.Blocks)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True)
    yield url
    demo.close()


def test_http_api_matches_the_library_and_reports_errors(served, space, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    image = _digit_image()
    path = tmp_path / "digit.png"
    image.save(path)
    client = Client(served, verbose=False)
    dense, pruned, costs, status = client.predict(handle_file(str(path)), PAIR, api_name="/predict")
    for result, folder in ((dense, SAMPLE_MODEL_DIR), (pruned, space.pairs[PAIR].pruned)):
        expected = _library_top5(folder, image)
        assert result["label"] == next(iter(expected))
        _assert_same_top5(_label_dict(result), expected)
    assert "latency" in costs and status.startswith("Top-1 labels")
    with pytest.raises(AppError, match="No image: upload one"):
        client.predict(None, PAIR, api_name="/predict")
    with pytest.raises(AppError, match="not in the list of choices"):  # Gradio checks the dropdown's choices too
        client.predict(handle_file(str(path)), "nope", api_name="/predict")


def test_python_app_py_without_hf_vitprune_serves_hub_models(space, tmp_path):
    """The Space as deployed: `python app.py` where hf_vitprune is not installed, a models.json of Hub ids (here in
    an offline Hub cache); the models run their repos' code (trust_remote_code) and predict as the library does."""
    from gradio_client import Client, handle_file

    cache = tmp_path / "hub"
    dense_folder = tmp_path / "dense"
    load_sample_model().save_pretrained(dense_folder)  # weights, code (auto_map) and image processor
    populate_hub_cache(cache, HUB_DENSE, dense_folder)
    populate_hub_cache(cache, HUB_PRUNED, Path(space.pairs[PAIR].pruned))
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"pairs": [{"name": "hub", "dense": HUB_DENSE, "pruned": HUB_PRUNED}]}))
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_CACHE": str(cache),
        "GRADIO_SERVER_PORT": str(port),
        app.CONFIG_ENV: str(config),
        app.RUNS_ENV: "1",
        "OMP_NUM_THREADS": "1",
    }
    run_app = f"import runpy\nrunpy.run_path({str(ROOT / 'space' / 'app.py')!r}, run_name='__main__')"
    server = subprocess.Popen([sys.executable, "-c", BLOCK_HF_VITPRUNE + run_app], env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}config", timeout=5) as response:
                    page = json.load(response)
                break
            except OSError:
                assert server.poll() is None, "python app.py exited"
                assert time.monotonic() < deadline, "python app.py did not serve the page within 90 s"
                time.sleep(0.5)
        assert page["title"] == app.TITLE and app.STANDALONE_NOTE in json.dumps(page)
        image = _digit_image()
        path = tmp_path / "digit.png"
        image.save(path)
        dense, pruned, costs, _ = Client(url, verbose=False).predict(handle_file(str(path)), "hub", api_name="/predict")
    finally:
        server.terminate()
        server.wait(timeout=30)
    _assert_same_top5(_label_dict(dense), _library_top5(dense_folder, image))
    _assert_same_top5(_label_dict(pruned), _library_top5(space.pairs[PAIR].pruned, image))
    macs = [app._number(space.model(location).macs) for location in (space.pairs[PAIR].dense, space.pairs[PAIR].pruned)]
    assert f"| MACs per image | {macs[0]} | {macs[1]} |" in costs  # FlopCounterMode counts what count_macs does


def _browser_unavailable() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is absent (Debian's chromium package; run .ci/install_browser.sh)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is absent (run .ci/install_browser.sh)"
    return None


@pytest.mark.skipif(_browser_unavailable() is not None, reason=str(_browser_unavailable()))
def test_browser_upload_predict_screenshot(served, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    screenshot = tmp_path / "page.png"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(served, wait_until="domcontentloaded")
            expect(page.get_by_text("Pruning record")).to_be_visible(timeout=30_000)  # demo.load described the pair
            page.locator("input[type=file]").first.set_input_files(str(ROOT / "space" / "examples" / "digit-7.png"))
            page.get_by_role("button", name="Predict").click()
            expect(page.get_by_text("Top-1 labels")).to_be_visible(timeout=60_000)
            expect(page.get_by_text("latency (batch 1")).to_be_visible()
            labels = page.locator(".output-class")  # gr.Label's top class, dense then pruned
            expect(labels.first).to_have_text("7")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    with Image.open(screenshot) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 1000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text, labels, bars, chart: not a blank page
    assert pixels.std() > 10

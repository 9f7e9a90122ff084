"""`rlhf-ray report` on real runs (a short GRPO run and an eval, shared fixtures in conftest.py), as the README
gives it: one self-contained HTML page whose every embedded picture decodes and is not blank, naming what it plots;
where a headless Chromium is installed, the page is also opened in it and its screenshot checked."""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.conftest import rlhf_ray_in

REPORT_COMMAND = "rlhf-ray report runs/grpo-tiny"
REPORT_EVAL_COMMAND = "rlhf-ray report runs/eval-tiny"
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def _not_blank(img: Image.Image) -> None:
    """Pixels vary, and more than 1% of them are not the white background."""
    a = np.asarray(img.convert("L"), dtype=np.float64)
    assert a.std() > 0 and (a < 250).mean() > 0.01, (img.size, a.std(), (a < 250).mean())


def _check_page(page: str) -> list[Image.Image]:
    """Self-contained (no script, nothing fetched) and every embedded image a non-blank PNG; returns the images."""
    assert "<script" not in page and not re.search(r"""(src|href)=['"]?(https?:|//)""", page)
    encoded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(encoded) == page.count("<img ") == page.count("<figure>") and encoded
    images = []
    for data in encoded:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.load()
        assert img.format == "PNG" and img.size[0] > 200 and img.size[1] > 100, img.size
        _not_blank(img)
        images.append(img)
    return images


def _screenshot(page_path: Path, tmp_path: Path) -> None:
    """Open the page in headless Chromium (when installed) and check its screenshot is not blank."""
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        return  # no browser on this machine: the decoded images above are the check
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,1600", page_path.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    img = Image.open(shot)
    assert img.size == (1280, 1600)
    _not_blank(img)


def test_every_run_writes_its_report_when_it_ends(grpo_tiny_run, eval_tiny_run):
    # What the commands themselves printed: the job front wrote report.html after the job's body returned.
    printed = json.loads(grpo_tiny_run.out[:grpo_tiny_run.out.rindex("}") + 1])
    assert printed["report"] == str((grpo_tiny_run.run_dir / "report.html").resolve())
    assert f"report: {(eval_tiny_run.run_dir / 'report.html').resolve()}" in eval_tiny_run.out


def test_report_of_a_training_run(grpo_tiny_run, clone, tmp_path):
    run = rlhf_ray_in(clone, shlex.split(REPORT_COMMAND)[1:], "runs/grpo-tiny")
    assert run.code == 0, run.err[-2000:]
    assert run.out.strip() == "report: runs/grpo-tiny/report.html"
    page = (run.run_dir / "report.html").read_text()
    images = _check_page(page)
    sections = re.findall(r"<h2>([^<]+)</h2>", page)
    assert sections == ["Reward", "KL", "Losses", "Response length", "Other training signals", "Eval over steps",
                        "Throughput", "Phase seconds and floors", "Placement", "Last logged values"], sections
    assert len(images) == 8  # one picture per section before the placement
    figures = dict(re.findall(r"<h2>([^<]+)</h2>.*?<figcaption>(.*?)</figcaption>", page))
    for section, keys in {"Reward": ["rollout/reward_mean", "reward/math_mean"], "KL": ["actor/approx_kl"],
                          "Losses": ["actor/pg_loss"], "Response length": ["rollout/response_length_mean"],
                          "Eval over steps": ["eval/reward_mean", "eval/response_length_mean"],
                          "Phase seconds and floors": ["timing/generate_s", "timing/train_s",
                                                       "timing/weight_sync_s", "efficiency/generate_floor_s",
                                                       "efficiency/train_floor_s", "efficiency/train_vs_floor"]
                          }.items():
        for key in keys:
            assert f"<code>{key}</code>" in figures[section], (section, key)
    # The placement table: the two DeepSpeed learners and the one vLLM engine of the GRPO example.
    assert page.count("<tr><td>actor</td>") == 2 and page.count("<tr><td>rollout</td>") == 1
    assert "job: <code>grpo</code>" in page and "5 logged steps" in page  # step 0: the eval before training
    _screenshot(run.run_dir / "report.html", tmp_path)


def test_report_of_an_eval_run_shows_its_table(eval_tiny_run, clone, tmp_path):
    run = rlhf_ray_in(clone, shlex.split(REPORT_EVAL_COMMAND)[1:], "runs/eval-tiny")
    assert run.code == 0, run.err[-2000:]
    page = (run.run_dir / "report.html").read_text()
    _check_page(page)  # one logged step: no lines to draw, the phase seconds of the eval remain
    doc = json.loads((run.run_dir / "eval.json").read_text())
    for key in ("pass@1", "pass@8", "maj@8", "reward_mean"):
        assert f"<tr><td>{key}</td><td>{doc['sampled'][key]:.6g}</td>" in page, key
    assert "<h2>Evaluation</h2>" in page and "64 prompts x 8 samples" in page
    _screenshot(run.run_dir / "report.html", tmp_path)


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "holds none of metrics.jsonl, placement.json, eval.json"),
    (lambda d: (d / "placement.json").write_text("{not json"), "placement.json: not valid JSON"),
])
def test_an_unreadable_run_dir_is_named(tmp_path, capsys, make, expected):
    from rlhf_ray.cli import main
    from rlhf_ray.report import write_report_or_warn

    make(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("report error: ") and expected in err and str(tmp_path) in err, err
    # At the end of a run the same failure is a warning: the finished run is not failed by its report.
    assert write_report_or_warn(tmp_path) is None and not (tmp_path / "report.html").exists()

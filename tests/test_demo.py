"""`emf demo` end to end at a tiny budget: every artifact it promises exists and is usable."""

import json

import numpy as np
from PIL import Image

from emf_dist.cli import main as emf


def test_demo_writes_models_and_grids_that_generate_can_use(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = ["samples=48", "fm_train.steps=4", "mf_train.steps=4", "fm_train.batch_size=8",
                 "mf_train.batch_size=8", "fm_train.log_every=2", "model.width=32", "model.heads=2", "model.depth=1"]
    assert emf(["demo", "--out", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "[5/5] done" in printed and "step 4/4" in printed
    summary = json.loads((out / "summary.json").read_text())
    for path in summary["grids"].values():
        grid = np.asarray(Image.open(path))
        assert grid.ndim == 3 and grid.shape[2] == 3
    assert set(summary["grids"]) == {"meanflow_1", "meanflow_2", "meanflow_4", "flow_matching_1",
                                     "flow_matching_4", "flow_matching_32"}
    image = tmp_path / "red.png"
    assert emf(["generate", "--model", summary["model"], "--out", str(image), "a red circle"]) == 0
    assert np.asarray(Image.open(image)).shape == (32, 32, 3)


def test_demo_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    assert emf(["demo", "--out", str(tmp_path / "d"), "model.dpth=3", "model.time_embedding=dual"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'depth'" in err
    assert not (tmp_path / "d").exists()

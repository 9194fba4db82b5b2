"""A run's metrics.jsonl and loss.png: written whole, and a resumed run drops the rows it retrains."""
from PIL import Image

from emf_dist.storage import Store
from emf_dist.train.loss_curve import HISTORY, PLOT, LossCurve, read_history


def row(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "grad_norm": 1.0 / step, "lr": 1e-3}


def test_resumed_curve_keeps_rows_up_to_the_checkpoint_and_replaces_the_rest(tmp_path):
    run = str(tmp_path / "run")
    curve = LossCurve(run, resumed_at=0)
    for step in (100, 200, 300):  # a crash after step 300's log, the last checkpoint at 200
        curve.add({**row(step, 1.0 / step), "note": "not a number"})
    curve.write()
    assert [r["step"] for r in read_history(Store(run))] == [100, 200, 300]
    assert "note" not in read_history(Store(run))[0]

    resumed = LossCurve(run, resumed_at=200)
    resumed.add(row(300, 0.5))
    resumed.write()
    history = read_history(Store(run))
    assert [(r["step"], r["loss"]) for r in history] == [(100, 0.01), (200, 0.005), (300, 0.5)]
    with Image.open(tmp_path / "run" / PLOT) as picture:
        assert picture.format == "PNG" and picture.size[0] > 200


def test_a_run_that_never_logged_writes_nothing(tmp_path):
    LossCurve(str(tmp_path / "run"), resumed_at=0).write()
    assert not (tmp_path / "run" / HISTORY).exists()


def test_negative_losses_plot_on_a_linear_axis(tmp_path):
    curve = LossCurve(str(tmp_path / "run"), resumed_at=0)
    for step, loss in ((1, 0.2), (2, -0.1)):
        curve.add(row(step, loss))
    curve.write()
    assert (tmp_path / "run" / PLOT).stat().st_size > 0

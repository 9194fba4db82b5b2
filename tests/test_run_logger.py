"""Rank 0's run logger: wandb's offline run beside the run's checkpoints, where `wandb sync` finds it."""
from emf_dist.config import from_dict
from emf_dist.train.config import TrainConfig
from emf_dist.train.run_logger import RunLogger


def test_an_offline_wandb_run_is_kept_in_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # auto: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = from_dict(TrainConfig, {"name": "run", "storage_path": str(tmp_path), "logging": {"wandb": "auto"}})
    logger = RunLogger(cfg, rank=0, sample_text=None, resumed_at=0)
    logger.log({"step": 1, "loss": 0.5, "grad_norm": 1.0, "lr": 1e-3, "samples_per_s": 10.0, "jvp_share": 0.5})
    logger.finish()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "loss.png").is_file()

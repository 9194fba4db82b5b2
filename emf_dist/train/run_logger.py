"""What a training run shows people: a progress line, wandb, 1-step sample grids and the loss curve.

Only rank 0 writes. wandb's run id is the run name, so a resumed run continues the same
wandb run; with no WANDB_API_KEY in the environment it logs offline, into ``<storage>/<name>/wandb``
when the storage is a local folder (``wandb sync`` it later; on an object store, in a temp folder
of rank 0's machine, which wandb names at the end).
The key is read by wandb itself from the environment and never passes through our config.
Sample grids go to ``<storage>/<name>/samples/step_XXXXXXXX.png`` (and to wandb); a latent
model's samples are decoded by the VAE its dataset's manifest names, loaded on rank 0 at the first grid.
The reported metrics go to ``<storage>/<name>/metrics.jsonl`` and ``loss.png`` at every checkpoint and
at the end (emf_dist/train/loss_curve.py).
"""
from __future__ import annotations

import io
import os
import tempfile
import time

import torch

from emf_dist import storage
from emf_dist.generate import image_grid, to_uint8
from emf_dist.samplers import sample
from emf_dist.train.config import TrainConfig
from emf_dist.train.loss_curve import LossCurve
from emf_dist.vae import decode_latents, load_vae


def wandb_mode(setting: str) -> str:
    if setting == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return setting


def wandb_folder(run_url: str) -> str:
    """Where wandb keeps its files: beside the checkpoints when they are local, else a temp folder
    (wandb writes its files in place, which an object store cannot take)."""
    if storage.is_remote(run_url):
        return tempfile.mkdtemp(prefix="emf-wandb-")
    folder = storage.local_path(run_url)
    os.makedirs(folder, exist_ok=True)
    return folder


class RunLogger:
    def __init__(self, cfg: TrainConfig, rank: int, sample_text: dict | None, resumed_at: int):
        self.cfg, self.rank, self.sample_text = cfg, rank, sample_text
        self.start, self.start_step = time.perf_counter(), resumed_at
        self.wandb, self._vae = None, None
        self.curve = LossCurve(storage.join(cfg.storage_path, cfg.name), resumed_at) if rank == 0 else None
        if rank == 0 and wandb_mode(cfg.logging.wandb) != "disabled":
            import wandb

            from emf_dist.config import to_dict
            self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.name, id=cfg.name, resume="allow",
                                    mode=wandb_mode(cfg.logging.wandb), config=to_dict(cfg),
                                    dir=wandb_folder(storage.join(cfg.storage_path, cfg.name)))

    def log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        step, total = metrics["step"], self.cfg.steps
        rate = (step - self.start_step) / max(time.perf_counter() - self.start, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("inf")
        print(f"step {step}/{total}  loss {metrics['loss']:.4f}  grad {metrics['grad_norm']:.3f}  "
              f"lr {metrics['lr']:.2e}  {metrics['samples_per_s']:.1f} samples/s  jvp {metrics['jvp_share']:.0%}  "
              f"{rate:.2f} steps/s  eta {eta:.0f}s", flush=True)
        self.curve.add(metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def write_curve(self) -> None:
        """metrics.jsonl and loss.png as they stand (rank 0; called at checkpoints and at the end)."""
        if self.curve is not None:
            self.curve.write()

    @torch.no_grad()
    def sample_grid(self, model: torch.nn.Module, step: int) -> None:
        """1-step samples for the fixed prompts (all ranks call this: ZeRO-3 gathers collectively)."""
        if not self.sample_text:
            return
        device = next(model.parameters()).device
        tokens, mask, pooled = (torch.tensor(self.sample_text[k], device=device) for k in ("tokens", "mask", "pooled"))
        cfg = model.cfg
        noise = torch.randn(len(tokens), cfg.in_channels, cfg.input_size, cfg.input_size,
                            generator=torch.Generator(device).manual_seed(0), device=device)
        was_training = model.training
        model.eval()
        images = sample(model, noise, tokens.float(), mask.bool(), pooled.float(), steps=1,
                        mean_flow=self.cfg.mode != "flow_matching")
        model.train(was_training)
        if self.rank != 0:
            return
        images = images.float()
        if cfg.in_channels != 3:
            vae = self._decoder(device)
            if vae is None:
                return
            images = decode_latents(*vae, images)
        from PIL import Image
        picture = Image.fromarray(image_grid(to_uint8(images.cpu())))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path = storage.join(self.cfg.storage_path, self.cfg.name, "samples", f"step_{step:08d}.png")
        fs, inner = storage.filesystem(path)
        fs.makedirs(os.path.dirname(inner), exist_ok=True)
        fs.pipe(inner, buffer.getvalue())
        if self.wandb is not None:
            import wandb
            self.wandb.log({"samples_1step": wandb.Image(picture)}, step=step)

    def _decoder(self, device):
        """(VAE, VaeInfo) of the dataset's latents, or None (then latent grids are skipped, said once)."""
        if self._vae is None:
            from emf_dist.manifest import read_manifest
            image = read_manifest(self.cfg.data.url, storage.storage_options(self.cfg.data.url)).image
            try:
                self._vae = (load_vae(image.vae, device), image.vae_info()) if image.vae else False
            except (OSError, ValueError) as err:
                print(f"sample grids off: the dataset's VAE {image.vae} does not load here: {err}", flush=True)
                self._vae = False
        return self._vae or None

    def finish(self) -> None:
        self.write_curve()
        if self.wandb is not None:
            self.wandb.finish()

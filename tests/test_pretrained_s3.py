"""A diffusers pipeline folder on object storage as init_from (and as the text encoder and VAE it
names, in training and in prep): a tiny random SANA pipeline (tests/pretrained_helpers.py) on a real S3 API server
(tests/s3_server.py), copied once per node into the cache keyed by its listing
(emf_dist/folder_cache.py), never mistaken for a copy after a crashed download."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from emf_dist.config import ConfigError, from_dict
from emf_dist.folder_cache import CACHE_ENV, COPY_RECORD, copy_key, local_copy, remote_listing
from emf_dist.text_encoder import TextEncoder
from emf_dist.train.config import TrainConfig
from emf_dist.train.driver import resolve_model
from emf_dist.train.pretrained import export_parent, load_backbone_parent, write_null_text
from emf_dist.vae import describe_vae, load_vae
from tests.pretrained_helpers import RESOLUTION, TEXT_LENGTH, tiny_sana, write_sana_pipeline
from tests.s3_server import s3_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BUCKET, SECRET = "emf-models", "sana-secret-never-logged-7Q"
URL = f"s3://{BUCKET}/team/sana-pipeline"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    local = write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")
    with s3_server(BUCKET, SECRET) as fs:
        fs.put(f"{local}/", URL[len("s3://"):], recursive=True)
        yield fs, local


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "folders"


def copies(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


def config(tmp_path, init_from, **over) -> TrainConfig:
    base = {"init_from": str(init_from), "data": {"url": str(tmp_path / "no-data")}, "mode": "meanflow_finetune",
            "storage_path": str(tmp_path / "runs"), "encoder": {"max_length": TEXT_LENGTH}}
    return from_dict(TrainConfig, {**base, **over}, validate=True)


def test_the_driver_resolves_a_pipeline_on_s3_and_its_backbone_loads_as_from_a_local_folder(s3, cache, tmp_path):
    _, local = s3
    remote, here = resolve_model(config(tmp_path, URL)), resolve_model(config(tmp_path, local))
    assert remote.model == here.model
    # The config names the URL, which every machine reads; not the driver's copy.
    assert (remote.init_from, remote.encoder.name) == (URL, URL)
    [copy] = copies(cache)
    assert (copy / "model_index.json").is_file() and (copy / COPY_RECORD).is_file()

    encoder = TextEncoder(remote.encoder)  # the pipeline's Gemma-2, from the copy
    assert encoder.fingerprint()["weights_sha256"] == TextEncoder(here.encoder).fingerprint()["weights_sha256"]
    write_null_text(remote, encoder)
    ours, theirs = load_backbone_parent(remote).state_dict(), load_backbone_parent(here).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # A second resolve and the workers' loads reuse the copy: same folder, the same files (no new download).
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_ino, weights.stat().st_mtime_ns
    again = resolve_model(config(tmp_path, URL))
    assert again == remote
    load_backbone_parent(again)
    with export_parent(again) as (_, scheduler):
        assert scheduler == str(copy / "scheduler")
    assert copies(cache) == [copy] and (weights.stat().st_ino, weights.stat().st_mtime_ns) == before

    # The pipeline's VAE by URL: the record keeps the URL, the weights are the local folder's.
    info = describe_vae(URL, load_vae(URL))
    assert info.source == f"{URL}/vae"
    assert info.sha256 == describe_vae(str(local), load_vae(str(local))).sha256


def test_a_changed_folder_gets_a_copy_of_its_own(s3, cache, tmp_path):
    fs, local = s3
    first = local_copy(URL)
    changed = tmp_path / "changed"
    tiny_sana(seed=5).save_pretrained(changed)
    key = f"{URL[len('s3://'):]}/transformer/diffusion_pytorch_model.safetensors"
    original = fs.cat_file(key)
    fs.put_file(str(changed / "diffusion_pytorch_model.safetensors"), key)
    try:
        second = local_copy(URL)
        assert second != first and copies(cache) == sorted([Path(first), Path(second)])
        new = load_backbone_parent_from(tmp_path, second)
        want = tiny_sana(seed=5).state_dict()
        assert all(torch.equal(new.transformer.state_dict()[k], want[k]) for k in want)
    finally:
        fs.pipe_file(key, original)
    assert local_copy(URL) == first  # the listing is the original's again


def load_backbone_parent_from(tmp_path, folder):
    cfg = resolve_model(config(tmp_path, folder))
    write_null_text(cfg, TextEncoder(cfg.encoder))
    return load_backbone_parent(cfg)


def test_a_download_killed_midway_is_never_taken_for_a_copy(s3, cache):
    fs, _ = s3
    url = f"s3://{BUCKET}/big-model"
    fs.pipe_file(f"{BUCKET}/big-model/config.json", b"{}")
    fs.pipe_file(f"{BUCKET}/big-model/weights.bin", os.urandom(64 * 2**20))  # about 1.5 s to copy here
    key = copy_key(url, remote_listing(url))
    child = subprocess.Popen([sys.executable, "-c", f"from emf_dist.folder_cache import local_copy; local_copy({url!r})"],
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(f".tmp-{key}") and (p / "weights.bin").is_file()
                  and (p / "weights.bin").stat().st_size > 2**20 for p in cache.glob(".tmp-*")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (cache / key).exists()  # only the temporary folder is left, under a name no reader takes
    folder = local_copy(url, progress=False)
    assert folder == str(cache / key) and os.path.getsize(os.path.join(folder, "weights.bin")) == 64 * 2**20
    assert not list(cache.glob(".tmp-*"))  # the crashed download's leftovers are gone

    # Processes that ask at once share one copy (the lock); none sees a partial one.
    fs.pipe_file(f"{BUCKET}/big-model/config.json", b'{"changed": true}')
    results = []
    threads = [threading.Thread(target=lambda: results.append(local_copy(url, progress=False))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3 and not list(cache.glob(".tmp-*"))
    assert os.path.getsize(os.path.join(results[0], "weights.bin")) == 64 * 2**20


def test_credentials_in_the_url_are_refused_and_never_echoed(s3, tmp_path, cache):
    with pytest.raises(ConfigError, match="carries credentials") as err:
        config(tmp_path, f"s3://AKIDEXAMPLE:{SECRET}@{BUCKET}/team/sana-pipeline")
    assert SECRET not in str(err.value)
    with pytest.raises(ValueError, match="carries credentials") as err:
        local_copy(f"s3://AKIDEXAMPLE:{SECRET}@{BUCKET}/team/sana-pipeline")
    assert SECRET not in str(err.value) and not cache.exists()


def test_prep_encodes_with_the_pipeline_on_s3_as_with_the_local_folder(s3, cache):
    from data_prep.config import PrepConfig
    from data_prep.encode import ShardEncoder, describe_models
    from data_prep.images import ImageConfig
    from data_prep.shard import ShardBatch
    from emf_dist.text_encoder import TextEncoderConfig

    _, local = s3
    images = np.random.default_rng(0).integers(0, 256, (2, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    out = {}
    for where, name in (("s3", URL), ("local", str(local))):
        cfg = from_dict(PrepConfig, {"encoder": {"name": name, "max_length": TEXT_LENGTH},
                                     "image": {"kind": "latent", "vae": name, "resolution": RESOLUTION}}, validate=True)
        described = describe_models(cfg)
        encoder = ShardEncoder(TextEncoderConfig(name=name, max_length=TEXT_LENGTH), 2,
                               ImageConfig(kind="latent", vae=name, resolution=RESOLUTION), threads=1, gpus=0)
        shard = encoder.encode(ShardBatch(index=0, version=1, plan_id="p", keys=["a", "b"], captions=["a red circle", "a blue square"],
                                          images=images.copy()))
        out[where] = described, shard
    (remote, remote_shard), (here, here_shard) = out["s3"], out["local"]
    assert remote["image"].vae == f"{URL}/vae"  # the manifest names what every machine reads
    assert (remote["image"].vae_sha256, remote["encoder"]["weights_sha256"]) == (
        here["image"].vae_sha256, here["encoder"]["weights_sha256"])
    np.testing.assert_array_equal(remote_shard.tokens, here_shard.tokens)
    np.testing.assert_array_equal(remote_shard.latents, here_shard.latents)

"""emf_dist/vae.py: both autoencoder classes, from their folder or a pipeline folder; the
normalisation (mean - shift) * scale and its inverse; the mismatch message."""

import numpy as np
import pytest
import torch

from emf_dist.vae import check_vae, decode_latents, describe_vae, encode_images, load_vae, spatial_compression
from tests.pretrained_helpers import tiny_dc_ae, write_sana_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_kl(shift_factor: float | None):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16, scaling_factor=0.5, shift_factor=shift_factor).eval()


def images(count=2, side=16):
    return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("shift", [None, 0.25])
def test_kl_latents_are_shifted_then_scaled_and_decode_inverts_it(tmp_path, shift):
    tiny_kl(shift).save_pretrained(tmp_path / "kl")
    vae = load_vae(str(tmp_path / "kl"))
    info = describe_vae(str(tmp_path / "kl"), vae)
    assert (info.class_name, info.scaling_factor, info.shift_factor) == ("AutoencoderKL", 0.5, shift)
    pixels = images()
    latents = encode_images(vae, info, pixels, batch_size=1)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        np.testing.assert_allclose(latents.astype(np.float32), ((mean - (shift or 0)) * 0.5).numpy(), atol=2e-3)
        want = vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, info, torch.from_numpy(latents).float()), want, atol=1e-2, rtol=0)
    assert spatial_compression(vae) == pixels.shape[1] // latents.shape[2] == 2  # what the sizes say


def test_a_pipeline_folder_names_its_dc_ae_and_a_different_one_is_named_in_the_error(tmp_path):
    pipeline = write_sana_pipeline(tmp_path / "sana")
    vae = load_vae(str(pipeline))
    info = describe_vae(str(pipeline), vae)
    assert (info.source, info.class_name, info.shift_factor) == (str(pipeline / "vae"), "AutoencoderDC", None)
    latents = encode_images(vae, info, images(side=32), batch_size=2)
    assert latents.shape == (2, 4, 8, 8) and latents.dtype == np.float16
    assert spatial_compression(vae) == 32 // 8
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(images(side=32)).permute(0, 3, 1, 2).float() / 127.5 - 1).latent * 0.5
    np.testing.assert_allclose(latents.astype(np.float32), want.numpy(), atol=2e-3)
    tiny_dc_ae(seed=1).save_pretrained(tmp_path / "other")
    other = describe_vae(str(tmp_path / "other"), load_vae(str(tmp_path / "other")))
    with pytest.raises(ValueError, match=r"VAE mismatch between the shards \(.*/sana/vae\) and the model "
                                         r"\(.*/other\): sha256 [0-9a-f]{12}\.\. != [0-9a-f]{12}\.\."):
        check_vae(info, other, what_expected="the shards", what_actual="the model")
    check_vae(info, describe_vae(str(pipeline / "vae"), vae), what_expected="a", what_actual="b")  # same weights


def test_an_unsupported_autoencoder_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(ValueError, match="AutoencoderTiny.*supported autoencoders: AutoencoderKL, AutoencoderDC"):
        load_vae(str(tmp_path))

"""An SD3 pipeline folder as the text encoder: CLIP-L, CLIP-G and T5 states and pooled vectors
exactly as StableDiffusion3Pipeline.encode_prompt gives them, on a tiny random pipeline folder
(tests/sd3_pipeline_helpers.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a hub

import pytest
import torch

from emf_dist.text_encoder import TextEncoder, TextEncoderConfig, check_fingerprint
from tests.sd3_pipeline_helpers import (
    CLIP_LENGTH,
    POOLED_DIM,
    SD3,
    T5_DIM,
    T5_LENGTH,
    TEXT_LENGTH,
    pipeline_encoding,
    write_sd3_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Mixed case (CLIP lowercases, T5 does not), one caption past both CLIP's 8 and T5's 6 tokens.
CAPTIONS = ["A red circle", "x", "a red square above a red circle, far too long"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipeline")


def sd3_encoder(folder, **over) -> TextEncoder:
    return TextEncoder(TextEncoderConfig(name=str(folder), max_length=T5_LENGTH, dtype="float32", **over))


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_an_sd3_folder_encodes_prompts_as_its_pipeline_does(pipeline, clip_skip):
    encoder = sd3_encoder(pipeline, clip_skip=clip_skip)
    ours, null = encoder.encode(CAPTIONS, batch_size=2), encoder.encode_null()
    tokens, negative, pooled, negative_pooled = pipeline_encoding(pipeline, CAPTIONS, clip_skip=clip_skip)
    # What SD3Transformer2DModel takes: [B, CLIP + T5 length, joint_attention_dim] and pooled_projection_dim.
    assert ours.tokens.shape == (3, TEXT_LENGTH, SD3["joint_attention_dim"]) and encoder.length == TEXT_LENGTH
    assert ours.pooled.shape == (3, SD3["pooled_projection_dim"]) and encoder.pooled_dim == POOLED_DIM
    torch.testing.assert_close(ours.tokens, tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    # The unconditional input is the pipeline's negative prompt "" (at the penultimate CLIP layer).
    torch.testing.assert_close(null.tokens, negative[:1], rtol=0, atol=1e-6)
    torch.testing.assert_close(null.pooled, negative_pooled[:1], rtol=0, atol=1e-6)
    # SD3 attends to every position: all of them are kept, padded ones with the states computed there.
    assert ours.mask.all() and null.mask.shape == (1, TEXT_LENGTH) and null.mask.all()
    assert (ours.tokens[1, CLIP_LENGTH + 2:].abs().sum(-1) > 0).all()  # T5's padding ("x" is 2 tokens)
    assert (ours.tokens[:, :CLIP_LENGTH, 20:] == 0).all() and (ours.tokens[:, :CLIP_LENGTH, :20] != 0).any()
    assert ours.truncated.tolist() == [True, False, True]  # T5's 6 tokens ("A red circle" is 11)


def test_clip_skip_takes_an_earlier_clip_layer_for_captions_only(pipeline):
    default, skipped = sd3_encoder(pipeline), sd3_encoder(pipeline, clip_skip=1)
    a, b = default.encode(CAPTIONS[:1]), skipped.encode(CAPTIONS[:1])
    assert not torch.allclose(a.tokens[:, :CLIP_LENGTH], b.tokens[:, :CLIP_LENGTH], atol=1e-3)
    assert torch.equal(a.tokens[:, CLIP_LENGTH:], b.tokens[:, CLIP_LENGTH:])  # T5 is untouched
    assert torch.equal(a.pooled, b.pooled)  # the projected pooled output is the last layer's
    assert torch.equal(default.encode_null().tokens, skipped.encode_null().tokens)
    assert default.fingerprint()["prompt"]["clip_skip"] is None and skipped.fingerprint()["prompt"]["clip_skip"] == 1
    with pytest.raises(ValueError, match="clip_skip=3 is out of range .* 3 layers, so clip_skip takes 0 to 2"):
        sd3_encoder(pipeline, clip_skip=3)


def test_a_folder_without_t5_feeds_zeros_as_the_pipeline_does(tmp_path, pipeline):
    folder = write_sd3_pipeline(tmp_path / "no-t5", t5=False)
    encoder = sd3_encoder(folder)
    ours, null = encoder.encode(CAPTIONS), encoder.encode_null()
    tokens, negative, pooled, negative_pooled = pipeline_encoding(folder, CAPTIONS)
    assert ours.tokens.shape == (3, TEXT_LENGTH, T5_DIM) and (ours.tokens[:, CLIP_LENGTH:] == 0).all()
    torch.testing.assert_close(ours.tokens, tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(null.tokens, negative[:1], rtol=0, atol=1e-6)
    assert ours.truncated.tolist() == [True, False, True]  # CLIP's 8 tokens without T5
    fingerprint = encoder.fingerprint()
    assert fingerprint["text_encoders"]["text_encoder_3"] is None
    assert fingerprint["weights_sha256"] != sd3_encoder(pipeline).fingerprint()["weights_sha256"]


def test_the_fingerprint_names_all_three_encoders_and_the_recipe(tmp_path, pipeline):
    fingerprint = sd3_encoder(pipeline).fingerprint()
    assert set(fingerprint["text_encoders"]) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    assert fingerprint["prompt"] == {"pipeline": "StableDiffusion3Pipeline", "clip_skip": None,
                                     "clip_max_length": CLIP_LENGTH, "t5_max_length": T5_LENGTH}
    assert (fingerprint["length"], fingerprint["dim"], fingerprint["pooled_dim"]) == (TEXT_LENGTH, T5_DIM, POOLED_DIM)
    # A copy elsewhere is the same encoder; another T5 (the CLIPs equal) is not.
    other = write_sd3_pipeline(tmp_path / "other-t5", encoder_seeds={"text_encoder_3": 7})
    check_fingerprint(fingerprint, sd3_encoder(write_sd3_pipeline(tmp_path / "copy")).fingerprint(),
                      what_expected="a", what_actual="b")
    changed = sd3_encoder(other).fingerprint()
    assert changed["text_encoders"]["text_encoder"] == fingerprint["text_encoders"]["text_encoder"]
    with pytest.raises(ValueError, match=r"weights_sha256 [0-9a-f]{12}\.\. != [0-9a-f]{12}\.\..*text_encoders"):
        check_fingerprint(fingerprint, changed, what_expected="the shards", what_actual="the config")
    with pytest.raises(ValueError, match="max_length 6 != 5"):
        check_fingerprint(fingerprint, TextEncoder(TextEncoderConfig(name=str(pipeline), max_length=5,
                                                                     dtype="float32")).fingerprint(),
                          what_expected="the shards", what_actual="the config")


def test_settings_the_sd3_recipe_does_not_take_are_refused(pipeline):
    with pytest.raises(ValueError, match="leave layer, normalize_pooled at the default"):
        sd3_encoder(pipeline, layer=-2, normalize_pooled=True)
    with pytest.raises(ValueError, match="takes 1 to 512 tokens"):
        TextEncoder(TextEncoderConfig(name=str(pipeline), max_length=600))
    with pytest.raises(ValueError, match="clip_skip applies to SD3 pipeline folders; minilm is not one"):
        TextEncoder(TextEncoderConfig(clip_skip=1))
    assert TextEncoderConfig(clip_skip=-1).validate() == ["clip_skip must be null or an int >= 0, got -1"]

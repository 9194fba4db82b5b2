"""A diffusers pipeline folder as the text encoder: the states its pipeline feeds the transformer."""

import inspect

import pytest
import torch

from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from tests.pretrained_helpers import TEXT_DIM, TEXT_LENGTH, write_sana_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_sana_pipeline(tmp_path_factory.mktemp("sana") / "pipeline")


def test_a_pipeline_folder_encodes_prompts_as_its_pipeline_does(pipeline):
    """SANA's recipe (lowercase, the instruction prefix, BOS + the last L - 1 states; "" without the
    instruction) against SanaPipeline.encode_prompt on the same folder."""
    from diffusers import SanaPipeline

    encoder = TextEncoder(TextEncoderConfig(name=str(pipeline), max_length=TEXT_LENGTH, dtype="float32"))
    captions = ["A Red circle above a blue square", "x", "a caption far too long for twelve tokens " * 3]
    ours, null = encoder.encode(captions), encoder.encode_null()
    pipe = SanaPipeline.from_pretrained(pipeline)
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        tokens, mask, null_tokens, null_mask = pipe.encode_prompt(
            captions, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=TEXT_LENGTH,
            complex_human_instruction=instruction, device="cpu")
    assert torch.equal(ours.mask, mask.bool()) and ours.truncated.tolist() == [False, False, True]
    torch.testing.assert_close(ours.tokens, tokens * mask[..., None], rtol=0, atol=1e-6)
    assert torch.equal(null.mask, null_mask[:1].bool())
    torch.testing.assert_close(null.tokens, null_tokens[:1] * null_mask[:1, :, None], rtol=0, atol=1e-6)
    fingerprint = encoder.fingerprint()
    assert fingerprint["prompt"]["pipeline"] == "SanaPipeline" and fingerprint["dim"] == TEXT_DIM
    assert "prompt" not in TextEncoder(TextEncoderConfig(max_length=8)).fingerprint()  # plain encoders unchanged

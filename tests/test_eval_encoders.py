"""Encoder evaluation on the real packaged MiniLM against the reference baselines."""

import json

import numpy as np
import pytest
import torch

from emf_app.cli import main as emf
from emf_dist.eval.baselines import HashedBagOfWords
from emf_dist.eval.encoder_candidates import _TransformersAdapter
from emf_dist.eval.encoders import (
    Candidate,
    DiscriminabilityConfig,
    DisentanglementConfig,
    EncoderEvalConfig,
    RetrievalSet,
    discriminability,
    evaluate_encoders,
    reduce_prompt,
    units,
)
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig

# Smaller than the defaults (150 scenes, 60 prompts) to fit the test budget; the seeds are the defaults'.
SMALL = EncoderEvalConfig(discriminability=DiscriminabilityConfig(scenes=40),
                          disentanglement=DisentanglementConfig(prompts=16, unrelated_pairs=60))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def result():
    return evaluate_encoders(SMALL)


def _row(result, name):
    return next(r for r in result["encoders"] if r["name"] == name)


def test_pretrained_minilm_ranks_above_both_baselines(result):
    minilm, bow, rand = (_row(result, n) for n in ("minilm", "hashed-bow", "minilm-random-init"))
    for baseline in (bow, rand):
        assert minilm["discriminability"]["score"] > baseline["discriminability"]["score"]
        assert minilm["discriminability"]["recall_at_1"] > baseline["discriminability"]["recall_at_1"]
        assert minilm["disentanglement"]["pooled_corrected"] > baseline["disentanglement"]["pooled_corrected"]
    assert result["selection"]["selected"] == "minilm"
    assert result["selection"]["verdicts"]["minilm"] == {"passed": True, "reasons": []}
    # Every retriever beats chance, and the breakdown covers every mode and ratio.
    assert min(r["discriminability"]["score"] for r in result["encoders"]) > minilm["discriminability"]["chance"]
    assert set(minilm["disentanglement"]["breakdown"]) == {"word", "phrase", "sentence"}
    assert all(set(v) == {"0.1", "0.3", "0.5"} for v in minilm["disentanglement"]["breakdown"].values())
    json.dumps(result)  # the pipeline reads it as JSON


def test_raw_cosines_mislead_and_the_correction_fixes_it(result):
    """The random-init net maps everything close together: highest raw cosine, lowest corrected one."""
    minilm, rand = _row(result, "minilm"), _row(result, "minilm-random-init")
    assert rand["disentanglement"]["pooled"] > minilm["disentanglement"]["pooled"]
    assert rand["disentanglement"]["baseline_pooled"] > 0.9
    assert rand["disentanglement"]["pooled_corrected"] < minilm["disentanglement"]["pooled_corrected"]


def test_token_alignment_is_exact_for_a_context_free_encoder(result):
    """Bag-of-words token states ignore context: every surviving word keeps its vector exactly."""
    bow = _row(result, "hashed-bow")["disentanglement"]
    assert bow["token"] == pytest.approx(1.0, abs=1e-6)
    assert bow["baseline_token"] == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("padding_side, pooling", [("right", "mean"), ("left", "last")])
def test_length_bucketed_encoding_equals_the_text_encoder(padding_side, pooling):
    encoder = TextEncoder(TextEncoderConfig(max_length=48, padding_side=padding_side, pooling=pooling))
    captions = ["a red circle", "A photo of two blue squares. The first is at the top left. The second is at the "
                "bottom.", "an orange triangle to the left of a cyan circle"]
    want, got = encoder.encode(captions), _TransformersAdapter(encoder, "minilm").encode(captions)
    assert torch.equal(want.mask, got.mask)
    # Equal up to one float16 step (the stored precision): shorter padding changes the attention
    # kernel's summation order, and since transformers 5.24 that moves a few values by one ulp.
    # A wrong mask or padding side moves them by orders of magnitude more.
    torch.testing.assert_close(got.tokens, want.tokens.float(), rtol=2 ** -10, atol=2 ** -10)
    torch.testing.assert_close(got.pooled, want.pooled.float(), rtol=2 ** -10, atol=2 ** -10)


def test_units_and_reductions_are_fixed_by_the_seed():
    prompt = "A red circle to the left of a blue square. The circle is at the top. There are two objects."
    assert [len(u) for u in units(prompt.split(), "sentence")] == [10, 6, 4]
    phrases = [" ".join(prompt.split()[i] for i in u) for u in units(prompt.split(), "phrase")]
    assert phrases[:3] == ["A red circle", "to the left", "of a blue square."]
    for mode in ("word", "phrase", "sentence"):
        n = len(units(prompt.split(), mode))
        for ratio in (0.1, 0.3, 0.5):
            text, kept = reduce_prompt(prompt, mode, ratio, np.random.default_rng([11, 0, 1]))
            again = reduce_prompt(prompt, mode, ratio, np.random.default_rng([11, 0, 1]))
            assert (text, kept) == again
            kept_units = len(units(text.split(), mode)) if mode != "phrase" else None
            if kept_units is not None:
                assert kept_units == n - min(n - 1, max(1, round(ratio * n)))
            assert text == " ".join(prompt.split()[i] for i in kept)
    assert reduce_prompt("a single sentence here.", "sentence", 0.5, np.random.default_rng(0)) is None


def test_discriminability_excludes_own_image_and_verbatim_copies():
    bow = Candidate("hashed-bow", "baseline", HashedBagOfWords())
    captions = ["a red circle", "a red circle", "a photo of a red circle", "a blue square", "a photo of a blue square"]
    image_of = np.array([0, 1, 1, 2, 2])
    similarity = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # images 0 and 1 show the same
    data = RetrievalSet(captions, image_of, similarity)
    result = discriminability(bow.encoder.encode(captions).pooled, data)
    # Query 0 may not retrieve its verbatim copy (caption 1): it gets "a photo of a red circle" (image 1,
    # similarity 1). Query 1 may not use its own image's caption 2 nor its copy 0: only blue squares
    # are left (similarity 0, the best available, so still a hit at R@1). Query 2 retrieves caption 0
    # (similarity 1); queries 3 and 4 only have red circles left (0).
    assert result["queries"] == 5
    assert result["score"] == pytest.approx(2 / 5)
    assert result["recall_at_1"] == pytest.approx(1.0)
    assert result["chance"] == pytest.approx((1 / 3 + 0 + 1 / 3 + 0 + 0) / 5)


def test_cli_writes_the_table_and_decision(tmp_path, capsys):
    out = tmp_path / "enc"
    args = ["eval", "encoders", "--out", str(out), "baselines=[hashed_bow]", "discriminability.scenes=12",
            "disentanglement.prompts=4", "disentanglement.ratios=[0.5]", "selection.beat_baselines=false",
            "selection.min_discriminability=0.0", "selection.min_disentanglement=-1.0"]
    assert emf(args) == 0
    printed = capsys.readouterr().out
    assert "| minilm | candidate |" in printed and "Selected: **minilm**" in printed
    saved = json.loads((out / "encoders.json").read_text())
    assert saved["selection"]["selected"] == "minilm"
    assert "| hashed-bow | baseline |" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["encoders"]["selection"]["selected"] == "minilm"


def test_cli_rejects_an_unknown_baseline(tmp_path, capsys):
    assert emf(["eval", "encoders", "--out", str(tmp_path / "x"), "baselines=[tfidf]"]) == 2
    assert "unknown baseline 'tfidf'" in capsys.readouterr().err

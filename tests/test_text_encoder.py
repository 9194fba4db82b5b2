"""Tests for emf_dist.text_encoder on the real packaged all-MiniLM-L6-v2 weights (CPU, offline)."""
import dataclasses
import hashlib
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests must never reach a hub

import pytest
import torch
import torch.nn.functional as F

from emf_dist.text_encoder import TextEncoder, TextEncoderConfig, check_fingerprint, resolve_encoder_path

PACKAGED = resolve_encoder_path("minilm")
CAPTIONS = ["a red circle", "a photo of a small brown dog running on a sandy beach at sunset", ""]
LONG = "a very detailed painting of " + " and ".join(f"a {c} house" for c in ["red", "blue", "green"] * 6)
_CACHE: dict = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def enc(**kw) -> TextEncoder:
    """One TextEncoder per distinct config for the whole module (loading costs ~0.3 s each)."""
    cfg = TextEncoderConfig(**kw)
    key = dataclasses.astuple(cfg)  # spelled-out defaults share the instance
    if key not in _CACHE:
        _CACHE[key] = TextEncoder(cfg)
    return _CACHE[key]


def cos(a, b):
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_resolve_packaged_folder_has_weights():
    assert os.path.isfile(os.path.join(PACKAGED, "model.safetensors"))
    assert resolve_encoder_path(PACKAGED) == PACKAGED  # an existing folder resolves to itself


def test_shapes_dtypes_mask_and_zero_padding():
    e = enc()
    out = e.encode(CAPTIONS)
    assert e.dim == 384
    assert out.tokens.shape == (3, 32, 384) and out.tokens.dtype == torch.float16
    assert out.mask.shape == (3, 32) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, 384) and out.pooled.dtype == torch.float16
    assert out.truncated.dtype == torch.bool and not out.truncated.any()
    # The mask counts exactly the tokenizer's tokens (special tokens included), right-padded.
    counts = [len(e.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    assert out.mask.sum(1).tolist() == counts
    for row, n in zip(out.mask, counts):
        assert row[:n].all() and not row[n:].any()
    # Documented storage: exact zeros at padded positions, real states elsewhere.
    assert (out.tokens[~out.mask] == 0).all()
    assert (out.tokens[out.mask].abs().sum(-1) > 0).all()
    assert torch.isfinite(out.tokens.float()).all() and torch.isfinite(out.pooled.float()).all()


def test_deterministic_and_independent_of_batch_size():
    e = enc(dtype="float32")
    a, b = e.encode(CAPTIONS, batch_size=64), e.encode(CAPTIONS, batch_size=1)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.pooled, e.encode(CAPTIONS, batch_size=64).pooled)
    empty = e.encode([])
    assert empty.tokens.shape == (0, 32, 384) and empty.pooled.shape == (0, 384)
    with pytest.raises(TypeError):
        e.encode("a single string is not a list of captions")


def test_mean_pooling_matches_sentence_transformers_encode():
    from sentence_transformers import SentenceTransformer

    ours = enc(normalize_pooled=True, dtype="float32").encode(CAPTIONS[:2]).pooled
    oracle = SentenceTransformer(PACKAGED, device="cpu").encode(CAPTIONS[:2], convert_to_tensor=True)
    assert (cos(ours, oracle.cpu()) > 0.999).all()
    assert torch.allclose(ours.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_truncation_flag_and_exact_length():
    e = enc(max_length=8)
    out = e.encode(["a red circle", LONG])
    assert out.tokens.shape == (2, 8, 384) and out.mask.shape == (2, 8)
    assert out.truncated.tolist() == [False, True]
    assert out.mask[1].all() and out.mask[0].sum() == 5
    # Exactly L tokens is not truncated; L + 1 is.
    ids = e.tokenizer("one two three four five six")["input_ids"]  # 6 words + [CLS]/[SEP] = 8 tokens
    assert len(ids) == 8
    assert e.encode(["one two three four five six", "one two three four five six seven"]).truncated.tolist() == [
        False, True]
    assert len(e.tokenizer(LONG)["input_ids"]) > 8


def test_max_length_below_special_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="max_length=1 is too small"):
        TextEncoder(TextEncoderConfig(max_length=1))


@pytest.mark.parametrize("pooling", ["mean", "first", "last"])
def test_left_padding_matches_right_padding(pooling):
    right = enc(pooling=pooling, dtype="float32").encode(CAPTIONS)
    left = enc(pooling=pooling, padding_side="left", dtype="float32").encode(CAPTIONS)
    n = right.mask.sum(1)
    for i in range(len(CAPTIONS)):  # the same real tokens, padding moved to the front
        assert left.mask[i, 32 - n[i]:].all() and not left.mask[i, :32 - n[i]].any()
        assert torch.allclose(left.tokens[i, 32 - n[i]:], right.tokens[i, :n[i]], atol=1e-4)
    assert torch.allclose(left.pooled, right.pooled, atol=1e-4)


def test_first_and_last_pick_the_right_positions():
    for side in ("right", "left"):
        ref = enc(padding_side=side, dtype="float32").encode(CAPTIONS)
        first = enc(pooling="first", padding_side=side, dtype="float32").encode(CAPTIONS).pooled
        last = enc(pooling="last", padding_side=side, dtype="float32").encode(CAPTIONS).pooled
        for i in range(len(CAPTIONS)):
            real = ref.mask[i].nonzero().squeeze(1)
            assert torch.equal(first[i], ref.tokens[i, real[0]])  # [CLS]
            assert torch.equal(last[i], ref.tokens[i, real[-1]])  # [SEP]
        assert not torch.allclose(first, last)


def test_semantic_similarity_with_real_weights():
    e = enc(normalize_pooled=True, dtype="float32")
    p = e.encode(["a red circle", "a crimson disk", "stock market report"]).pooled
    similar, unrelated = cos(p[0], p[1]).item(), cos(p[0], p[2]).item()
    assert similar > unrelated + 0.2, (similar, unrelated)


def test_layer_selects_hidden_state():
    last, second = enc(dtype="float32").encode(CAPTIONS[:1]), enc(layer=-2, dtype="float32").encode(CAPTIONS[:1])
    assert not torch.allclose(last.tokens, second.tokens, atol=1e-3)
    assert torch.equal(enc(layer=6, dtype="float32").encode(CAPTIONS[:1]).tokens, last.tokens)  # -1 == 6 of 6 layers


def test_fingerprint_stable_and_sensitive():
    fp = enc().fingerprint()
    again = TextEncoder(TextEncoderConfig()).fingerprint()  # a fresh instance
    assert fp == again and json.loads(json.dumps(fp)) == fp
    with open(os.path.join(PACKAGED, "model.safetensors"), "rb") as f:
        h = hashlib.sha256(b"model.safetensors\0" + f.read()).hexdigest()
    assert fp["weights_sha256"] == h
    assert fp["dim"] == 384 and fp["max_length"] == 32 and fp["layer"] == 6  # -1 resolved to the last index
    assert enc(layer=6, dtype="float32").fingerprint()["layer"] == 6
    assert enc(max_length=8).fingerprint()["max_length"] == 8 and enc(max_length=8).fingerprint() != fp
    assert enc(layer=-2, dtype="float32").fingerprint()["layer"] == 5
    for key in ("name", "path", "weights_sha256", "layer", "pooling", "max_length", "padding_side", "dtype",
                "normalize_pooled", "dim"):
        assert key in fp


def test_check_fingerprint():
    fp = enc().fingerprint()
    check_fingerprint(fp, dict(fp), what_expected="a", what_actual="b")
    # Same weights elsewhere (another machine's venv, or a hub id) are the same encoder.
    check_fingerprint(fp, {**fp, "path": "/elsewhere/model", "name": "org/minilm"}, what_expected="a", what_actual="b")
    other = {**enc(max_length=8).fingerprint(), "weights_sha256": "cd34" * 16}
    with pytest.raises(ValueError) as err:
        check_fingerprint(fp, other, what_expected="the shards (manifest s3://x/manifest.json)",
                          what_actual="the model config")
    msg = str(err.value)
    assert msg.startswith("text encoder mismatch between the shards (manifest s3://x/manifest.json) "
                          "and the model config: ")
    assert "max_length 32 != 8" in msg
    assert f"weights_sha256 {fp['weights_sha256'][:12]}.. != cd34cd34cd34.." in msg
    assert "layer" not in msg and "path" not in msg
    with pytest.raises(ValueError, match="pooling mean != <missing>"):
        check_fingerprint(fp, {k: v for k, v in fp.items() if k != "pooling"}, what_expected="a", what_actual="b")


@pytest.mark.parametrize("name", ["no-such-org/no-such-encoder", "/no/such/folder"])
def test_unknown_model_is_a_clear_error(name, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the text encoder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError, match="not found locally") as err:
        TextEncoder(TextEncoderConfig(name=name))
    assert "No hub access is attempted" in str(err.value) and "local-dir" in str(err.value)


@pytest.mark.parametrize("layer", [7, -8])
def test_layer_out_of_range_is_a_clear_error(layer):
    with pytest.raises(ValueError, match=f"layer {layer} is out of range.*6 layers"):
        TextEncoder(TextEncoderConfig(layer=layer))


def test_validate_reports_problems():
    assert TextEncoderConfig().validate() == []
    problems = TextEncoderConfig(max_length=0, pooling="max", dtype="int8").validate()
    assert len(problems) == 3 and any("max_length" in p for p in problems)
    assert TextEncoderConfig(backend="sentence-transformers", layer=-2).validate()
    with pytest.raises(ValueError, match="invalid text encoder config.*max_length"):
        TextEncoder(TextEncoderConfig(max_length=0))


def test_sentence_transformers_backend_matches_transformers_backend():
    st = enc(backend="sentence-transformers", dtype="float32")
    tf = enc(normalize_pooled=True, dtype="float32")
    a, b = st.encode(CAPTIONS + [LONG]), tf.encode(CAPTIONS + [LONG])
    assert a.tokens.shape == b.tokens.shape == (4, 32, 384) and st.dim == 384
    assert torch.equal(a.mask, b.mask) and torch.equal(a.truncated, b.truncated)
    assert (a.tokens[~a.mask] == 0).all()
    assert (cos(a.pooled, b.pooled) > 0.999).all()
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    assert st.fingerprint()["backend"] == "sentence-transformers" != tf.fingerprint()["backend"]


@pytest.mark.parametrize("backend", ["transformers", "sentence-transformers"])
def test_loading_draws_no_library_progress_bar_and_leaves_the_setting_alone(backend, capfd):
    from transformers.utils import logging as transformers_logging
    assert transformers_logging.is_progress_bar_enabled()
    TextEncoder(TextEncoderConfig(backend=backend)).encode(["a red circle"])
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()

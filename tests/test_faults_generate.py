"""`emf generate` / `emf eval` faults: damaged exports, bad sampler options, wrong output paths,
non-finite outputs, an empty score folder; and the CLI's error boundary around them."""
import json
import os

import pytest

from emf_app.cli import main as emf
from emf_dist.text_encoder import TextEncoder, TextEncoderConfig
from tests.helpers import export_tiny


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(TextEncoderConfig(max_length=8))


@pytest.fixture(scope="module")
def good(tmp_path_factory, encoder):
    return export_tiny(tmp_path_factory.mktemp("export") / "model", encoder)


def copy_export(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def generate(model, out, *extra):
    return emf(["generate", "--model", str(model), "--out", str(out), *extra, "a red circle"])


def test_export_records_its_weights(good):
    record = json.loads((good / "emf_model.json").read_text())["weights"]
    assert record["bytes"] == os.path.getsize(good / "model.safetensors") and len(record["sha256"]) == 64
    assert record["shapes"]


def test_corrupted_weights_of_the_same_length_are_refused(good, tmp_path, capsys):
    bad = copy_export(good, tmp_path / "bad")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-100:] = b"\xff" * 100  # NaN bit patterns at the end of the last tensor; length unchanged
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert generate(bad, tmp_path / "x.png") == 3
    err = capsys.readouterr().err
    assert "model.safetensors is damaged" in err and "sha256" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_truncated_weights_are_refused_with_the_file_named(good, tmp_path, capsys):
    bad = copy_export(good, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert generate(bad, tmp_path / "x.png") == 3
    assert "model.safetensors is damaged" in capsys.readouterr().err
    # An export without the record (older exports): the header and the model's shapes still decide.
    info = json.loads((bad / "emf_model.json").read_text())
    del info["weights"]
    (bad / "emf_model.json").write_text(json.dumps(info))
    assert generate(bad, tmp_path / "x.png") == 3
    assert "truncated or not a safetensors file" in capsys.readouterr().err


def test_non_finite_output_is_an_error_not_a_black_png(tmp_path, encoder, capsys):
    model = export_tiny(tmp_path / "nan", encoder, nan=True)
    assert generate(model, tmp_path / "x.png") == 3
    assert "not finite" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("option", [["--steps", "0"], ["--steps", "-2"], ["--guidance", "nan"], ["--guidance", "inf"]])
def test_unusable_sampler_options_are_usage_errors(good, tmp_path, capsys, option):
    assert generate(good, tmp_path / "x.png", *option) == 2
    err = capsys.readouterr().err
    assert ("steps must be >= 1" in err) or ("guidance must be a finite number" in err)


def test_out_naming_a_folder_fails_first_and_leaves_nothing(good, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert generate(good, folder) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["pictures"]  # no pictures.partial


def test_out_below_a_file_or_unwritable(good, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert generate(good, tmp_path / "file" / "x.png") == 2
    assert "is a file, but a folder is expected" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert generate(good, locked / "x.png") == 4
        assert "permission denied" in capsys.readouterr().err


def test_debug_shows_the_traceback(good, tmp_path, capsys, monkeypatch):
    assert generate(good, tmp_path / "x.png", "--steps", "0", "--debug") == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("EMF_DEBUG", "1")
    assert generate(good, tmp_path / "x.png", "--steps", "0") == 2
    assert "Traceback" in capsys.readouterr().err


def test_score_geneval_refuses_an_empty_or_missing_folder(tmp_path, capsys):
    assert emf(["eval", "score-geneval", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "holds no GenEval-layout images" in err and "overall" not in err
    assert emf(["eval", "score-geneval", str(tmp_path / "nope")]) == 3

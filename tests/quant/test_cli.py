"""`fanformer quantize`: a run writes a quantized checkpoint and a summary; bad input is
one error line and exit status 2."""

import json

import pytest

from fanformer.cli import main


def quantize_args(trained, out, *extra) -> list[str]:
    return ["quantize", str(trained), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def rtn_dir(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "rtn"
    assert main(quantize_args(trained, out, "--method", "rtn", "--bits", "8", "--group-size", "32", "--asym")) == 0
    return out


def test_cli_gptq_writes_checkpoint_and_summary(trained, corpus, tmp_path, capsys):
    out = tmp_path / "gptq"
    code = main(quantize_args(trained, out, "--method", "gptq", "--group-size", "-1", "--act-order",
                              "--calib-data", str(corpus), "--calib-samples", "8", "--calib-seq-len", "32",
                              "--keep", "blocks.1.*", "--lm-head"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "blocks.0.ffn.down_proj" in printed and "gptq_loss" in printed and f"wrote {out}" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["desc_act"] and qc["group_size"] == -1 and qc["bits"] == 4
    report = json.loads((out / "quant_report.json").read_text())
    assert "lm_head" in report["layers"] and not any(n.startswith("blocks.1.") for n in report["layers"])
    assert "blocks.1.attn.q_proj" in report["kept"]
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--greedy",
                 "--device", "cpu"]) == 0


def test_cli_rtn(rtn_dir):
    qc = json.loads((rtn_dir / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["sym"], qc["group_size"]) == ("rtn", 8, False, 32)


def test_group_size_not_dividing_an_input_width(trained, tmp_path, cli_fails):
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "rtn", "--group-size", "128"),
          "group size 128 does not divide the input width 64")


def test_bits_out_of_range(trained, tmp_path, cli_fails):
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "rtn", "--bits", "5"), "bits must be one of")


def test_calibration_too_small(trained, corpus, tmp_path, cli_fails):
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "gptq", "--group-size", "32",
                                "--calib-data", str(corpus), "--calib-samples", "100000", "--calib-seq-len", "64"),
          "calibration data too small", "--calib-samples")
    assert not (tmp_path / "q").exists()


def test_already_quantized(rtn_dir, tmp_path, cli_fails):
    cli_fails(quantize_args(rtn_dir, tmp_path / "q", "--method", "rtn", "--group-size", "32"),
          "already quantized")


def test_output_exists_without_force(trained, rtn_dir, cli_fails):
    cli_fails(quantize_args(trained, rtn_dir, "--method", "rtn", "--group-size", "32"), "--force")
    assert main(quantize_args(trained, rtn_dir, "--method", "rtn", "--bits", "8", "--group-size", "32",
                              "--asym", "--force")) == 0


def test_gptq_flags_with_rtn(trained, tmp_path, cli_fails):
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "rtn", "--act-order"),
          "--act-order only applies to --method gptq")
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "awq", "--act-order"),
          "--act-order only applies to --method gptq")
    cli_fails(quantize_args(trained, tmp_path / "q", "--method", "rtn", "--calib-samples", "4"),
          "--calib-samples only applies to --method gptq or awq")

"""The drift table: its numbers are the evaluator's, a failing or unrunnable variant is a
row and the table goes on, budgets decide the exit code, bad input is a clear error."""

import dataclasses
import json
import math

import pytest
import torch

from fanformer.checkpoint import save_checkpoint
from fanformer.cli import main
from fanformer.errors import FANformerError
from fanformer.runtime import drift, eval_tokens, fp16_reference, load_backend
from fanformer.runtime.decode_timing import time_decode_in_child
from fanformer.runtime.drift_budgets import budget_breaches
from fanformer.runtime.drift_report import markdown
from fanformer.runtime.drift_table import DriftTable, ReferenceMemo, TableConfig, run_drift_table
from fanformer.runtime.variants import VARIANTS, check_names

MAX_TOKENS = 600


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, make_model, tokenizer):
    """A random-init tiny model of width 64: group size 128 does not divide it, so
    rtn-w4g128 fails to build for a real reason (the quantizer's own check)."""
    model = make_model(seed=0, d_model=64)
    return save_checkpoint(tmp_path_factory.mktemp("drift-table") / "ckpt", model, tokenizer)


@pytest.fixture(scope="module")
def table(ckpt, corpus, cache_dir, tmp_path_factory):
    config = TableConfig(variants=("pytorch-bf16", "rtn-w4g128", "gguf-q8_0", "onnx-fp16-cuda"),
                         max_tokens=MAX_TOKENS, speed=False)
    out = tmp_path_factory.mktemp("drift-table-out") / "drift"
    return run_drift_table(ckpt, out, config, data=[str(corpus)], cache_dir=cache_dir, progress=False)


def test_numbers_are_the_evaluators(table, ckpt, corpus, cache_dir):
    """Each row's drift is what runtime.drift says for the same artifact, tokens and ctx,
    with a reference loaded afresh (no memo): equal, not merely close."""
    reference = fp16_reference(ckpt)
    tokens = eval_tokens(reference.tokenizer, [str(corpus)], "test", MAX_TOKENS, cache_dir)
    for name in ("pytorch-bf16", "gguf-q8_0"):
        row = table.row(name)
        backend = load_backend(row.path, **VARIANTS[name].load_options("cpu", 1))
        expected = drift(backend, reference, tokens, ctx=table.protocol["ctx"]).to_dict()
        assert row.drift == expected
        assert row.drift["tokens"] == table.protocol["tokens"] == MAX_TOKENS - 1
    assert table.reference == table.row("gguf-q8_0").drift["reference"]


def test_a_failed_build_is_a_row_and_the_table_goes_on(table):
    row = table.row("rtn-w4g128")
    assert row.status == "failed" and row.drift is None
    assert row.reason.startswith("build: group size 128 does not divide")
    assert table.row("gguf-q8_0").measured  # built and scored after the failure
    assert not table.passed and table.breaches == [row]


def test_an_unrunnable_variant_is_skipped_with_its_reason(table):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    row = table.row("onnx-fp16-cuda")
    assert row.status == "skipped" and "CUDA" in row.reason
    assert "onnx-fp16-cuda | onnx |" in markdown(table) and "skipped: needs a CUDA GPU" in markdown(table)


def test_outputs_are_written(table):
    from pathlib import Path

    out = Path(table.out)
    saved = DriftTable.from_dict(json.loads((out / "drift.json").read_text()))
    assert saved.to_dict() == table.to_dict()
    assert (out / "drift.md").read_text() == markdown(table)
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert (out / "artifacts" / "gguf-q8_0.gguf").stat().st_size == table.row("gguf-q8_0").file_bytes


def test_a_build_error_of_any_kind_is_reported(ckpt, corpus, cache_dir, tmp_path, monkeypatch):
    """An unexpected exception (a bug) fails the row with its type and the table goes on;
    a variant built from a failed one fails with the source named."""
    def boom(context, source, out):
        raise ZeroDivisionError("scale of an empty group")

    monkeypatch.setitem(VARIANTS, "onnx-fp32", dataclasses.replace(VARIANTS["onnx-fp32"], build=boom))
    config = TableConfig(variants=("onnx-fp32", "genai", "pytorch-bf16"), max_tokens=MAX_TOKENS, speed=False)
    table = run_drift_table(ckpt, tmp_path / "out", config, data=[str(corpus)], cache_dir=cache_dir, progress=False)
    assert table.row("onnx-fp32").reason == "build: ZeroDivisionError: scale of an empty group"
    genai = table.row("genai")
    assert genai.status == "skipped" or genai.reason.startswith("build: its source onnx-fp32 failed to build")
    assert table.row("pytorch-bf16").status == "ok"


def test_budgets_decide_the_exit_code(ckpt, corpus, tmp_path, capsys):
    tight, loose = tmp_path / "tight.json", tmp_path / "loose.json"
    tight.write_text(json.dumps({"_comment": "nothing drifts this little", "gguf-q8_0": {"max_kl_mean": 0.0}}))
    loose.write_text(json.dumps({"gguf-q8_0": {"max_kl_mean": 1.0, "max_ppl_change": 1.0, "min_top1": 0.0}}))
    args = ["drift", ckpt, "--data", corpus, "--variants", "gguf-q8_0", "--max-tokens", MAX_TOKENS, "--no-speed",
            "--quiet", "--out", tmp_path / "out"]
    assert main([str(a) for a in args + ["--budget", loose]]) == 0
    assert "**PASS**" in capsys.readouterr().out
    assert main([str(a) for a in args + ["--budget", tight, "--force"]]) == 1
    captured = capsys.readouterr()
    assert "| over budget: mean KL" in captured.out and "**FAIL**" in captured.out
    assert "gguf-q8_0 over budget: mean KL" in captured.err and "Traceback" not in captured.err


def test_budget_breaches():
    drift_ = {"ppl_change": -0.03, "kl_mean": 0.02, "top1_agreement": 0.9}
    assert budget_breaches(drift_, {"max_ppl_change": 0.05, "max_kl_mean": 0.02, "min_top1": 0.9}) == []
    assert budget_breaches(drift_, {"max_ppl_change": 0.02}) == ["abs ppl change 0.03 > 0.02"]
    assert budget_breaches(drift_, {"min_top1": 0.95}) == ["top-1 agreement 0.9 < 0.95"]
    nan = {"ppl_change": math.nan, "kl_mean": math.nan, "top1_agreement": math.nan}
    assert len(budget_breaches(nan, {"max_ppl_change": 1, "max_kl_mean": 1, "min_top1": 0})) == 3


@pytest.mark.parametrize("content, fragments", [
    ("{not json", ["is not valid JSON"]),
    ("[1, 2]", ["must hold a JSON object", "got list"]),
    ('{"gptq-w4g129": {"max_kl_mean": 0.1}}', ["unknown variant 'gptq-w4g129'", "gptq-w4g128"]),
    ('{"gptq-w4g128": {"max_kl": 0.1}}', ["gptq-w4g128: unknown limit 'max_kl'", "max_kl_mean"]),
    ('{"gptq-w4g128": {"max_kl_mean": -1}}', ["max_kl_mean must be a finite number >= 0"]),
    ('{"gptq-w4g128": {"min_top1": 95}}', ["min_top1 is a fraction in [0, 1]"]),
    ('{"gptq-w4g128": 0.1}', ["gptq-w4g128 must be an object"]),
])
def test_a_malformed_budget_file_is_a_clear_error(ckpt, tmp_path, cli_fails, content, fragments):
    budget = tmp_path / "budget.json"
    budget.write_text(content)
    cli_fails(["drift", ckpt, "--budget", budget, "--out", tmp_path / "out"], str(budget), *fragments)
    assert not (tmp_path / "out").exists()  # checked before any work


def test_bad_input_is_a_clear_error(ckpt, tmp_path, cli_fails, table):
    cli_fails(["drift", ckpt, "--variants", "gguf-q4_0", "gguf-q9_0"], "unknown variant 'gguf-q9_0'",
              "known: pytorch-fp16, pytorch-bf16")
    cli_fails(["drift", ckpt, "--budget", tmp_path / "missing.json"], "cannot read the budget file")
    cli_fails(["drift", ckpt, "--out", table.out, "--variants", "gguf-q8_0"], "already holds files", "--force")
    cli_fails(["drift", tmp_path / "nowhere"], "does not exist")
    cli_fails(["drift", ckpt, "--out", ckpt / "drift"], "must be outside the checkpoint")
    with pytest.raises(FANformerError, match="variant named twice"):
        check_names(["gguf-q8_0", "gguf-q8_0"])


def test_a_quantized_checkpoint_is_refused(ckpt, tmp_path, cli_fails):
    from fanformer.quant.checkpoint import quantize_checkpoint
    from fanformer.quant.config import RTNConfig

    quantized = tmp_path / "q"
    quantize_checkpoint(ckpt, RTNConfig(bits=8, group_size=-1), quantized, progress=False)
    cli_fails(["drift", quantized, "--out", tmp_path / "out"], "is a quantized checkpoint", "float checkpoint")


def test_reference_memo_returns_what_the_backend_did(fake_backend):
    calls = []

    def next_logits(prefix):
        calls.append(len(prefix))
        return torch.arange(5.0) * len(prefix)

    memo = ReferenceMemo(fake_backend(next_logits, vocab_size=5))
    ids = torch.tensor([[1, 2, 3]])
    first = memo.score(ids)
    n = len(calls)
    assert torch.equal(memo.score(ids.clone()), first) and len(calls) == n  # the same window: kept
    memo.score(torch.tensor([[1, 2, 4]]))
    assert len(calls) == 2 * n  # another window: computed
    small = ReferenceMemo(fake_backend(next_logits, vocab_size=5), max_bytes=0)
    small.score(ids), small.score(ids)
    assert len(calls) == 4 * n  # over the memory bound: recomputed, same values


def test_decode_is_timed_in_a_process_of_its_own(ckpt):
    """The child loads the artifact by itself and reports a speed and its own peak RSS
    (only their presence is checked: no timing assertions)."""
    result = time_decode_in_child(ckpt, {"device": "cpu"}, steps=4, threads=1)
    assert result["decode_tokens_per_s"] > 0 and result["peak_rss_bytes"] > 0
    with pytest.raises(FANformerError, match="timing process exited with 1: error: .* does not exist"):
        time_decode_in_child(ckpt / "nowhere", {"device": "cpu"}, steps=4, threads=1)


def test_quickstart_trains_measures_and_samples(corpus, tmp_path, monkeypatch, capsys, cli_fails):
    """The quickstart end to end on a few steps and two variants (the real one runs them all)."""
    import fanformer.cli.train as cli

    monkeypatch.setattr(cli, "QUICKSTART_DRIFT", dict(variants=("gguf-q8_0", "gguf-q4_0"), max_tokens=300,
                                                       speed=False))
    out = tmp_path / "qs"
    code = main([str(a) for a in ["quickstart", "--out", out, "--data", corpus, "--max-steps", 3, "--quiet"]])
    saved = json.loads((tmp_path / "qs-drift" / "drift.json").read_text())
    assert code == (0 if saved["passed"] else 1)
    printed = capsys.readouterr().out
    assert "| gguf-q4_0 | gguf | llama.cpp's Q4_0 mixture |" in printed
    assert f"sample from gguf-q4_0 ({tmp_path / 'qs-drift' / 'artifacts' / 'gguf-q4_0.gguf'}):\n\ndef " in printed
    cli_fails(["quickstart", "--out", out, "--data", corpus], "qs-drift already holds", "--force")

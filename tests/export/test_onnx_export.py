"""Tests for export/onnx_export.py: the exported folder against independent references.

Each architecture option is exported from a briefly trained tiny model (a random-init
model's greedy output is one token repeated, which would hide a wrong position or cache
entry) and checked three ways: greedy tokens from PyTorch's uncached reference, from
onnxruntime through our backend, and from onnxruntime-genai reading the folder alone;
logits at prefill and decode; perplexity. The graph is checked against the names of
export/onnx_format.py and the ONNX checker, genai_config.json against the checkpoint,
and the README's two "without this project" snippets are run as written.
"""

import json
import re
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from fanformer.export import onnx_export
from fanformer.export import onnx_format as names
from fanformer.cli import main
from fanformer.config import FANformerConfig
from fanformer.errors import FANformerError
from fanformer.pipeline import train_run
from fanformer.tokenizer import BOS, EOS, PAD
from fanformer.runtime import GenerationConfig, eval_tokens, generate, load_backend, perplexity, reference_greedy

README = Path(__file__).resolve().parents[2] / "README.md"
MODEL = dict(vocab_size=400, max_seq_len=64)
# Enough steps at a high learning rate that greedy decoding leaves the one-token loop.
TRAIN = dict(max_steps=250, batch_size=8, seq_len=64, eval_every=0, save_every=0, log_every=50,
             warmup_steps=10, lr=3e-3, eval_batches=1)
# A few combined configs instead of the full product; together they cover every option:
# p = 0 and p > 0, pre and hybrid norm, CoLA off / on / on with the LM head, GQA (4 heads
# over 2 or 1 KV heads) and MHA, tied and untied embeddings, gated residuals on and off.
ARCHS = {
    "fan-pre-gqa-untied": dict(),  # the tiny preset: p = 0.25, pre-norm, 4 heads over 2 KV heads
    "plain-hybrid-mha-tied": dict(p=0.0, norm="hybrid", n_kv_heads=4, tie_embeddings=True),
    "seed-like": dict(p=0.15, norm="hybrid", n_kv_heads=1, cola_rank=0.25, cola_lm_head=True,
                      gated_residual=True),
    "cola-body-mha-tied-gated": dict(p=0.25, n_kv_heads=4, cola_rank=0.5, tie_embeddings=True,
                                     gated_residual=True),
}
FIRST = next(iter(ARCHS))
PROMPTS = ["def ", "import json\n", "class Parser(object):\n    def "]
NEW_TOKENS = 32
ALLOWED_DOMAINS = {"", "ai.onnx", "com.microsoft"}


GRAPHS = (names.FUSED, names.PLAIN)  # the default export, and --no-optimize's


@dataclass
class Exported:
    arch: str
    checkpoint: Path
    folder: Path
    graph: str

    @cached_property
    def pytorch(self):
        return load_backend(self.checkpoint, format="pytorch", device="cpu")

    @cached_property
    def onnx(self):
        return load_backend(self.folder, format="onnx", device="cpu")

    @cached_property
    def config(self) -> FANformerConfig:
        return FANformerConfig.from_file(self.checkpoint)


@pytest.fixture(scope="module")
def build(corpus, cache_dir, tmp_path_factory):
    """(arch, graph) -> Exported: trains each architecture once per module and exports it
    with each graph, on demand."""
    trained, built = {}, {}

    def get(arch: str, graph: str = names.FUSED) -> Exported:
        if arch not in trained:
            root = trained[arch] = tmp_path_factory.mktemp(arch)
            train_run(root / "ckpt", data=[str(corpus)], model_overrides={**MODEL, **ARCHS[arch]},
                      train_overrides=TRAIN, cache_dir=cache_dir, progress=False)
        if (arch, graph) not in built:
            root = trained[arch]
            flags = [] if graph == names.FUSED else ["--no-optimize"]
            assert main(["export", str(root / "ckpt"), "--format", "onnx", "--out", str(root / graph), *flags]) == 0
            built[arch, graph] = Exported(arch, root / "ckpt", root / graph, graph)
        return built[arch, graph]

    return get


@pytest.fixture(scope="module", params=[(arch, graph) for arch in ARCHS for graph in GRAPHS],
                ids=lambda p: "-".join(p))
def exported(request, build) -> Exported:
    return build(*request.param)


@pytest.fixture(scope="module", params=list(ARCHS))
def plain(request, build) -> Exported:
    return build(request.param, names.PLAIN)


@pytest.fixture(scope="module", params=list(ARCHS))
def fused(request, build) -> Exported:
    return build(request.param, names.FUSED)


@pytest.fixture(scope="module")
def first(build) -> Exported:
    return build(FIRST)


def genai_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """onnxruntime-genai's greedy continuation, EOS left out (as reference_greedy)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out[:-1] if out and out[-1] == eos_id else out


# --- Same tokens, logits and perplexity as PyTorch ---------------------------------------

def test_greedy_tokens_match_pytorch_and_genai(exported):
    pt, ox = exported.pytorch, exported.onnx
    prompt_ids = [pt.tokenizer.encode(p).ids for p in PROMPTS]
    expected = [reference_greedy(pt, ids, NEW_TOKENS) for ids in prompt_ids]
    # A precondition, not the property under test: a degenerate model would hide errors.
    assert len({t for row in expected for t in row}) >= 6, f"training too short: {expected}"

    batched = generate(ox, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=0))
    assert [g.token_ids for g in batched] == expected
    genai = [genai_greedy(exported.folder, ids, NEW_TOKENS, pt.info.eos_id) for ids in prompt_ids]
    assert genai == expected


def test_logits_at_prefill_and_decode_match_uncached_pytorch(exported):
    """Batch 2 with left padding through the ONNX cache, against PyTorch scoring each
    row unpadded and from scratch."""
    pt, ox = exported.pytorch, exported.onnx
    g = torch.Generator().manual_seed(0)
    lengths, steps = [9, 5], 3
    rows = [torch.randint(3, 400, (n + steps,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.full((2, width), pt.info.pad_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n:], mask[r, width - n:] = rows[r][:n], 1

    cache = ox.new_cache(2)
    got = [ox.prefill(cache, ids, mask)]
    for s in range(steps):
        mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
        step_ids = torch.stack([row[n + s] for row, n in zip(rows, lengths)])[:, None]
        got.append(ox.decode(cache, step_ids, mask))
    for r, n in enumerate(lengths):
        expected = pt.score(rows[r][None])[0]  # (n + steps, V)
        onnx_row = torch.cat([got[0][r, width - n:]] + [step[r] for step in got[1:]])
        torch.testing.assert_close(onnx_row, expected, atol=1e-4, rtol=1e-4)


def test_perplexity_equals_pytorch(exported, corpus, cache_dir):
    tokens = eval_tokens(exported.pytorch.tokenizer, [str(corpus)], "test", max_tokens=2000, cache_dir=cache_dir)
    expected = perplexity(exported.pytorch, tokens, ctx=64)
    got = perplexity(exported.onnx, tokens, ctx=64)
    assert got.tokens == expected.tokens == len(tokens) - 1
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-4)


# --- The folder's contents --------------------------------------------------------------------

def test_plain_graph_is_valid_standard_onnx_with_optimum_names(plain):
    exported = plain
    path = exported.folder / names.MODEL_FILE
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert {p.key: p.value for p in model.metadata_props}[names.META_GRAPH] == names.PLAIN
    c = exported.config
    assert {o.domain or "" for o in model.opset_import} <= ALLOWED_DOMAINS
    assert {o.domain: o.version for o in model.opset_import}[""] == names.OPSET

    def nodes(graph):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from nodes(sub)

    domains = {n.domain for n in nodes(model.graph)} | {n.domain for f in model.functions for n in f.node}
    assert domains <= ALLOWED_DOMAINS, domains

    def signature(value):
        t = value.type.tensor_type
        return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]

    inputs = {v.name: signature(v) for v in model.graph.input}
    outputs = {v.name: signature(v) for v in model.graph.output}
    assert list(inputs) == names.input_names(c.n_layers)
    assert list(outputs) == names.output_names(c.n_layers)
    int64, f32 = TensorProto.INT64, TensorProto.FLOAT
    assert inputs[names.INPUT_IDS] == (int64, [names.BATCH, names.SEQUENCE])
    assert inputs[names.ATTENTION_MASK] == (int64, [names.BATCH, names.TOTAL_SEQUENCE])
    assert inputs[names.POSITION_IDS] == (int64, [names.BATCH, names.SEQUENCE])
    for name in names.past_names(c.n_layers):
        assert inputs[name] == (f32, [names.BATCH, c.n_kv_heads, names.PAST_SEQUENCE, c.head_dim])
    assert outputs[names.LOGITS] == (f32, [names.BATCH, names.SEQUENCE, c.vocab_size])
    for name in names.present_names(c.n_layers):  # Optimum's name for the grown axis
        assert outputs[name] == (f32, [names.BATCH, c.n_kv_heads, f"{names.PAST_SEQUENCE} + {names.SEQUENCE}",
                                       c.head_dim])


def test_fused_graph_runs_attention_and_norms_in_contrib_kernels(fused):
    """One GroupQueryAttention per block (no attention MatMul or Softmax left), every norm
    that follows a residual add fused with it, Optimum's names minus position_ids."""
    model = onnx.load(str(fused.folder / names.MODEL_FILE))
    c = fused.config
    assert {p.key: p.value for p in model.metadata_props}[names.META_GRAPH] == names.FUSED
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == c.n_layers
    assert "Softmax" not in ops
    weights = {t.name for t in model.graph.initializer}
    assert all(n.input[1] in weights for n in model.graph.node if n.op_type == "MatMul")  # linears only
    # Layers that read one input (Q/K/V, gate/up; with CoLA, their A factors) are one node.
    matmul_inputs = [n.input[0] for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits")]
    assert len(matmul_inputs) == len(set(matmul_inputs))
    # Each block adds two residuals, each add fused into the norm after it (the last into the
    # final norm), except HybridNorm's x = z + ffn(z) when no norm follows (blocks 1..n-1).
    hybrid_adds = c.n_layers - 1 if c.norm == "hybrid" else 0
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * c.n_layers - hybrid_adds
    residual_adds = [n for n in model.graph.node if n.op_type == "Add" and not set(n.input) & weights]
    assert len(residual_adds) == hybrid_adds
    inputs = [v.name for v in model.graph.input]
    assert inputs == [names.INPUT_IDS, names.ATTENTION_MASK, *names.past_names(c.n_layers)]
    assert [v.name for v in model.graph.output] == names.output_names(c.n_layers)


def test_genai_config_matches_the_checkpoint(exported):
    genai = json.loads((exported.folder / names.GENAI_CONFIG_FILE).read_text())
    c, tokenizer = exported.config, exported.pytorch.tokenizer
    model, decoder = genai["model"], genai["model"]["decoder"]
    assert model["type"] == "decoder"
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == \
        (tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD))
    assert (model["vocab_size"], model["context_length"]) == (400, 64) == (c.vocab_size, c.max_seq_len)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"],
            decoder["hidden_size"], decoder["num_hidden_layers"]) == \
        (c.n_heads, c.n_kv_heads, c.head_dim, c.d_model, c.n_layers)
    assert decoder["filename"] == names.MODEL_FILE
    assert decoder["inputs"]["past_key_names"] % 1 == "past_key_values.1.key"
    assert decoder["outputs"]["present_value_names"] % 1 == "present.1.value"
    fused = exported.graph == names.FUSED
    # The fused graph writes keys and values into genai's preallocated buffer in place.
    assert genai["search"]["past_present_share_buffer"] is fused
    assert ("position_ids" in decoder["inputs"]) is not fused
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (exported.folder / name).read_bytes() == (exported.checkpoint / name).read_bytes()


# --- The README's snippets, run as written ----------------------------------------------------

def readme_snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Running the ONNX folder without this project")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def run_snippet(code: str, folder: Path) -> dict:
    placeholder = '"runs/quickstart-onnx"'
    assert code.count(placeholder) == 1, "the snippet should name the folder once, as in the quickstart"
    namespace = {}
    exec(compile(code.replace(placeholder, repr(str(folder))), "README.md", "exec"), namespace)
    return namespace


def test_readme_snippets_generate_pytorch_greedy_tokens(first, build, capsys):
    plain, genai = readme_snippets()
    pt = first.pytorch
    prompt = pt.tokenizer.encode("def ").ids

    for folder in (first.folder, build(FIRST, names.PLAIN).folder):  # with and without position_ids
        ns = run_snippet(plain, folder)
        assert ns["prompt"] == prompt
        assert ns["generated"] == reference_greedy(pt, prompt, 40)

    ns = run_snippet(genai, first.folder)
    sequence = [int(t) for t in ns["generator"].get_sequence(0)]
    if sequence[-1] == pt.info.eos_id:
        sequence.pop()
    assert sequence == prompt + reference_greedy(pt, prompt, 40 - len(prompt))
    printed = capsys.readouterr().out.splitlines()
    assert printed and printed[0].startswith("def ")


# --- Mistakes a user can make ----------------------------------------------------------------


def leftovers(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.tmp-*")) + sorted(parent.glob(f".{name}.old-*"))


def test_export_of_a_missing_checkpoint(tmp_path, cli_fails):
    cli_fails(["export", tmp_path / "nope", "--format", "onnx", "--out", tmp_path / "out"], "does not exist")
    assert sorted(tmp_path.iterdir()) == []


def test_unsupported_dtype(capsys, first, tmp_path):
    with pytest.raises(SystemExit) as exit:  # argparse refuses it before any work
        main(["export", str(first.checkpoint), "--format", "onnx", "--dtype", "bf16", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("fanformer export: error: ") and "bf16" in errors[0]
    with pytest.raises(FANformerError, match="bf16") as error:
        onnx_export.export_onnx(first.checkpoint, tmp_path / "o", dtype="bf16")
    assert "fp32" in str(error.value) and "fp16" in str(error.value)  # says what to use instead
    assert sorted(tmp_path.iterdir()) == []


def test_existing_output_needs_force_and_is_left_untouched(first, tmp_path, cli_fails):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cli_fails(["export", first.checkpoint, "--format", "onnx", "--out", out], "already holds", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path, "out") == []


def test_failed_export_leaves_nothing_behind(monkeypatch, first, tmp_path, cli_fails):
    def failing_validation(checkpoint, folder, kind):
        assert (folder / names.MODEL_FILE).is_file()  # the graph was written, then rejected
        raise FANformerError("ONNX validation failed: simulated")

    from fanformer.runtime import validation

    monkeypatch.setitem(validation.VALIDATORS, "onnx", failing_validation)
    out = tmp_path / "out"
    cli_fails(["export", first.checkpoint, "--format", "onnx", "--out", out], "validation failed")
    assert not out.exists() and leftovers(tmp_path, "out") == []
    assert sorted(tmp_path.iterdir()) == []


@pytest.fixture
def damaged(first, tmp_path) -> Path:
    """A copy of an exported folder for a test to break."""
    return Path(shutil.copytree(first.folder, tmp_path / "onnx"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_model_file(damaged, damage, cli_fails):
    model_file = damaged / names.MODEL_FILE
    data = model_file.read_bytes()
    model_file.write_bytes(b"\x07garbage\xff" * 200 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(FANformerError, match="corrupted or not a FANformer export"):
        load_backend(damaged)
    cli_fails(["eval", damaged, "--device", "cpu", "--quiet"], "onnxruntime cannot load")
    cli_fails(["generate", damaged, "--device", "cpu", "--prompt", "def "], "onnxruntime cannot load")


def trivial_onnx(path: Path) -> None:
    """A valid ONNX model (y = x) that is not a FANformer decoder."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", names.OPSET)])
    model.ir_version = 10  # what onnxruntime reads, whatever the installed onnx writes
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_valid_onnx_that_is_not_a_fanformer_export(damaged, tmp_path, cli_fails):
    trivial_onnx(damaged / names.MODEL_FILE)  # beside a real config and tokenizer
    with pytest.raises(FANformerError, match="not a FANformer export"):
        load_backend(damaged)
    cli_fails(["generate", damaged, "--device", "cpu", "--prompt", "def "], "not a FANformer export")

    (tmp_path / "alone").mkdir()
    trivial_onnx(tmp_path / "alone" / "identity.onnx")  # a bare .onnx file
    with pytest.raises(FANformerError, match="not a FANformer export"):
        load_backend(tmp_path / "alone" / "identity.onnx")


def test_fp16_on_an_fp32_export_is_refused(first, cli_fails):
    cli_fails(["generate", first.folder, "--dtype", "fp16", "--device", "cpu", "--prompt", "def "],
          "exported in fp32", "--dtype fp16")
    with pytest.raises(FANformerError, match="exported in fp32"):
        load_backend(first.folder, dtype="fp16")

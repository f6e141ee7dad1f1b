"""Our K-quant files with an importance matrix against llama.cpp's own, scored by llama.cpp.

On a p = 0 checkpoint (to llama.cpp, a plain Llama: `--arch llama`), every file is made
from the same f32 GGUF and scored by llama.cpp's `llama-perplexity --kl-divergence`
against that f32 file's logits on held-out text of the corpus (the test split):

    ours TYPE                     fanformer export --type TYPE
    ours TYPE + our imatrix       fanformer imatrix + export --imatrix
    llama.cpp TYPE + our imatrix  llama-quantize --imatrix (the same matrix file)
    llama.cpp TYPE + its imatrix  llama-imatrix on the calibration text, then llama-quantize

The first three answer "does our Q4_K_M with the same importance matrix drift no more than
llama.cpp's own?"; the last compares our importance statistics with llama-imatrix's. Every
type is llama-quantize's own mixture (the legacy q4_0 ... with the output tensor in Q6_K).
llama.cpp's programs are looked up on PATH or in --llama-cpp-bin (built from llama.cpp's
source, e.g. the copy vendored in llama-cpp-python's sdist:
`cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-quantize
llama-imatrix llama-perplexity`).

    python benchmarks/llamacpp_imatrix.py CHECKPOINT [--llama-cpp-bin DIR] [--types q4_k_m q4_0]
        [--chunks 64] [--ctx 512] [--test-chars 60000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fanformer.data import default_corpus_files, iter_documents, split_of
from fanformer.errors import FANformerError
from fanformer.export.gguf_export import export_gguf
from fanformer.export.gguf_imatrix import make_imatrix

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


def tool(name: str, bin_dir: str | None) -> str:
    found = shutil.which(name, path=os.pathsep.join(filter(None, (bin_dir, os.environ.get("PATH")))))
    if found is None:
        raise FANformerError(f"llama.cpp's {name} is not on PATH{' or in ' + bin_dir if bin_dir else ''}; "
                             "build llama.cpp's tools and pass --llama-cpp-bin")
    return found


def split_text(split: str, chars: int) -> str:
    """The default corpus's documents of one split, joined, up to `chars` characters."""
    parts, total = [], 0
    for doc in iter_documents(default_corpus_files()):
        if split_of(doc) == split:
            parts.append(doc)
            total += len(doc)
            if total >= chars:
                break
    return "\n".join(parts)[:chars]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise FANformerError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr[-1500:]}")
    return done.stdout + done.stderr


def kl_divergence(perplexity: str, model: Path, text: Path, base: Path, ctx: int, threads: int) -> dict:
    """llama-perplexity's mean KL divergence and same-top-token share against `base`'s logits.
    llama.cpp's logger prints from a thread of its own, and on a busy machine the last lines
    (the summary) are now and then lost at exit with status 0: such a run is repeated."""
    for _ in range(3):
        out = run([perplexity, "-m", str(model), "-f", str(text), "-c", str(ctx), "-t", str(threads), "-b", str(ctx),
                   "--kl-divergence-base", str(base), "--kl-divergence"])
        kld = re.search(r"Mean\s+KLD:\s+([-0-9.e]+)\s+±\s+([-0-9.e]+)", out)
        top = re.search(r"Same top p:\s+([0-9.]+)\s+±\s+([0-9.]+)", out)
        if kld and top:
            return {"kl": float(kld.group(1)), "kl_err": float(kld.group(2)), "top1": float(top.group(1))}
    raise FANformerError(f"could not read llama-perplexity's KL divergence output:\n{out[-1500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a p = 0 float checkpoint (exportable with --arch llama)")
    parser.add_argument("--llama-cpp-bin", help="folder of llama.cpp's programs (default: PATH)")
    parser.add_argument("--types", nargs="+", default=["q4_k_m", "q4_0"])
    parser.add_argument("--chunks", type=int, default=64, help="calibration windows of both importance matrices")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (calibration and scoring)")
    parser.add_argument("--test-chars", type=int, default=60000, help="characters of held-out text scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the files in this folder")
    args = parser.parse_args(argv)
    quantize, imatrix_tool, perplexity = (tool(name, args.llama_cpp_bin) for name in TOOLS)
    work = Path(tempfile.mkdtemp(prefix="llamacpp-imatrix-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        f32 = export_gguf(args.checkpoint, work / "f32.gguf", type="f32", arch="llama", force=True)
        ours_imatrix, windows, ctx = make_imatrix(args.checkpoint, work / "ours.imatrix.gguf", None, args.chunks,
                                                  args.ctx, progress=False, force=True)
        calibration = work / "calibration.txt"  # llama-imatrix's text: as many tokens of the training split
        calibration.write_text(split_text("train", windows * ctx * 4), encoding="utf-8")
        theirs_imatrix = work / "llama.imatrix.gguf"
        run([imatrix_tool, "-m", str(f32), "-f", str(calibration), "-c", str(ctx), "--chunks", str(windows),
             "-t", str(args.threads), "-o", str(theirs_imatrix)])
        test = work / "test.txt"
        test.write_text(split_text("test", args.test_chars), encoding="utf-8")
        base = work / "f32.kld"
        run([perplexity, "-m", str(f32), "-f", str(test), "-c", str(ctx), "-t", str(args.threads), "-b", str(ctx),
             "--kl-divergence-base", str(base)])
        rows = []
        for kind in args.types:
            files = {
                f"ours {kind}": export_gguf(args.checkpoint, work / f"ours-{kind}.gguf", type=kind, arch="llama",
                                            force=True),
                f"ours {kind} + our imatrix": export_gguf(args.checkpoint, work / f"ours-{kind}-imatrix.gguf",
                                                          type=kind, arch="llama", imatrix=ours_imatrix, force=True),
            }
            for label, matrix in (("our imatrix", ours_imatrix), ("its imatrix", theirs_imatrix)):
                out = work / f"llama-{kind}-{label.split()[0]}.gguf"
                run([quantize, "--imatrix", str(matrix), str(f32), str(out), kind.upper(), str(args.threads)])
                files[f"llama.cpp {kind} + {label}"] = out
            for label, path in files.items():
                rows.append((label, path.stat().st_size / 1e6, kl_divergence(perplexity, path, test, base, ctx,
                                                                             args.threads)))
        print(f"\nllama-perplexity --kl-divergence against the f32 file, ctx {ctx}, {args.test_chars} characters "
              f"of the test split; importance matrices from {windows} windows of {ctx} tokens\n")
        print("| file | size MB | mean KL (llama.cpp) | same top token |")
        print("|---|---|---|---|")
        for label, size, m in rows:
            print(f"| {label} | {size:.2f} | {m['kl']:.5f} ± {m['kl_err']:.5f} | {m['top1']:.2f}% |")
    except FANformerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

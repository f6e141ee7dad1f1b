"""Inference speed of any backend: prefill tokens/s, KV-cached decode tokens/s, peak memory.

Everything is timed through the `Backend` interface of runtime/backend.py (`new_cache`,
`prefill`, `decode`) and nothing else, so an ONNX or GGUF backend is benchmarked by the
same script as the PyTorch one: pass its model path instead of a preset.

- prefill: one `prefill` call on a fresh cache with a prompt of --prompt-len random
  tokens (capped at the model's max_seq_len); tokens/s = batch * prompt_len / seconds.
- decode @ context c: prefill c tokens (not timed), then time --decode-steps calls of
  `decode`, one token per sequence each, greedy (the argmax of the last logits, moved to
  the CPU as runtime/generation.py does, so each step ends with the device synchronised).
  Contexts are 16 and 512, the latter capped at max_seq_len - decode_steps.
  tokens/s = batch * decode_steps / seconds. With a KV cache a step's cost grows only by
  attention over the longer past, so decode@512 / decode@16 stays near 1; recomputing
  the whole prefix each step would make it fall roughly as 16 / 512.
- peak memory: on CUDA, torch.cuda.max_memory_allocated since the model was loaded
  (weights included); on the CPU, the process's peak resident set size (VmHWM),
  which also counts the Python interpreter, torch itself and, for a preset, the fp32
  copy the model is built in. The weight bytes are printed beside it for scale.

Each measurement runs once untimed (warmup), then --repeats times, and the fastest run
is reported: as timeit's documentation argues, other load on the machine only ever adds
time, so the minimum is the least noisy estimate of what the backend can do. A preset
is a randomly initialised model (speed does not depend on the weights), run without a
tokenizer.

Two established runtimes are timed the same way on the files they read: onnxruntime-genai
on an exported ONNX folder (--genai) and llama.cpp, through llama-cpp-python, on a GGUF
file of the `llama` architecture (--llama-cpp; `pip install llama-cpp-python`, which
compiles llama.cpp).

    python benchmarks/decode.py                                 # preset small, CPU or GPU
    python benchmarks/decode.py --preset seed-92m --dtype bf16 --device cuda --json
    python benchmarks/decode.py runs/my-checkpoint --decode-steps 64 --batch-size 4
    python benchmarks/decode.py model-q4_0.gguf --llama-cpp     # a `--arch llama` export

Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import device_name  # benchmarks/common.py: a script's own folder is on sys.path
from fanformer.config import PRESETS, FANformerConfig
from fanformer.errors import FANformerError
from fanformer.model import FANformer, count_parameters
from fanformer.runtime import decode_timing, load_backend
from fanformer.runtime.backend import DTYPES, Backend, detect_format
from fanformer.runtime.torch_backend import TorchBackend

SHORT_CONTEXT, LONG_CONTEXT = 16, 512




def weight_stats(backend: Backend) -> tuple[int | None, int | None]:
    """(weight bytes, parameter count) of the loaded model, for scale. A backend that holds
    no torch module (ONNX, GGUF) is measured by its file size on disk, with no count."""
    model = getattr(backend, "model", None)
    if isinstance(model, nn.Module):
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
        return sum(t.numel() * t.element_size() for t in tensors), count_parameters(model)
    path = Path(backend.info.path)
    if path.is_file():
        return path.stat().st_size, None
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir()
                   if f.suffix in (".safetensors", ".onnx", ".gguf", ".bin", ".data")), None
    return None, None


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM (runtime.decode_timing's reader),
    else ru_maxrss, which survives exec and so may report a big parent's peak."""
    vm_hwm = decode_timing.peak_rss_bytes()
    if vm_hwm is not None:
        return vm_hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


class Timer:
    """Wall-clock seconds of a block, with the device drained at both ends."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> "Timer":
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def random_prompt(backend: Backend, batch_size: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, backend.info.vocab_size, (batch_size, length), generator=generator)


def time_prefill(backend: Backend, prompt: torch.Tensor) -> float:
    cache = backend.new_cache(prompt.shape[0])
    with Timer(backend.info.device) as timer:
        backend.prefill(cache, prompt, torch.ones_like(prompt), last_only=True)[:, -1].argmax(-1).cpu()
    return timer.seconds


def time_decode(backend: Backend, prompt: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode calls after prefilling `prompt` (not timed)."""
    cache = backend.new_cache(prompt.shape[0])
    mask = torch.ones_like(prompt)
    logits = backend.prefill(cache, prompt, mask, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True).cpu()  # (B, 1)
    ones = torch.ones_like(token)
    with Timer(backend.info.device) as timer:
        for _ in range(steps):
            mask = torch.cat([mask, ones], dim=1)  # (B, past + 1)
            logits = backend.decode(cache, token, mask)
            token = logits[:, -1].argmax(-1, keepdim=True).cpu()
    return timer.seconds


def best_seconds(measure, repeats: int) -> float:
    measure()  # warmup: allocator, kernel selection, lazy initialisation
    return min(measure() for _ in range(repeats))


class GenaiTimer:
    """onnxruntime-genai on an ONNX folder, timed like a backend: `append_tokens` is the
    prefill, each `generate_next_token` one decode step. Batch 1; the tokens are the same
    random prompt the backends get."""

    def __init__(self, folder: str, threads: int):
        from fanformer.config import FANformerConfig
        from fanformer.runtime.backend import BackendInfo
        from fanformer.runtime.genai import GenaiSession

        self.session = GenaiSession(folder, threads)
        config = FANformerConfig.from_file(folder)
        self.info = BackendInfo(format="onnxruntime-genai", path=folder, vocab_size=config.vocab_size,
                                max_seq_len=config.max_seq_len, bos_id=0, eos_id=self.session.eos_id, pad_id=0,
                                dtype="(the folder's)", device="cpu")

    def time_prefill(self, prompt: torch.Tensor) -> float:
        with Timer("cpu") as timer:
            self.session.prefill(prompt[0].tolist(), self.info.max_seq_len)
        return timer.seconds

    def time_decode(self, prompt: torch.Tensor, steps: int) -> float:
        self.session.prefill(prompt[0].tolist(), prompt.shape[1] + steps + 1)
        self.session.step()  # picks a token from the prefill's logits: no model run, not timed
        with Timer("cpu") as timer:
            for _ in range(steps):
                if self.session.step() is None:
                    raise FANformerError("onnxruntime-genai stopped early (EOS) on the random prompt; "
                                         "time fewer --decode-steps")
        return timer.seconds


class LlamaCppTimer:
    """llama.cpp on a GGUF file, timed like a backend: `eval` of the prompt is the prefill,
    each `eval` of one token a decode step, followed by the argmax of its logits as in
    `time_decode`. Batch 1, torch's thread count for decode and prompts, llama.cpp's defaults
    otherwise (flash attention, f16 KV cache, weights repacked for the CPU where ggml does that)."""

    def __init__(self, path: str):
        try:
            import llama_cpp
        except ImportError:
            raise FANformerError("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python") from None
        from fanformer.runtime.backend import BackendInfo

        self.llama_cpp = llama_cpp
        try:  # n_ctx 0: the file's context length; one batch takes the longest prompt whole
            threads = torch.get_num_threads()  # for prompts too: n_threads_batch defaults to every CPU
            # flash_attn: llama.cpp's own default ("auto", on for the CPU); llama-cpp-python turns it off.
            self.llm = llama_cpp.Llama(model_path=path, n_ctx=0, n_batch=LONG_CONTEXT, n_threads=threads,
                                       n_threads_batch=threads, flash_attn=True, verbose=False)
        except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
            raise FANformerError(f"llama.cpp cannot load {path} ({err}); it runs `fanformer export "
                                 "--format gguf --arch llama` files, not the fanformer architecture") from None
        self.info = BackendInfo(format="llama.cpp", path=path, vocab_size=self.llm.n_vocab(),
                                max_seq_len=llama_cpp.llama_model_n_ctx_train(self.llm.model), bos_id=0, eos_id=0,
                                pad_id=0, dtype="(the file's)", device="cpu")

    def next_token(self) -> int:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated position
        return int(np.ctypeslib.as_array(logits, shape=(self.info.vocab_size,)).argmax())

    def time_prefill(self, prompt: torch.Tensor) -> float:
        self.llm.reset()
        with Timer("cpu") as timer:
            self.llm.eval(prompt[0].tolist())
            self.next_token()
        return timer.seconds

    def time_decode(self, prompt: torch.Tensor, steps: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt[0].tolist())
        token = self.next_token()
        with Timer("cpu") as timer:
            for _ in range(steps):
                self.llm.eval([token])
                token = self.next_token()
        return timer.seconds


def benchmark(backend: Backend, args) -> dict:
    info = backend.info
    batch, steps = args.batch_size, args.decode_steps
    if steps + 1 >= info.max_seq_len:
        raise FANformerError(f"--decode-steps {steps} leaves no room for a prompt in max_seq_len "
                             f"{info.max_seq_len}; use fewer steps")
    prompt_len = min(args.prompt_len, info.max_seq_len)
    # One position to spare: onnxruntime-genai's max_length counts the token it picks from the prefill.
    contexts = sorted({min(c, info.max_seq_len - steps - 1) for c in (SHORT_CONTEXT, LONG_CONTEXT)})
    if info.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    timer = isinstance(backend, (GenaiTimer, LlamaCppTimer))  # times itself, not through `Backend`
    prefill = backend.time_prefill if timer else lambda p: time_prefill(backend, p)
    decode = backend.time_decode if timer else lambda p, n: time_decode(backend, p, n)
    prompt = random_prompt(backend, batch, prompt_len)
    seconds = best_seconds(lambda: prefill(prompt), args.repeats)
    rows = [{"phase": "prefill", "context": 0, "tokens": batch * prompt_len, "calls": 1,
             "seconds": seconds, "tokens_per_s": batch * prompt_len / seconds}]
    for context in contexts:
        prompt = random_prompt(backend, batch, context)
        seconds = best_seconds(lambda: decode(prompt, steps), args.repeats)
        rows.append({"phase": f"decode @ {context}", "context": context, "tokens": batch * steps,
                     "calls": steps, "seconds": seconds, "tokens_per_s": batch * steps / seconds})

    decode = [r for r in rows if r["phase"].startswith("decode")]
    weight_bytes, params = weight_stats(backend)
    if info.device.startswith("cuda"):
        memory = {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_memory_kind": "cuda max allocated"}
    else:
        memory = {"peak_memory_bytes": peak_rss_bytes(), "peak_memory_kind": "process peak RSS"}
    return {"rows": rows, "prompt_len": prompt_len, "contexts": contexts,
            "decode_long_over_short": decode[-1]["tokens_per_s"] / decode[0]["tokens_per_s"],
            "weight_bytes": weight_bytes, "params": params, **memory}


def load(args) -> tuple[Backend, str]:
    if args.genai:
        if args.path is None or args.batch_size != 1:
            raise FANformerError("--genai needs an exported ONNX folder as PATH and --batch-size 1")
        return GenaiTimer(args.path, torch.get_num_threads()), str(args.path)
    if args.llama_cpp:
        if args.path is None or args.batch_size != 1:
            raise FANformerError("--llama-cpp needs a GGUF file of the llama architecture as PATH and --batch-size 1")
        return LlamaCppTimer(args.path), str(args.path)
    if args.path is not None:
        format = detect_format(args.path)
        options = {"threads": torch.get_num_threads()} if format in ("gguf", "onnx") else {}
        if format == "gguf":
            options["engine"] = args.engine
        return load_backend(args.path, dtype=args.dtype, device=args.device, **options), str(args.path)
    torch.manual_seed(0)
    model = FANformer(FANformerConfig.from_name(args.preset))
    return TorchBackend.from_model(model, None, dtype=args.dtype, device=args.device), \
        f"preset {args.preset} (random init)"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", help="a checkpoint directory or model file (instead of --preset)")
    parser.add_argument("--preset", choices=list(PRESETS), default="small",
                        help="random-init model to time when no PATH is given (default: small)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default: fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per call (default: 1)")
    parser.add_argument("--prompt-len", type=int, default=512,
                        help="prefill length, capped at max_seq_len (default: 512)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode calls per run (default: 32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per measurement; the fastest is kept (default: 3)")
    parser.add_argument("--genai", action="store_true",
                        help="time onnxruntime-genai on the ONNX folder PATH instead of the ONNX backend")
    parser.add_argument("--llama-cpp", action="store_true",
                        help="time llama.cpp (llama-cpp-python) on the GGUF file PATH instead of the GGUF backend")
    parser.add_argument("--engine", choices=["auto", "ggml", "torch"], default="auto",
                        help="the GGUF backend's engine (default: auto, ggml where ggml-python loads)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch, onnxruntime, onnxruntime-genai, the GGUF "
                        "backend and llama.cpp "
                        "(default: torch's own setting)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if min(args.batch_size, args.prompt_len, args.decode_steps, args.repeats, args.threads or 1) <= 0:
        parser.error("--batch-size, --prompt-len, --decode-steps, --repeats and --threads must be positive")
    return args


def main() -> None:
    args = parse_args()
    backend, source = load(args)
    info = backend.info
    result = benchmark(backend, args)
    name = device_name(info.device)
    threads = torch.get_num_threads() if info.device == "cpu" else None

    if args.json:
        print(json.dumps({"source": source, "format": info.format, "engine": getattr(backend, "engine", None), "device": name, "device_type": info.device,
                          "torch": torch.__version__, "threads": threads, "dtype": info.dtype,
                          "batch_size": args.batch_size, "decode_steps": args.decode_steps,
                          "repeats": args.repeats, "statistic": "min", "max_seq_len": info.max_seq_len,
                          **result}, indent=2))
        return
    print(f"{name}{f' ({threads} threads)' if threads else ''} | torch {torch.__version__} | {source} | "
          f"{info.format} {info.dtype} | batch {args.batch_size} | best of {args.repeats} after 1 warmup")
    params = f" ({result['params'] / 1e6:.2f}M params)" if result["params"] else ""
    print(f"weights: {mib(result['weight_bytes'])}{params} | max_seq_len {info.max_seq_len}")
    header = f"{'phase':<14} | {'context':>7} | {'tokens':>6} | {'ms/call':>8} | {'tokens/s':>10}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(f"{r['phase']:<14} | {r['context']:>7} | {r['tokens']:>6} | "
              f"{r['seconds'] / r['calls'] * 1e3:>8.2f} | {r['tokens_per_s']:>10,.1f}")
    short, long = result["contexts"][0], result["contexts"][-1]
    print(f"decode @ {long} / decode @ {short}: {result['decode_long_over_short']:.3f}x "
          f"(near 1 with a KV cache)")
    print(f"peak memory: {mib(result['peak_memory_bytes'])} ({result['peak_memory_kind']})")


if __name__ == "__main__":
    try:
        main()
    except FANformerError as err:  # a bad path, device or dtype: one line, as the CLI does
        sys.exit(f"error: {err}")

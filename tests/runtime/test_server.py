"""`fanformer serve` through the real `openai` client on a free loopback port: completions
and streams equal `runtime.generate` with the same seed, requests sent together equal
the same requests sent one by one (and were decoded together), every model form serves,
and bad input is a 4xx in OpenAI's error shape, never a 500 or a hung connection."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from fanformer.checkpoint import save_checkpoint  # noqa: E402
from fanformer.export import export  # noqa: E402
from fanformer.quant.checkpoint import quantize_checkpoint  # noqa: E402
from fanformer.quant.config import RTNConfig  # noqa: E402
from fanformer.runtime import GenerationConfig, generate, load_backend  # noqa: E402
from fanformer.runtime.gguf_backend import ggml_missing  # noqa: E402
from fanformer.runtime.server import ServerThread  # noqa: E402

MODEL = "tiny"
PROMPTS = ["def add(a", "Fourier features: cos", "période", "def add(a, b):\n    return", "cos, sin"]


@pytest.fixture(scope="module")
def checkpoint(train_overfit, tmp_path_factory):
    model, tokenizer, _ = train_overfit()
    path = tmp_path_factory.mktemp("serve") / "ckpt"
    save_checkpoint(path, model, tokenizer)
    return path


@pytest.fixture(scope="module")
def backend(checkpoint):
    return load_backend(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(backend, MODEL, max_batch=8, max_queue=32) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def expected(backend, prompt: str, **config):
    """`generate` with what a request left out taken from the model's generation_config.json
    (top_k 100, top_p 0.85 in these checkpoints), as the server documents."""
    defaults = {k: backend.generation_defaults[k] for k in ("top_k", "top_p", "repetition_penalty")
                if k in backend.generation_defaults}
    return generate(backend, [prompt], GenerationConfig(**{**defaults, **config}))[0]


class JoinSpy:
    """Counts the backend's cache joins and the largest batch decoded: proof that requests
    were batched (not only that their answers are right)."""

    def __init__(self, backend, monkeypatch):
        self.joins, self.widest = 0, 0
        self.gate = threading.Event()  # decode steps wait while it is clear
        self.gate.set()
        join, decode = backend.join_caches, backend.decode

        def counted_join(parts, length):
            self.joins += 1
            return join(parts, length)

        def watched_decode(cache, tokens, mask):
            self.gate.wait(30)
            self.widest = max(self.widest, tokens.shape[0])
            return decode(cache, tokens, mask)

        monkeypatch.setattr(backend, "join_caches", counted_join)
        monkeypatch.setattr(backend, "decode", watched_decode)


# --- Completions equal runtime.generate -------------------------------------------------

@pytest.mark.parametrize("options", [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=7),
                                     dict(temperature=1.3, top_k=20, seed=3, repetition_penalty=1.3),
                                     dict(temperature=0, stop=["\n"])])
def test_completion_equals_generate(client, backend, options):
    prompt, max_tokens = PROMPTS[0], 24
    extensions = {k: options[k] for k in ("top_k", "repetition_penalty") if k in options}  # not in OpenAI's API
    standard = {k: v for k, v in options.items() if k not in extensions}
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extensions,
                                      **standard)
    reference = expected(backend, prompt, max_new_tokens=max_tokens,
                         **{k: tuple(v) if k == "stop" else v for k, v in options.items()})
    choice = reply.choices[0]
    assert choice.text == reference.text
    assert choice.finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[reference.finish_reason]
    assert reply.usage.completion_tokens == len(reference.token_ids)
    assert reply.usage.prompt_tokens == len(backend.tokenizer.encode(prompt).ids)
    assert reply.model == MODEL and reply.object == "text_completion"


def test_n_choices_and_prompt_lists(client, backend):
    """Choice i of a prompt is sampled with seed + i; several prompts give n choices each."""
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=3, max_tokens=12, temperature=1.5, seed=11)
    assert [c.index for c in reply.choices] == list(range(6))
    for choice in reply.choices:
        prompt, i = PROMPTS[choice.index // 3], choice.index % 3
        assert choice.text == expected(backend, prompt, max_new_tokens=12, temperature=1.5, seed=11 + i).text


def test_token_id_prompts_and_echo(client, backend):
    ids = backend.tokenizer.encode(PROMPTS[1]).ids
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, echo=True)
    assert reply.choices[0].text == PROMPTS[1] + expected(backend, PROMPTS[1], max_new_tokens=10, temperature=0).text


def test_stream_equals_generate(client, backend):
    reference = expected(backend, PROMPTS[1], max_new_tokens=30, temperature=0.8, seed=5)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0.8, seed=5,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 3 and "".join(texts) == reference.text  # streamed as it is produced, not at the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == len(reference.token_ids)


def test_logprobs_are_the_models(client, backend):
    """Echoed prompt and sampled tokens' logprobs are log_softmax of an uncached forward."""
    prompt = PROMPTS[0]
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True,
                                      logprobs=3)
    lp = reply.choices[0].logprobs
    prompt_ids = backend.tokenizer.encode(prompt).ids
    ids = prompt_ids + generate(backend, [prompt], GenerationConfig(max_new_tokens=8, temperature=0))[0].token_ids
    reference = torch.log_softmax(backend.score(torch.tensor([ids]))[0], dim=-1)  # (T, vocab)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(float(reference[t - 1, ids[t]]), abs=1e-4)
        assert len(lp.top_logprobs[t]) <= 3
        assert max(lp.top_logprobs[t].values()) == pytest.approx(float(reference[t - 1].max()), abs=1e-4)
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(p) for p in lp.tokens[:i]) for i in range(len(ids))]


# --- Concurrency -------------------------------------------------------------------------

def requests_mix():
    """Different prompt lengths, budgets and sampling: rows join and leave at different steps."""
    return [dict(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=6 + 7 * (i % 4),
                 temperature=0 if i % 3 == 0 else 1.1, seed=i) for i in range(10)]


def test_concurrent_requests_equal_sequential_ones_and_are_batched(client, server, backend, monkeypatch):
    spy = JoinSpy(backend, monkeypatch)
    sequential = [client.completions.create(model=MODEL, **r).choices[0].text for r in requests_mix()]
    assert spy.widest == 1  # one at a time: nothing to batch
    start = threading.Barrier(len(requests_mix()))

    def send(request):
        start.wait()
        return client.completions.create(model=MODEL, **request).choices[0].text

    spy.gate.clear()  # the first step waits until all ten have arrived, so that they surely overlap
    with ThreadPoolExecutor(len(requests_mix())) as pool:
        replies = pool.map(send, requests_mix())
        assert wait_for(lambda: sum(health(server)[k] for k in ("running", "waiting")) == len(requests_mix()))
        spy.gate.set()
        concurrent = list(replies)
    assert concurrent == sequential
    assert sequential == [expected(backend, r["prompt"], max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                                   seed=r["seed"]).text for r in requests_mix()]
    assert spy.widest > 1 and spy.joins > 0  # decoded together, rows joining and leaving


def test_backend_that_cannot_batch_serves_in_order(backend, monkeypatch):
    monkeypatch.setattr(type(backend), "batching", False)
    spy = JoinSpy(backend, monkeypatch)
    with ServerThread(backend, MODEL) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda r: client.completions.create(model=MODEL, **r).choices[0].text,
                                  requests_mix()[:4]))
    assert spy.widest == 1 and spy.joins == 0
    assert texts == [expected(backend, r["prompt"], max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                              seed=r["seed"]).text for r in requests_mix()[:4]]


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url.replace("/v1", "/health"), timeout=10).read())


def wait_for(condition, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_is_503(backend, monkeypatch):
    """One request runs (held in its first decode step), one waits, the next is refused."""
    gate, decode = threading.Event(), backend.decode
    monkeypatch.setattr(backend, "decode", lambda *args: gate.wait(30) and decode(*args))
    request = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    with ServerThread(backend, MODEL, max_batch=1, max_queue=1) as url, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        first = pool.submit(client.completions.create, **request)
        assert wait_for(lambda: health(url)["running"] == 1)
        second = pool.submit(client.completions.create, **request)
        assert wait_for(lambda: health(url)["waiting"] == 1)
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(**request)
        gate.set()
        assert refused.value.status_code == 503 and refused.value.body["code"] == "server_busy"
        reference = expected(backend, PROMPTS[0], max_new_tokens=20, temperature=0).text
        assert first.result().choices[0].text == second.result().choices[0].text == reference


def test_disconnected_clients_leave_the_batch(backend, monkeypatch):
    """A client that hangs up, streaming or not, is dropped long before its 120 tokens."""
    steps, decode = [0], backend.decode

    def slow(*args):
        steps[0] += 1
        time.sleep(0.01)
        return decode(*args)

    monkeypatch.setattr(backend, "decode", slow)
    request = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=120, temperature=1.0, seed=0)
    with ServerThread(backend, MODEL) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(stream=True, **request)
        next(iter(stream))
        stream.close()
        assert wait_for(lambda: health(url)["running"] == 0)
        assert steps[0] < 100
        steps[0] = 0
        body = json.dumps(request).encode()
        with socket.create_connection(("127.0.0.1", int(url.split(":")[-1].split("/")[0]))) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert wait_for(lambda: health(url)["running"] == 1)
        assert wait_for(lambda: health(url)["running"] == 0)
        assert steps[0] < 100
        assert client.completions.create(**{**request, "max_tokens": 4}).choices[0].text  # still serving


def test_a_failing_step_fails_only_its_request(backend, monkeypatch):
    """A prefill that raises fails the requests it was for (400 for a FANformerError, 500
    for a bug), while a request already decoding finishes as if nothing happened."""
    from fanformer.errors import FANformerError

    prefill, decode, gate = backend.prefill, backend.decode, threading.Event()
    poison, bug = backend.tokenizer.encode("cos").ids[0], backend.tokenizer.encode("sin").ids[0]

    def failing(cache, input_ids, mask, last_only=False):
        if poison in input_ids:
            raise FANformerError("this prompt cannot run")
        if bug in input_ids:
            raise RuntimeError("a bug")
        return prefill(cache, input_ids, mask, last_only)

    monkeypatch.setattr(backend, "prefill", failing)
    monkeypatch.setattr(backend, "decode", lambda *args: gate.wait(30) and decode(*args))
    request = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=40, temperature=0)
    with ServerThread(backend, MODEL) as url, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        running = pool.submit(client.completions.create, **request)
        assert wait_for(lambda: health(url)["running"] == 1)  # held in its first decode step
        poisoned = pool.submit(client.completions.create, model=MODEL, prompt="cos", max_tokens=4)
        assert wait_for(lambda: health(url)["waiting"] == 1)  # joins the batch after that step
        gate.set()
        with pytest.raises(openai.APIStatusError) as failed:
            poisoned.result()
        assert failed.value.status_code == 400 and failed.value.body["message"] == "this prompt cannot run"
        assert running.result().choices[0].text == expected(backend, PROMPTS[0], max_new_tokens=40,
                                                             temperature=0).text
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=MODEL, prompt="sin", max_tokens=4)
        assert failed.value.status_code == 500 and failed.value.body["type"] == "server_error"


def test_non_finite_logits_stop_only_their_request(backend, monkeypatch):
    """A row whose logits are NaN fails its request with the model's error (400), as
    `generate` stops; the rows beside it in the batch decode on."""
    prefill, poison = backend.prefill, backend.tokenizer.encode("cos").ids[0]

    def poisoned(cache, input_ids, mask, last_only=False):
        logits = prefill(cache, input_ids, mask, last_only).clone()  # an inference tensor: copy to write
        logits[(input_ids == poison).any(-1).nonzero()[:, 0]] = float("nan")
        return logits

    monkeypatch.setattr(backend, "prefill", poisoned)
    with ServerThread(backend, MODEL) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=MODEL, prompt="cos", max_tokens=4, temperature=0)
        assert failed.value.status_code == 400 and "NaN or infinite logits" in failed.value.body["message"]
        good = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert good.choices[0].text == expected(backend, PROMPTS[0], max_new_tokens=8, temperature=0).text


# --- Bad input ---------------------------------------------------------------------------

BAD = [
    (dict(model="gpt-4", prompt="a"), 404, "model"),
    (dict(model=MODEL, prompt="a" * 400), 400, "prompt"),  # 400 tokens, context 128
    (dict(model=MODEL, prompt="a", max_tokens=10 ** 12), 400, "max_tokens"),
    (dict(model=MODEL, prompt="a", max_tokens=0), 400, "max_tokens"),
    (dict(model=MODEL, prompt="a", n=10 ** 6), 400, "n"),
    (dict(model=MODEL, prompt=["a"] * 20, n=16), 400, "n"),  # more sequences than the queue holds
    (dict(model=MODEL, prompt="a", temperature=-1), 400, "temperature"),
    (dict(model=MODEL, prompt="a", top_p=0), 400, "top_p"),
    (dict(model=MODEL, prompt="a", logprobs=50), 400, "logprobs"),
    (dict(model=MODEL, prompt="a", stop=["x"] * 5), 400, "stop"),
    (dict(model=MODEL, prompt="a", stop=[""]), 400, "stop"),
    (dict(model=MODEL, prompt="a", presence_penalty=0.5), 400, "presence_penalty"),
    (dict(model=MODEL, prompt=""), 400, "prompt"),
    (dict(model=MODEL, prompt=[]), 400, "prompt"),
    (dict(model=MODEL, prompt=[10 ** 9]), 400, "prompt"),
    (dict(model=MODEL, prompt="a", seed=-1), 400, "seed"),
]


@pytest.mark.parametrize("request_, status, param", BAD, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD)])
def test_bad_requests_are_4xx_in_openai_shape(client, request_, status, param):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**request_)
    assert err.value.status_code == status
    error = err.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def post(url: str, path: str, data: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url.replace("/v1", "") + path, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("path, data, status", [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"[1, 2]", 400),
    ("/v1/completions", b'{"prompt": "a"}', 400),  # no model
    ("/v1/completions", b'{"model": "tiny", "prompt": "a", "max_tokens": "many"}', 400),
    ("/v1/completions", "{\"model\": \"tiny\", \"prompt\": \"\udcff\"}".encode("utf-8", "surrogatepass"), 400),
    ("/v1/chat/completions", b'{"model": "tiny", "messages": []}', 400),
    ("/v1/nowhere", b"{}", 404),
    ("/detokenize", b'{"tokens": [-1]}', 400),
    ("/tokenize", b'{"text": "a"}', 400),
    ("/tokenize", b'{"content": "\\udcff"}', 400),
])
def test_malformed_bodies_are_4xx_in_openai_shape(server, path, data, status):
    code, body = post(server, path, data)
    assert code == status and set(body["error"]) == {"message", "type", "param", "code"}


def test_models_health_tokenize_detokenize(client, server, backend):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert health(server)["status"] == "ok"
    ids = backend.tokenizer.encode(PROMPTS[2]).ids
    assert post(server, "/tokenize", json.dumps({"content": PROMPTS[2]}).encode()) == (200, {"tokens": ids})
    code, pieces = post(server, "/tokenize", json.dumps({"content": PROMPTS[2], "with_pieces": True}).encode())
    assert [p["id"] for p in pieces["tokens"]] == ids
    assert post(server, "/detokenize", json.dumps({"tokens": ids}).encode()) == (200, {"content": PROMPTS[2]})


# --- Every model form --------------------------------------------------------------------

@pytest.fixture(scope="module")
def forms(checkpoint, tmp_path_factory):
    """format name -> (path, load options) of the same model in every form the runtime loads."""
    root = tmp_path_factory.mktemp("forms")
    onnx = export(checkpoint, "onnx", root / "onnx")
    gguf = export(checkpoint, "gguf", root / "q8_0.gguf", type="q8_0")
    quantize_checkpoint(checkpoint, RTNConfig(bits=8, group_size=32), root / "rtn8", progress=False)
    return {"quantized": (root / "rtn8", {}), "onnx": (onnx, {}), "genai": (onnx, {"format": "genai"}),
            "gguf-ggml": (gguf, {"engine": "ggml"}), "gguf-torch": (gguf, {"engine": "torch"})}


@pytest.mark.parametrize("form", ["quantized", "onnx", "genai", "gguf-ggml", "gguf-torch"])
def test_every_model_form_serves(forms, form, monkeypatch):
    if form == "gguf-ggml" and ggml_missing() is not None:
        pytest.skip(f"ggml-python does not load: {ggml_missing()}")
    if form == "genai":
        pytest.importorskip("onnxruntime_genai")
    path, options = forms[form]
    backend = load_backend(path, device="cpu", **options)
    spy = JoinSpy(backend, monkeypatch)
    with ServerThread(backend, MODEL) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        mix = requests_mix()[:4]
        spy.gate.clear()  # all four arrive before the first decode step
        with ThreadPoolExecutor(len(mix)) as pool:
            replies = pool.map(lambda r: client.completions.create(model=MODEL, **r).choices[0].text, mix)
            assert wait_for(lambda: sum(health(url)[k] for k in ("running", "waiting")) == len(mix))
            spy.gate.set()
            texts = list(replies)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, stream=True, **mix[1]))
    assert texts == [expected(backend, r["prompt"], max_new_tokens=r["max_tokens"], temperature=r["temperature"],
                              seed=r["seed"]).text for r in mix]
    assert streamed == texts[1]
    assert backend.batching == (form != "genai")  # genai runs its own generator: one at a time
    assert (spy.widest > 1 and spy.joins > 0) == backend.batching


# --- The command -------------------------------------------------------------------------

def test_cli_serves_until_stopped(checkpoint):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "fanformer.cli", "serve", str(checkpoint), "--port", str(port),
                                "--device", "cpu", "--model-name", MODEL], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        assert wait_for(lambda: process.poll() is None and _up(url), 60), process.stderr.read()
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0).choices[0].text
    finally:
        process.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM, which the CLI reports as any
        # terminated command: "interrupted", exit 130 (fanformer/processes.py)
        assert process.wait(timeout=30) in (0, 130) or process.returncode < 0


def _up(url: str) -> bool:
    try:
        return health(url)["status"] == "ok"
    except OSError:
        return False


def test_cli_errors_are_one_line(cli_fails, tmp_path, checkpoint):
    cli_fails(["serve", tmp_path / "missing"], "does not exist")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cli_fails(["serve", checkpoint, "--device", "cpu", "--port", taken.getsockname()[1]], "cannot listen on",
                  "--port")

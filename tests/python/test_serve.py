"""`nanomoe serve` driven by the real `openai` Python client (and raw HTTP where the client
hides what is tested): outputs equal `nanomoe generate`, alone or batched; streaming; n > 1;
stop strings; logprobs equal to the model's log-softmax; errors; 401; 429; disconnects;
metrics; graceful shutdown. Every server listens on 127.0.0.1 on a free port."""
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import nanomoe_bin, run, rust_forward

openai = pytest.importorskip("openai")

KEY = "sk-test-123"
MOE = {"vocab_size": 50257, "block_size": 128, "n_layer": 3, "n_head": 2, "n_embd": 32,
       "n_exp": 4, "moe_top_k": 2, "stride": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "moe"
    run("new", "--config", json.dumps(MOE), "--out", d, "--seed", "11")
    run("tokenize", "--tokenizer", "gpt2", "--save", d)
    return d


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory):
    """A model large enough (8 x 512, ~50M parameters) that a 120-token stream outlasts the
    few requests a test makes around it, however fast decoding gets."""
    d = tmp_path_factory.mktemp("serve") / "slow"
    run("new", "--config", json.dumps({"vocab_size": 50257, "block_size": 256, "n_layer": 8, "n_head": 8, "n_embd": 512}),
        "--out", d, "--seed", "3")
    run("tokenize", "--tokenizer", "gpt2", "--save", d)
    return d


class Server:
    def __init__(self, model, *args):
        self.p = subprocess.Popen([nanomoe_bin(), "--threads", "2", "serve", str(model), "--port", "0",
                                   "--served-model-name", "tiny-moe", *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if "http://" not in line:
            self.p.kill()
            raise AssertionError(f"server did not start: {line!r} {self.p.stderr.read()}")
        self.url = line.split("http://")[1].split()[0]  # host:port/v1
        self.host, rest = self.url.split(":")
        self.port = int(rest.split("/")[0])

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=f"http://{self.url}", api_key=key, max_retries=0, timeout=60, **kw)

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def raw(self, method, path, body=None, headers=None):
        c = self.conn()
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        out = r.status, r.read().decode()
        c.close()
        return out

    def stop(self, sig=signal.SIGTERM, timeout=60):
        self.p.send_signal(sig)
        rc = self.p.wait(timeout=timeout)
        self.p.stdout.close()
        self.p.stderr.close()
        return rc


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir, "--max-batch", 8, "--max-queue", 32, "--api-key", KEY)
    yield s
    assert s.stop() == 0


def generate(model_dir, prompt, n, *extra):
    v = json.loads(run("generate", model_dir, "--prompt", prompt, "--max-new-tokens", n, "--dropless",
                       "--ignore-eos", "--json", *extra))
    return v["ids"][0], v["text"][0]


PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning there was",
           "def main():", "1, 2, 3,", "Hello", "Rust and candle", "MoE layers route tokens"]


def test_greedy_completions_equal_generate_alone_and_in_a_full_batch(server, model_dir):
    want = {p: generate(model_dir, p, 24, "--greedy")[1] for p in PROMPTS}
    c = server.client()
    alone = c.completions.create(model="tiny-moe", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert alone.choices[0].text == want[PROMPTS[0]]
    assert alone.choices[0].finish_reason == "length"
    assert alone.usage.completion_tokens == 24

    def one(p, stream):
        if stream:
            chunks = list(c.completions.create(model="tiny-moe", prompt=p, max_tokens=24, temperature=0, stream=True))
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(model="tiny-moe", prompt=p, max_tokens=24, temperature=0).choices[0].text

    # 16 concurrent requests over 8 slots: joins and leaves mid-batch.
    with ThreadPoolExecutor(16) as ex:
        jobs = [(p, ex.submit(one, p, i % 2 == 0)) for i, p in enumerate(PROMPTS * 2)]
        for p, f in jobs:
            assert f.result() == want[p], p
    # A list of prompts in one request: one choice each, in order.
    many = c.completions.create(model="tiny-moe", prompt=PROMPTS[:3], max_tokens=24, temperature=0)
    assert [ch.text for ch in sorted(many.choices, key=lambda ch: ch.index)] == [want[p] for p in PROMPTS[:3]]


def test_long_prompts_prefill_in_chunks_like_generate(model_dir):
    s = Server(model_dir, "--prefill-chunk", 7)
    try:
        prompt = "A long prompt that takes several prefill chunks of seven tokens each, " * 2
        _, want = generate(model_dir, prompt, 16, "--greedy", "--prefill-chunk", 7)
        got = s.client().completions.create(model="tiny-moe", prompt=prompt, max_tokens=16, temperature=0)
        assert got.choices[0].text == want
    finally:
        assert s.stop() == 0


def test_sampling_with_a_seed_equals_generate_and_n_choices_differ(server, model_dir):
    _, want = generate(model_dir, "Hello", 20, "--seed", "7", "--temperature", "0.8", "--top-k", "50")
    r = server.client().completions.create(model="tiny-moe", prompt="Hello", max_tokens=20, temperature=0.8,
                                           seed=7, n=3, extra_body={"top_k": 50})
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert texts[0] == want
    assert len(set(texts)) == 3
    assert r.usage.completion_tokens == 60


def test_chat_uses_the_plain_template_and_streams_the_same_text(server, model_dir):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny-moe"]
    tmpl = models[0].model_extra["chat_template"]
    assert tmpl["source"] == "plain"
    _, want = generate(model_dir, "System: Be brief.\n\nUser: Hi there\n\nAssistant:", 20, "--greedy")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    c = server.client()
    r = c.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=20, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    chunks = list(c.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_strings_cut_the_text_streaming_or_not(server):
    c = server.client()
    full = c.completions.create(model="tiny-moe", prompt="The quick brown fox", max_tokens=40, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), full
    cut = full[: full.index(stop)]
    r = c.completions.create(model="tiny-moe", prompt="The quick brown fox", max_tokens=40, temperature=0, stop=[stop, "\x00never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 40
    chunks = list(c.completions.create(model="tiny-moe", prompt="The quick brown fox", max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_streams_send_a_chunk_per_token_while_text_is_held(server):
    """A token whose text is held back (here: it may begin a stop string) still gets its
    chunk, with text "" (as vLLM streams), so a client sees every token as it comes and
    the chunks count the completion's tokens."""
    c = server.client()
    prompt = "The quick brown fox"
    r = c.completions.create(model="tiny-moe", prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    tokens = r.choices[0].logprobs.tokens
    k = next(i for i, t in enumerate(tokens) if t.strip() and "\ufffd" not in t)
    stop = tokens[k] + "\x01"  # what token k's text begins and nothing here completes
    chunks = list(c.completions.create(model="tiny-moe", prompt=prompt, max_tokens=12, temperature=0, stop=[stop], stream=True,
                                       stream_options={"include_usage": True}))
    per_token = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].finish_reason is None]
    assert len(per_token) == chunks[-1].usage.completion_tokens == len(tokens)
    assert "" in per_token
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    # Chat streams likewise: one chunk per token after the role's.
    msgs = [{"role": "user", "content": prompt}]
    chat = list(c.chat.completions.create(model="tiny-moe", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                          stream_options={"include_usage": True}))
    deltas = [ch for ch in chat[1:] if ch.choices and ch.choices[0].finish_reason is None]
    assert len(deltas) == chat[-1].usage.completion_tokens


def test_logprobs_are_the_models_log_softmax(server, model_dir, tmp_path):
    import tokenizers
    import torch

    tok = tokenizers.Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    prompt = "Logprobs of a tiny model"
    ids = tok.encode(prompt).ids
    c = server.client()
    r = c.completions.create(model="tiny-moe", prompt=ids, max_tokens=6, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    n = len(ids) + 6
    assert len(lp.tokens) == n and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.choices[0].text.startswith(prompt)
    # Recover the generated ids from a greedy run, then compare with the model's forward.
    gen = c.completions.create(model="tiny-moe", prompt=ids, max_tokens=6, temperature=0).choices[0].text
    all_ids = ids + tok.encode(gen).ids
    assert tok.decode(all_ids) == prompt + gen
    logits, _ = rust_forward(model_dir, [all_ids[:n]], tmp=tmp_path)
    ref = torch.log_softmax(logits[0].double(), -1)
    for i in range(1, n):
        assert abs(lp.token_logprobs[i] - ref[i - 1, all_ids[i]].item()) < 1e-4, i
        best = max(lp.top_logprobs[i].values())
        assert abs(best - ref[i - 1].max().item()) < 1e-4
        assert len(lp.top_logprobs[i]) <= 3
    # Chat: top_logprobs alternatives per token, the greedy token first.
    r = c.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                  temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6


def test_bad_requests_get_openai_errors(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="other-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["message"] == "the model 'other-model' is not served here; this server serves 'tiny-moe'"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-moe", prompt="x", max_tokens=500)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
    assert e.value.body["message"] == "this model's context is 128 tokens; the prompt has 1 and max_tokens asks for 500 more (501 in all)"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-moe", prompt="x", max_tokens=2, top_p=1.5)
    assert (e.value.body["param"], e.value.body["message"]) == ("top_p", "top_p must be in (0, 1], got 1.5")
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-moe", prompt=[[1, 2], [50257]], max_tokens=2)
    assert e.value.body["message"] == "token id 50257 is out of range for vocab_size 50257"
    # More prompts than the queue can ever hold (--max-queue 32): a 400, not a 429 to retry.
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-moe", prompt=[[1]] * 33, max_tokens=2)
    assert (e.value.body["param"], e.value.body["message"]) == ("prompt", "this request holds 33 prompts; the server queues at most 32 (--max-queue)")
    auth = {"Authorization": f"Bearer {KEY}"}
    status, body = server.raw("POST", "/v1/completions", b'{"prompt": "x", ', auth)
    assert status == 400 and json.loads(body)["error"]["message"].startswith("invalid JSON body: EOF while parsing")
    status, body = server.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2, "frobnicate": 1}, auth)
    assert status == 400 and json.loads(body)["error"]["message"].startswith("invalid JSON body: unknown field `frobnicate`")
    # Bodies over --max-body (1 MiB): refused from Content-Length before the body is read,
    # and, when chunked (no length), once the limit is passed.
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 2097152\r\n\r\n" + b"x" * 1000)
    head, _, body = sock.recv(65536).decode().partition("\r\n\r\n")
    sock.close()
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["message"] == "the request body exceeds the server's limit of 1048576 bytes (--max-body)"
    c = server.conn()
    c.request("POST", "/v1/completions", body=iter([b"x" * ((1 << 20) + 100)]), headers={**auth, "Content-Type": "application/json"}, encode_chunked=True)
    r = c.getresponse()
    assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
    c.close()
    status, body = server.raw("GET", "/v1/nothing", None, auth)
    assert status == 404 and json.loads(body)["error"]["message"] == "no route for GET /v1/nothing"


def test_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="tiny-moe", prompt="x", max_tokens=1)
    status, body = server.raw("GET", "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert server.raw("GET", "/metrics")[0] == 401
    assert server.raw("GET", "/health") == (200, '{"status":"ok"}')


def sse_stream(s, body, key=KEY):
    c = s.conn()
    c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
              headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    return c, c.getresponse()


def read_event(resp):
    while True:
        line = resp.readline().decode()
        if line.startswith("data: "):
            return line[6:].strip()
        if not line:
            return None


def metric(s, name, key=KEY):
    """The value of an unlabelled metric (None when absent)."""
    status, text = s.raw("GET", "/metrics", None, {"Authorization": f"Bearer {key}"})
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    return None


def test_full_queue_gets_429_at_once_and_a_disconnect_frees_the_slot(slow_model_dir):
    s = Server(slow_model_dir, "--max-batch", 1, "--max-queue", 1)
    try:
        # One request holds the only slot, streaming slowly enough to be caught running.
        c1, r1 = sse_stream(s, {"prompt": "Hold the slot", "max_tokens": 120, "temperature": 0})
        assert r1.status == 200
        first = json.loads(read_event(r1))
        assert first["object"] == "text_completion"
        # A second waits in the queue...
        waiting = threading.Thread(target=lambda: s.client().completions.create(model="tiny-moe", prompt="queued", max_tokens=2))
        waiting.start()
        deadline = time.time() + 30
        while metric(s, "nanomoe_queue_depth") != 1 and time.time() < deadline:
            time.sleep(0.02)
        assert metric(s, "nanomoe_queue_depth") == 1 and metric(s, "nanomoe_running_sequences") == 1
        # ...so a third is refused at once.
        t0 = time.time()
        with pytest.raises(openai.RateLimitError) as e:
            s.client().completions.create(model="tiny-moe", prompt="refused", max_tokens=2)
        assert time.time() - t0 < 5
        assert e.value.body["code"] == "queue_full"
        # The client holding the slot goes away mid-stream: the queued request then runs.
        r1.close()
        c1.close()
        waiting.join(timeout=60)
        assert not waiting.is_alive()
        r = s.client().completions.create(model="tiny-moe", prompt="after", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
        # The abandoned stream stopped early: far fewer than its 120 tokens were generated.
        assert metric(s, "nanomoe_generation_tokens_total") < 120
        deadline = time.time() + 10  # the gauge is set after each engine step
        while metric(s, "nanomoe_running_sequences") != 0 and time.time() < deadline:
            time.sleep(0.02)
        assert metric(s, "nanomoe_running_sequences") == 0
    finally:
        assert s.stop() == 0


def test_metrics_count_requests_tokens_latency_and_expert_load(model_dir):
    s = Server(model_dir)
    try:
        c = s.client()
        r = c.completions.create(model="tiny-moe", prompt="metrics of a server", max_tokens=5, temperature=0)
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny-moe", prompt="x", max_tokens=0)
        status, text = s.raw("GET", "/metrics")
        assert status == 200
        assert 'nanomoe_requests_total{endpoint="/v1/completions",status="200"} 1' in text
        assert 'nanomoe_requests_total{endpoint="/v1/completions",status="400"} 1' in text
        assert metric(s, "nanomoe_prompt_tokens_total") == r.usage.prompt_tokens
        assert metric(s, "nanomoe_generation_tokens_total") == 5
        assert metric(s, "nanomoe_time_to_first_token_seconds_count") == 1
        assert metric(s, "nanomoe_inter_token_latency_seconds_count") == 4
        assert metric(s, "nanomoe_batch_size_count") == 4  # the first token comes from the prefill
        # Layer 1 of 3 is the MoE layer (stride 2): 4 experts, top-2, dropless. Every token
        # run through the model is counted twice: the prompt, then each generated token but
        # the last (which nothing reads).
        experts = [l for l in text.splitlines() if l.startswith("nanomoe_expert_tokens_total{")]
        assert len(experts) == 4 and all('layer="1"' in l for l in experts)
        assert sum(float(l.split()[-1]) for l in experts) == 2 * (r.usage.prompt_tokens + 4)
        assert metric(s, "nanomoe_expert_dropped_tokens_total") == 0
    finally:
        assert s.stop() == 0


def test_sigterm_lets_running_streams_finish(model_dir):
    s = Server(model_dir, "--api-key", "k2")
    c, r = sse_stream(s, {"prompt": "Finish me", "max_tokens": 40, "temperature": 0}, key="k2")
    assert json.loads(read_event(r))["choices"][0]["finish_reason"] is None
    s.p.send_signal(signal.SIGTERM)
    events = []
    while (e := read_event(r)) is not None:
        events.append(e)
        if e == "[DONE]":
            break
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    c.close()
    assert s.p.wait(timeout=60) == 0

"""The HTTP server over real loopback sockets: uvicorn in a thread, httpx as the client.

Tags must equal ``Tagger.tag`` called directly; every bad request must get a 4xx with an
``error`` message and leave the worker alive; concurrent requests must be batched; shutdown
must let in-flight requests finish.
"""

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pyxtask.serving import Tagger
from pyxtask.serving.server import create_app
from tests._bundles import make_bundle
from tests._server import running

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_request_sentences": 16, "max_request_bytes": 20_000, "max_words": 64}
UNICODE = "Zoë naïve 日本 🙂 w3 w7"
LONG = " ".join(f"w{i % 40}" if i % 7 else f"zq{i}x" for i in range(40))  # > max_length=16


@pytest.fixture(scope="module")
def token_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("server-token"), "token")[1]


@pytest.fixture(scope="module")
def tagger(token_bundle):
    return Tagger(token_bundle)


@pytest.fixture(scope="module")
def served(tagger):
    with running(create_app(tagger, **LIMITS)) as (url, _), httpx.Client(base_url=url) as http:
        yield http


def stats(http):
    return http.get("/v1/metadata").json()["stats"]


def wait_until_accepted(app, requests, timeout=10.0):
    """Block until the app's batcher has taken ``requests`` requests into its queue."""
    deadline = time.monotonic() + timeout
    while app.state.batcher.stats.requests < requests:
        assert time.monotonic() < deadline, f"{requests} requests not accepted in {timeout} s"
        time.sleep(0.01)


def direct(tagger, inputs):
    # Through JSON, as the server sends it (floats round-trip exactly).
    return json.loads(json.dumps([r.to_dict() for r in tagger.tag(inputs)]))


# -- correct answers ---------------------------------------------------------------------------


def test_tags_equal_the_tagger(served, tagger):
    inputs = [
        "w1 w2 w3 , w4 .",
        ["w5", "zq123x", "w6"],
        LONG,
        LONG.split(),
        UNICODE,
        UNICODE.split(),
        "",
        [],
    ]
    response = served.post("/v1/tag", json={"sentences": inputs})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == tagger.task
    assert body["variant"] == "fp32"
    assert body["results"] == direct(tagger, inputs)
    long_result = body["results"][2]
    assert len(long_result["words"]) == 40
    assert None not in long_result["labels"]
    assert body["results"][4]["words"][:4] == ["Zoë", "naïve", "日本", "🙂"]


def test_text_and_words_forms(served, tagger):
    for payload, inputs in [
        ({"text": UNICODE}, [UNICODE]),
        ({"words": LONG.split()}, [LONG.split()]),
    ]:
        response = served.post("/v1/tag", json=payload)
        assert response.status_code == 200, response.text
        assert response.json()["results"] == direct(tagger, inputs)


def test_unicode_as_raw_utf8_bytes(served, tagger):
    body = json.dumps({"text": UNICODE}, ensure_ascii=False).encode("utf-8")
    response = served.post("/v1/tag", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["results"] == direct(tagger, [UNICODE])


def test_sentence_kind_bundle(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("server-sentence"), "sentence")[1]
    tagger = Tagger(bundle)
    inputs = ["w1 w2 w3", ["w4", "w5"], LONG, UNICODE]
    with running(create_app(tagger)) as (url, _):
        response = httpx.post(f"{url}/v1/tag", json={"sentences": inputs})
        metadata = httpx.get(f"{url}/v1/metadata").json()
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results == direct(tagger, inputs)
    assert all(
        r["label"] in tagger.labels and set(r["probabilities"]) == set(tagger.labels)
        for r in results
    )
    assert metadata["kind"] == "sentence"


def test_healthz_and_metadata(served, tagger):
    assert served.get("/healthz").json() == {"status": "ok"}
    metadata = served.get("/v1/metadata").json()
    assert metadata["labels"] == tagger.labels == ["B-X", "I-X", "O"]
    assert metadata["task"] == "syn.target"
    assert metadata["kind"] == "token"
    assert metadata["variant"] == "fp32"
    assert metadata["limits"]["max_words"] == 64
    assert metadata["limits"]["max_request_bytes"] == 20_000
    assert {"requests", "sentences", "batches", "mean_batch_sentences"} <= set(metadata["stats"])


# -- bad requests ------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
BAD = [
    pytest.param(b'{"sentences": ["a"', 400, "not valid JSON", id="truncated-json"),
    pytest.param(b"\xff\xfe\xfa", 400, "not valid JSON", id="not-utf8"),
    pytest.param(b"", 400, "empty", id="empty-body"),
    pytest.param(b"{}", 400, "exactly one of", id="empty-object"),
    pytest.param({"sentences": []}, 400, "'sentences' is empty", id="no-sentences"),
    pytest.param({"sentences": ["a", "b", 3]}, 422, "sentences[2] must be a string", id="number"),
    pytest.param(
        {"sentences": [["a", ["b"]]]}, 422, "sentences[0][1] must be a string", id="nested"
    ),
    pytest.param({"sentences": [None]}, 422, "sentences[0] must be a string", id="null"),
    pytest.param({"sentences": "a b c"}, 422, "'sentences' must be a list", id="string"),
    pytest.param({"text": ["a"]}, 422, "'text' must be a string", id="text-list"),
    pytest.param({"words": "a b"}, 422, "'words' must be a list", id="words-string"),
    pytest.param(["a", "b"], 422, "must be a JSON object", id="top-level-list"),
    pytest.param(
        {"sentences": ["a"], "lang": "en"}, 400, "unknown field(s) ['lang']", id="unknown"
    ),
    pytest.param({"text": "a", "words": ["a"]}, 400, "exactly one of", id="two-inputs"),
    pytest.param(b'{"text": "a\\ud800b"}', 400, "lone surrogate", id="surrogate"),
    pytest.param(b"[" * 100_000, 413, "limit", id="too-many-bytes"),
    pytest.param({"sentences": ["a"] * 17}, 413, "17 sentences", id="too-many-sentences"),
    pytest.param({"text": " ".join(["w1"] * 65)}, 413, "65 words", id="too-many-words"),
    pytest.param({"text": ",".join(["w1"] * 33)}, 413, "65 words", id="punctuation-words"),
    pytest.param({"text": "w1," * 6_000}, 413, "has at least", id="long-punctuation-run"),
    pytest.param({"sentences": ["a", ["w"] * 65]}, 413, "sentences[1] has 65 words", id="list"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD)
def test_bad_request(served, tagger, payload, status, message):
    if isinstance(payload, bytes):
        response = served.post("/v1/tag", content=payload, headers=JSON)
    else:
        response = served.post("/v1/tag", json=payload)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    # The worker is alive and answers correctly after every bad request.
    ok = served.post("/v1/tag", json={"sentences": ["w1 w2", UNICODE]})
    assert ok.status_code == 200
    assert ok.json()["results"] == direct(tagger, ["w1 w2", UNICODE])


def test_oversized_chunked_body(served):
    def chunks():  # no Content-Length: the limit must be enforced while reading
        yield b'{"sentences": ['
        for _ in range(2_000):
            yield b'"w1 w2 w3 w4 w5 w6 w7",'
        yield b'"w1"]}'

    response = served.post("/v1/tag", content=chunks(), headers=JSON)
    assert response.status_code == 413
    assert "20000 bytes" in response.json()["error"]
    small = served.post("/v1/tag", content=iter([b'{"text": ', b'"w1 w2"}']), headers=JSON)
    assert small.status_code == 200
    assert len(small.json()["results"]) == 1


def test_routing_errors_are_json(served):
    assert "error" in served.get("/v1/nothing").json()
    response = served.get("/v1/tag")
    assert response.status_code == 405
    assert "error" in response.json()


def test_model_error_fails_only_its_request(tagger):
    class Flaky:
        """The real tagger, except that it raises on one magic sentence."""

        def __getattr__(self, name):
            return getattr(tagger, name)

        def tag(self, inputs):
            time.sleep(0.05)  # long enough that concurrent requests share batches
            if "BOOM" in inputs:
                raise RuntimeError("boom")
            return tagger.tag(inputs)

    app = create_app(Flaky(), max_wait_ms=100)
    payloads = [{"sentences": ["w1 w2"]}] * 3 + [{"text": "BOOM"}] + [{"text": "w3"}] * 3
    answers = {}
    with running(app) as (url, _):

        def post(i):
            answers[i] = httpx.post(f"{url}/v1/tag", json=payloads[i], timeout=10)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(payloads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = httpx.post(f"{url}/v1/tag", json={"text": "w4 w5"})
        metadata = httpx.get(f"{url}/v1/metadata").json()
    assert answers[3].status_code == 500
    assert "boom" in answers[3].json()["error"]
    assert all(answers[i].status_code == 200 for i in range(len(payloads)) if i != 3)
    assert after.status_code == 200
    assert metadata["stats"]["model_errors"] == 1


# -- load and shutdown -------------------------------------------------------------------------


def test_concurrent_load_is_batched(served, tagger):
    rng = random.Random(0)
    vocabulary = [f"w{i}" for i in range(40)] + ["zq77x", "Zoë", "日本", ",", "."]
    pool = [" ".join(rng.choices(vocabulary, k=rng.randint(2, 20))) for _ in range(30)]
    expected = dict(zip(pool, direct(tagger, pool), strict=True))
    before = stats(served)
    failures = []

    def client(seed):
        crng = random.Random(seed)
        with httpx.Client(base_url=str(served.base_url), timeout=30) as http:
            for _ in range(25):
                sentences = crng.sample(pool, crng.randint(1, 4))
                response = http.post("/v1/tag", json={"sentences": sentences})
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                results = response.json()["results"]
                if results != [expected[s] for s in sentences]:
                    failures.append(f"wrong results for {sentences}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    after = stats(served)
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 200
    assert batches < requests, (batches, requests)  # requests shared model calls


@pytest.mark.parametrize("max_wait_ms", [0.0, 1000.0])
def test_batch_takes_what_queued_while_the_model_ran(tagger, max_wait_ms):
    """Default (no wait): the first request runs alone at once, the five sent while it ran form
    the next batch. With a wait longer than they take to arrive, all six share one batch."""
    entered = threading.Event()
    release = threading.Event()

    class Gated:
        def __getattr__(self, name):
            return getattr(tagger, name)

        def tag(self, inputs):
            entered.set()
            release.wait(10)
            return tagger.tag(inputs)

    app = create_app(Gated(), max_wait_ms=max_wait_ms)
    answers = []
    with running(app) as (url, _):

        def post(i):
            answers.append(httpx.post(f"{url}/v1/tag", json={"text": f"w{i} w2"}, timeout=15))

        first = threading.Thread(target=post, args=(0,))
        first.start()
        if max_wait_ms == 0:
            assert entered.wait(10), "the first request did not reach the model on its own"
        rest = [threading.Thread(target=post, args=(i,)) for i in range(1, 6)]
        for t in rest:
            t.start()
        wait_until_accepted(app, 6)
        release.set()
        for t in [first, *rest]:
            t.join(timeout=15)
        batches = app.state.batcher.stats.batches
    assert len(answers) == 6
    assert all(a.status_code == 200 for a in answers)
    assert batches == (2 if max_wait_ms == 0 else 1)


def test_load_test_module(served):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from load_test import make_payloads, run_load
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    payloads = make_payloads(["w1 w2 w3", UNICODE, LONG], 2)
    url = str(served.base_url).rstrip("/") + "/v1/tag"
    result = run_load(url, payloads, clients=3, requests_per_client=4)
    assert result["requests"] == 12
    assert result["errors"] == 0
    assert result["sentences"] == 24
    assert result["p50_ms"] <= result["p99_ms"]
    assert result["requests_per_s"] > 0


def test_graceful_shutdown_finishes_in_flight_requests(tagger):
    class Slow:
        def __getattr__(self, name):
            return getattr(tagger, name)

        def tag(self, inputs):
            time.sleep(0.3)
            return tagger.tag(inputs)

    app = create_app(Slow(), max_batch_sentences=2)
    answers = []
    with running(app) as (url, server):

        def post(i):
            answers.append(httpx.post(f"{url}/v1/tag", json={"text": f"w{i} w2"}, timeout=15))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        # Wait until all six are queued or running (at most 2 per 0.3 s model call), then stop.
        wait_until_accepted(app, 6)
        server.should_exit = True
        for t in threads:
            t.join(timeout=15)
    assert len(answers) == 6
    assert all(a.status_code == 200 and len(a.json()["results"]) == 1 for a in answers)
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{url}/v1/tag", json={"text": "w1"}, timeout=2)


def test_serving_imports_no_torch(token_bundle):
    # A serving-only install has no torch or transformers: block them and serve a request.
    code = f"""
import sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
from fastapi.testclient import TestClient
from pyxtask.serving import Tagger
from pyxtask.serving.server import create_app
with TestClient(create_app(Tagger({str(token_bundle)!r}))) as client:
    response = client.post("/v1/tag", json={{"text": "w1 w2"}})
assert response.status_code == 200, response.text
assert not any(m.split(".")[0] in ("torch", "transformers") and sys.modules[m] for m in sys.modules)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

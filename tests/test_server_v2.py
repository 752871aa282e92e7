"""The Open Inference Protocol (KServe V2) endpoints, readiness, metrics, and ``serve()``.

The protocol is checked with a client nobody here wrote, tritonclient's HTTP client, against
uvicorn on loopback: its answers must decode to exactly what ``Tagger.tag`` says, in both the
JSON and the binary tensor encodings.
"""

import json
import logging
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from pyxtask.serving import BundleError, Tagger
from pyxtask.serving.server import create_app, serve
from tests._bundles import make_bundle
from tests._server import running

LIMITS = {"max_request_sentences": 16, "max_request_bytes": 20_000, "max_words": 64}
UNICODE = "Zoë naïve 日本 🙂 w3 w7"
LONG = " ".join(f"w{i % 40}" if i % 7 else f"zq{i}x" for i in range(40))  # > max_length=16
SENTENCES = ["w1 w2 w3 , w4 .", UNICODE, LONG, "", "w5"]
TOKEN_OUTPUTS = ["words", "labels", "scores", "word_counts"]


@pytest.fixture(scope="module")
def token_tagger(tmp_path_factory):
    return Tagger(make_bundle(tmp_path_factory.mktemp("v2-token"), "token")[1])


@pytest.fixture(scope="module")
def sentence_tagger(tmp_path_factory):
    return Tagger(make_bundle(tmp_path_factory.mktemp("v2-sentence"), "sentence")[1])


@pytest.fixture(scope="module")
def url(token_tagger):
    with running(create_app(token_tagger, **LIMITS)) as (base, _):
        yield base


@pytest.fixture
def client(url):
    c = triton.InferenceServerClient(url=url.removeprefix("http://"))
    yield c
    c.close()


def text_input(sentences, binary=True):
    tensor = triton.InferInput("TEXT", [len(sentences)], "BYTES")
    tensor.set_data_from_numpy(
        np.array([s.encode("utf-8") for s in sentences], dtype=object), binary_data=binary
    )
    return tensor


def strings(array):
    # Binary BYTES outputs decode to bytes, JSON ones to str.
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.tolist()]


def expected_token_outputs(tagger, sentences):
    results = tagger.tag(sentences)
    return {
        "words": [w for r in results for w in r.words],
        "labels": [label or "" for r in results for label in r.labels],
        "scores": np.array([s for r in results for s in r.scores], dtype=np.float32),
        "word_counts": [len(r.words) for r in results],
    }


def check_token_result(result, tagger, sentences):
    want = expected_token_outputs(tagger, sentences)
    assert strings(result.as_numpy("words")) == want["words"]
    assert strings(result.as_numpy("labels")) == want["labels"]
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(scores, want["scores"])
    counts = result.as_numpy("word_counts")
    assert counts.dtype == np.int32
    assert counts.tolist() == want["word_counts"]
    # The documented way back to per-sentence lists.
    split = np.split(result.as_numpy("labels"), np.cumsum(counts)[:-1])
    assert [strings(s) for s in split] == [
        [label or "" for label in r.labels] for r in tagger.tag(sentences)
    ]


# -- tritonclient ------------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(client, token_tagger):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("syn.target")
    assert client.is_model_ready("syn.target", model_version="1")
    assert not client.is_model_ready("nope")
    server = client.get_server_metadata()
    assert server["name"] == "pyxtask"
    assert server["version"]
    assert "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("syn.target")
    assert model["name"] == "syn.target"
    assert model["versions"] == ["1"]
    assert model["platform"] == "onnxruntime"
    assert model["inputs"] == [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in model["outputs"]] == [
        ("words", "BYTES", [-1]),
        ("labels", "BYTES", [-1]),
        ("scores", "FP32", [-1]),
        ("word_counts", "INT32", [-1]),
    ]
    assert model["parameters"]["labels"] == token_tagger.labels


def test_infer_binary_matches_the_tagger(client, token_tagger):
    # tritonclient's defaults: binary input, and (no outputs named) binary outputs.
    result = client.infer("syn.target", [text_input(SENTENCES)], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["model_version"] == "1"
    check_token_result(result, token_tagger, SENTENCES)


def test_infer_json_matches_the_tagger(client, token_tagger):
    outputs = [triton.InferRequestedOutput(n, binary_data=False) for n in TOKEN_OUTPUTS]
    result = client.infer(
        "syn.target", [text_input(SENTENCES, binary=False)], outputs=outputs, model_version="1"
    )
    assert all("data" in o for o in result.get_response()["outputs"])
    check_token_result(result, token_tagger, SENTENCES)


def test_infer_returns_only_the_outputs_asked_for(client, token_tagger):
    outputs = [triton.InferRequestedOutput("labels")]
    result = client.infer("syn.target", [text_input(["w1 w2", "w3"])], outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["labels"]
    want = expected_token_outputs(token_tagger, ["w1 w2", "w3"])["labels"]
    assert strings(result.as_numpy("labels")) == want


def test_infer_sentence_task(sentence_tagger):
    sentences = ["w1 w2 w3", LONG, UNICODE]
    with running(create_app(sentence_tagger)) as (base, _):
        c = triton.InferenceServerClient(url=base.removeprefix("http://"))
        try:
            model = c.get_model_metadata("syn.target")
            binary = c.infer("syn.target", [text_input(sentences)])
            outputs = [
                triton.InferRequestedOutput(n, binary_data=False)
                for n in ("labels", "scores", "probabilities")
            ]
            plain = c.infer("syn.target", [text_input(sentences, False)], outputs=outputs)
        finally:
            c.close()
    labels = model["parameters"]["labels"]
    assert labels == sentence_tagger.labels
    want = sentence_tagger.tag(sentences)
    for result in (binary, plain):
        assert strings(result.as_numpy("labels")) == [r.label for r in want]
        np.testing.assert_array_equal(
            result.as_numpy("scores"), np.array([r.score for r in want], dtype=np.float32)
        )
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (len(sentences), len(labels))
        expected = [[r.probabilities[lab] for lab in labels] for r in want]
        np.testing.assert_array_equal(probabilities, np.array(expected, dtype=np.float32))


def test_tritonclient_sees_the_error_message(client):
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as caught:
        client.infer("nope", [text_input(["w1"])])
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException, match="no version '2'"):
        client.infer("syn.target", [text_input(["w1"])], model_version="2")
    too_many = [f"w{i}" for i in range(17)]
    with pytest.raises(InferenceServerException, match="17 sentences") as caught:
        client.infer("syn.target", [text_input(too_many)])
    assert caught.value.status() == "413"


# -- bad requests (raw HTTP) -------------------------------------------------------------------


def body(data=None, **overrides):
    tensor = {"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": data or ["w1 w2"]}
    tensor.update(overrides)
    return {"inputs": [tensor]}


BAD = [
    pytest.param(b'{"inputs": [', 400, "not valid JSON", id="truncated-json"),
    pytest.param(b"", 400, "empty", id="empty-body"),
    pytest.param(b"[1, 2]", 400, "invalid inference request", id="not-an-object"),
    pytest.param({"inputs": []}, 400, "inputs: List should have at least 1", id="no-inputs"),
    pytest.param({"outputs": []}, 400, "inputs: Field required", id="missing-inputs"),
    pytest.param(body(name="X"), 400, "inputs.0.name: Input should be 'TEXT'", id="input-name"),
    pytest.param(
        {"inputs": [body()["inputs"][0]] * 2}, 400, "inputs: List should have at most 1", id="two"
    ),
    pytest.param(body(datatype="FP32"), 400, "datatype: Input should be 'BYTES'", id="datatype"),
    pytest.param(body(shape=[1, 1]), 400, "shape: List should have at most 1", id="2-d"),
    pytest.param(body(shape=[0], data=[]), 400, "shape.0: Input should be greater", id="empty"),
    pytest.param(body(shape=["1"]), 400, "valid integer", id="shape-string"),
    pytest.param(
        {**body(), "outputs": [{"name": "probabilities"}]},
        400,
        "unknown output 'probabilities'",
        id="other-kind-output",
    ),
    pytest.param(body(shape=[2]), 400, "shape [2] but 1 data", id="shape-mismatch"),
    pytest.param(body(data=[3]), 400, "data.0: Input should be a valid string", id="number"),
    pytest.param(
        {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES"}]},
        400,
        "has no data",
        id="no-data",
    ),
    pytest.param(
        {**body(), "outputs": [{"name": "logits"}]}, 400, "outputs.0.name", id="unknown-output"
    ),
    pytest.param(
        {**body(), "outputs": [{"name": "labels"}, {"name": "labels"}]},
        400,
        "requested twice",
        id="output-twice",
    ),
    pytest.param(
        {**body(), "outputs": [{"name": "labels", "parameters": {"classification": 2}}]},
        400,
        "classification extension",
        id="classification",
    ),
    pytest.param(
        {**body(), "parameters": {"binary_data_output": "yes"}},
        400,
        "must be true or false",
        id="binary-flag",
    ),
    pytest.param(body(data=["a\ud800"]), 400, "not valid JSON", id="surrogate"),
    pytest.param(body(shape=[17], data=["w"] * 17), 413, "17 sentences", id="too-many"),
    pytest.param(body(data=[" ".join(["w1"] * 65)]), 413, "TEXT[0] has 65 words", id="words"),
    pytest.param(b"[" * 30_000, 413, "limit", id="too-many-bytes"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD)
def test_bad_infer_request(url, token_tagger, payload, status, message):
    infer = f"{url}/v2/models/syn.target/infer"
    if isinstance(payload, bytes):
        response = httpx.post(infer, content=payload)
    else:
        response = httpx.post(infer, content=json.dumps(payload).encode())
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    ok = httpx.post(infer, json=body(["w1 w2"]))
    assert ok.status_code == 200, ok.text


BINARY_BAD = [
    pytest.param("x", b"", 400, "invalid Inference-Header-Content-Length", id="not-a-number"),
    pytest.param("9999", b"", 400, "the body has", id="past-the-body"),
    pytest.param(None, b"\x05\x00\x00\x00w1", 400, "runs past the data", id="short-element"),
    pytest.param(None, b"\x02\x00", 400, "inside an element's length", id="short-length"),
    pytest.param(None, b"\x01\x00\x00\x00\xff", 400, "not valid UTF-8", id="bad-utf8"),
    pytest.param(None, b"\x01\x00\x00\x00a" * 2, 400, "holds 2", id="too-many-elements"),
]


@pytest.mark.parametrize(("header", "binary", "status", "message"), BINARY_BAD)
def test_bad_binary_request(url, header, binary, status, message):
    tensor = {
        "name": "TEXT",
        "shape": [1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(binary)},
    }
    head = json.dumps({"inputs": [tensor]}).encode()
    headers = {"Inference-Header-Content-Length": header or str(len(head))}
    response = httpx.post(
        f"{url}/v2/models/syn.target/infer", content=head + binary, headers=headers
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/syn.target/versions/2",
        "/v2/models/syn.target/versions/2/ready",
    ],
)
def test_unknown_model_or_version_is_404(url, path):
    response = httpx.get(f"{url}{path}")
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    response = httpx.post(f"{url}/v2/models/nope/infer", json=body())
    assert response.status_code == 404
    assert "unknown model 'nope'" in response.json()["error"]


def test_model_name_option(token_tagger):
    with running(create_app(token_tagger, model_name="pos")) as (base, _):
        assert httpx.get(f"{base}/v2/models/pos").json()["name"] == "pos"
        assert httpx.get(f"{base}/v2/models/syn.target").status_code == 404
        answer = httpx.post(f"{base}/v2/models/pos/infer", json=body())
        assert answer.json()["model_name"] == "pos"
        assert httpx.get(f"{base}/v1/metadata").json()["model_name"] == "pos"


# -- readiness ---------------------------------------------------------------------------------


def test_ready_only_once_the_model_is_loaded(token_tagger):
    release = threading.Event()
    calls = []

    def loader():
        release.wait(20)
        calls.append("loaded")
        return token_tagger

    app = create_app(loader=loader, model_name="syn.target")
    with running(app) as (base, _):
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200
        for path in ("/v2/health/ready", "/v2/models/syn.target/ready", "/v1/metadata"):
            response = httpx.get(f"{base}{path}")
            assert response.status_code == 503, path
            assert response.json() == {"error": "the model is still loading"}
            assert response.headers["retry-after"] == "1"
        tagging = httpx.post(f"{base}/v1/tag", json={"text": "w1"})
        assert tagging.status_code == 503
        assert tagging.headers["retry-after"] == "1"
        assert httpx.post(f"{base}/v2/models/syn.target/infer", json=body()).status_code == 503
        assert httpx.post(f"{base}/v2/models/other/infer", json=body()).status_code == 404
        release.set()
        deadline = time.monotonic() + 20
        while httpx.get(f"{base}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.02)
        assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
        assert httpx.get(f"{base}/v2/models/syn.target/ready").json() == {
            "name": "syn.target",
            "ready": True,
        }
        assert httpx.post(f"{base}/v1/tag", json={"text": "w1"}).status_code == 200
    assert calls == ["loaded"]


def test_a_model_that_fails_to_load(caplog):
    def loader():
        raise BundleError("bundle file '/x/model.onnx' does not match its checksum")

    with caplog.at_level(logging.INFO), running(create_app(loader=loader)) as (base, _):
        deadline = time.monotonic() + 10
        while "failed" not in httpx.get(f"{base}/v2/health/ready").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        response = httpx.post(f"{base}/v1/tag", json={"text": "w1"})
        models = httpx.get(f"{base}/v2/models/whatever")
    assert response.status_code == 503
    assert "the model failed to load: bundle file" in response.json()["error"]
    assert models.status_code == 503
    failures = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failures) == 1
    assert not failures[0].exc_info  # an operator's mistake: one line, no traceback


def test_create_app_takes_a_tagger_or_a_loader(token_tagger):
    with pytest.raises(ValueError, match="exactly one"):
        create_app()
    with pytest.raises(ValueError, match="exactly one"):
        create_app(token_tagger, loader=lambda: token_tagger)
    with pytest.raises(ValueError, match="max_queue_sentences"):
        create_app(token_tagger, max_request_sentences=100, max_queue_sentences=50)
    with pytest.raises(ValueError, match="request_timeout_s"):
        create_app(token_tagger, request_timeout_s=0)


def test_serve_checks_the_bundle_before_binding(token_tagger, tmp_path):
    with pytest.raises(BundleError, match="not a pyxtask bundle"):
        serve(tmp_path, port=1)
    root = tmp_path / "b"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(token_tagger.manifest))
    with pytest.raises(BundleError, match="no 'int8' model"):
        serve(root, variant="int8", port=1)


# -- metrics -----------------------------------------------------------------------------------


def samples(text):
    """{(name, sorted labels): value} of every sample in a Prometheus text exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests(token_tagger):
    app = create_app(token_tagger, **LIMITS)
    other = create_app(token_tagger)  # a second app in the process: its own registry
    with running(app) as (base, _):
        before = samples(httpx.get(f"{base}/metrics").text)
        for _ in range(3):
            assert httpx.post(f"{base}/v1/tag", json={"sentences": ["w1", "w2 w3"]}).is_success
        assert httpx.post(f"{base}/v1/tag", json={"text": 3}).status_code == 422
        assert httpx.post(f"{base}/v2/models/syn.target/infer", json=body()).is_success
        assert httpx.get(f"{base}/no/such/path").status_code == 404
        response = httpx.get(f"{base}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("pyxtask_http_requests_total", route="/v1/tag", status="200") == 3
    assert moved("pyxtask_http_requests_total", route="/v1/tag", status="422") == 1
    infer = "/v2/models/{name}/infer"
    assert moved("pyxtask_http_requests_total", route=infer, status="200") == 1
    assert moved("pyxtask_http_requests_total", route="unmatched", status="404") == 1
    assert moved("pyxtask_http_request_duration_seconds_count", route="/v1/tag") == 4
    assert moved("pyxtask_batch_sentences_count") == 4  # one model call per request here
    assert moved("pyxtask_batch_sentences_sum") == 3 * 2 + 1
    assert moved("pyxtask_batch_duration_seconds_count") == 4
    assert after[("pyxtask_queue_sentences", ())] == 0
    assert after[("pyxtask_model_ready", ())] == 1
    for reason in ("queue_full", "deadline", "body_timeout", "not_ready"):
        assert after[("pyxtask_refusals_total", (("reason", reason),))] == 0
    assert "pyxtask_http_requests_total{" not in in_process_metrics(other)


def in_process_metrics(app):
    with TestClient(app) as c:
        return c.get("/metrics").text

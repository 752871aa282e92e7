"""Schemathesis against the server's own OpenAPI schema: no request it generates, valid or
not, may get a 5xx, and every answer must match the schema declared for its status code.

The app runs in process (schemathesis's ASGI transport runs its lifespan), over the real
batcher and a tiny real model. Each operation is fuzzed with valid and invalid data (and with
the real model's name in its path, where it takes one), with few enough examples that the
whole file runs well under a minute.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from pyxtask.serving import Tagger
from pyxtask.serving.server import create_app
from tests._bundles import make_bundle

LIMITS = {"max_request_sentences": 16, "max_request_bytes": 20_000, "max_words": 64}
EXAMPLES = 12


def _never():
    raise AssertionError("only the schema of this app is read")


def _operations():
    # The schema does not depend on the model: an app that never loads one describes it.
    schema = schemathesis.openapi.from_dict(create_app(loader=_never).openapi())
    return [(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())]


OPERATIONS = _operations()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tagger = Tagger(make_bundle(tmp_path_factory.mktemp("fuzz"), "token")[1])
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(tagger, **LIMITS))


REAL = {"name": "syn.target", "version": "1"}
MODES = [
    pytest.param(mode, real, id=f"{mode.value}{'-real-model' if real else ''}")
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    for real in (False, True)
]


def _strategy(operation, mode, real):
    """Cases for ``operation``; ``real``: with this server's model in the path (otherwise a
    generated name, which is nearly always 404)."""
    fixed = {k: v for k, v in REAL.items() if "{" + k + "}" in operation.path} if real else {}
    if real and not fixed:
        pytest.skip("no model name in this path")
    if mode == GenerationMode.NEGATIVE and not operation.body:
        pytest.skip("nothing in this request can be invalid (a path parameter is any string)")
    return operation.as_strategy(generation_mode=mode, path_parameters=fixed or None)


# Hypothesis is driven here rather than through schemathesis's pytest plugin
# (schemathesis.pytest.from_fixture), which fails under pytest 9 ("'Function' object has no
# attribute '_nodeid'"), and so that each operation and mode is a test of its own.
@pytest.mark.parametrize(("mode", "real"), MODES)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors_and_answers_match_the_schema(api, method, path, mode, real):
    operation = api[path][method]

    @given(case=_strategy(operation, mode, real))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    check()

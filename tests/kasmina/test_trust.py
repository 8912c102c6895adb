"""Urza as a trust boundary, at the load path: whatever a row holds, Kasmina never raises, never
runs data as code, never serves a wrong result, and says why it went eager with a WARNING.

Each way a hostile or damaged row can mislead Kasmina has a test here; ``test_any_mutated_row_is_served_safely``
mutates every column of a real certified row with hypothesis. The session fixture ``compiled_urza`` holds ``tiny_mlp``
compiled and certified; every test works on a private copy.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.artifacts import signing
from esper.artifacts.signing import Signer
from esper.kasmina import COMPILED, EAGER, Kasmina
from esper.urza import Urza
from esper.urza.maintenance import sign_all
from tests.support import CATALOG, TINY, TRAINING, blueprint_module

pytestmark = pytest.mark.compiles


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> signing.KeyPair:
    return signing.generate_keypair(tmp_path_factory.mktemp("keys") / "ci")


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "esper.kasmina" and r.levelno == logging.WARNING]


def sign(path: Path, keys: signing.KeyPair) -> None:
    with Urza(path, signer=Signer.from_file(keys.private)) as urza:
        sign_all(urza)


def row(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM entries ORDER BY id DESC LIMIT 1").fetchone())
    finally:
        conn.close()


def insert(path: Path, values: dict[str, Any]) -> None:
    values = {k: v for k, v in values.items() if k != "id"}
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            f"INSERT INTO entries ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
            list(values.values()),
        )
    conn.close()


def update(path: Path, column: str, value: Any) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(f"UPDATE entries SET {column} = ?", [value])  # column names come from this file only
    conn.close()


def served_safely(kernel: torch.nn.Module, caplog: pytest.LogCaptureFixture, blueprints: Path = TINY) -> None:
    """The kernel's answer is the blueprint's own (its module built from the declaration in ``blueprints``,
    not Kasmina's eager module), and an eager kernel said why with a WARNING."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(kernel(x), blueprint_module("tiny_mlp", blueprints)(x), atol=1e-5, rtol=1e-5)
    if kernel.route == EAGER:
        assert warnings_of(caplog), "went eager without a WARNING"


# -- an unsigned row's guard JSON never reaches exec ----------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_code_in_an_unsigned_eager_rows_guards_never_runs(
    urza_copy: Path, keys: signing.KeyPair, tmp_path: Path, caplog: pytest.LogCaptureFixture, signed: bool
) -> None:
    marker = tmp_path / "pwned"
    if signed:
        sign(urza_copy, keys)
    hostile = row(urza_copy)
    guards = json.loads(hostile["guards"])
    guards["inputs"][0]["dims"][1] = {"size": f"__import__('os').system('touch {marker}') + 8"}
    hostile.update(kind="eager", status="certified", signature=None, guards=json.dumps(guards))
    insert(urza_copy, hostile)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=keys.public if signed else None).load("tiny_mlp")
    served_safely(kernel, caplog)
    assert not marker.exists()
    # The hostile row is refused on its own; the certified compiled row beside it still serves.
    assert kernel.route == COMPILED
    (message,) = warnings_of(caplog)
    assert "(format)" in message and "guards" in message


def test_an_unsigned_well_formed_eager_row_is_never_used_when_a_key_is_set(
    urza_copy: Path, keys: signing.KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    sign(urza_copy, keys)
    newer = row(urza_copy)
    newer.update(kind="eager", status="certified", signature=None, variant="eager")
    insert(urza_copy, newer)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY], public_key=keys.public).load("tiny_mlp")
    served_safely(kernel, caplog)
    assert kernel.route == COMPILED  # the newer, unsigned eager route did not take over
    (message,) = warnings_of(caplog)
    assert "(signature)" in message and "not signed" in message


# -- bad values in any column give eager and a WARNING, never an exception ------------------


def _meta(change: dict[str, Any]) -> Any:
    def apply(values: dict[str, Any]) -> None:
        meta = json.loads(values["meta"])
        meta.update(change)
        values["meta"] = json.dumps(meta)

    return apply


def _set(column: str, value: Any) -> Any:
    def apply(values: dict[str, Any]) -> None:
        values[column] = value

    return apply


def _guard_dim(values: dict[str, Any]) -> None:
    guards = json.loads(values["guards"])
    guards["inputs"][0]["dims"][0] = {"bogus": 1}
    values["guards"] = json.dumps(guards)


BAD_VALUES = {
    "representative -1": _meta({"representative": [{"batch": -1}]}),
    "representative {}": _meta({"representative": [{}]}),
    "profiles 5": _meta({"profiles": 5}),
    "profiles nope": _meta({"profiles": ["nope"]}),
    "meta a list": _set("meta", "[1, 2]"),
    "meta not JSON": _set("meta", "{not json"),
    "status bogus": _set("status", "bogus"),
    "guard dim bogus": _guard_dim,
}


@pytest.mark.parametrize("damage", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_give_eager_and_a_warning(urza_copy: Path, caplog: pytest.LogCaptureFixture, damage: Any) -> None:
    values = row(urza_copy)
    damage(values)
    conn = sqlite3.connect(urza_copy)
    with conn:
        conn.execute("DELETE FROM entries")
    conn.close()
    insert(urza_copy, values)
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    served_safely(kernel, caplog)
    assert kernel.route == EAGER
    (message,) = warnings_of(caplog)
    assert "(format)" in message, message
    assert "certification measured eager" not in kernel.reason  # never a silent, wrong reason


def test_a_garbage_page_gives_eager_and_a_warning(urza_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    size = urza_copy.stat().st_size
    with open(urza_copy, "r+b") as f:  # keep the header (page 1), wreck what follows
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    kernel = Kasmina(urza_copy, blueprint_paths=[TINY]).load("tiny_mlp")
    served_safely(kernel, caplog)
    assert kernel.route == EAGER
    assert any("(urza-unavailable)" in m or "(format)" in m for m in warnings_of(caplog))


# -- an empty key is never "verification off" -----------------------------------------------------


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_an_empty_public_key_refuses_everything(
    urza_copy: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "environment":
        monkeypatch.setenv(signing.PUBLIC_KEY_ENV, "")
        kasmina = Kasmina(urza_copy, blueprint_paths=[TINY])
    else:
        kasmina = Kasmina(urza_copy, blueprint_paths=[TINY], public_key="")
    kernel = kasmina.load("tiny_mlp")
    served_safely(kernel, caplog)
    assert kernel.route == EAGER
    (message,) = warnings_of(caplog)
    assert "(signature)" in message and "public key unusable" in message


# -- tensors the compiled code cannot serve run eager, with the eager answer ---------------------


@pytest.fixture
def kernel(compiled_urza: Path) -> Iterator[Any]:
    k = Kasmina(compiled_urza, blueprint_paths=[TINY]).load("tiny_mlp")
    assert k.route == COMPILED
    yield k


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.layout != torch.strided else t


def _same_as_eager(kernel: Any, make: Any) -> None:
    """``make(module)`` gives the same on the kernel as on the blueprint's own module (or the same kind of
    error)."""
    eager = blueprint_module("tiny_mlp")
    try:
        want = make(eager)
    except Exception as e:  # eager refuses it too: the kernel must raise the same kind of error
        with pytest.raises(type(e)):
            make(kernel)
        return
    got = make(kernel)
    pairs = zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True)
    for g, w in pairs:
        torch.testing.assert_close(_dense(g), _dense(w), atol=1e-5, rtol=1e-5)


X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
T = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


# forward_ad scripts a helper with torch.jit on first use, which warns about its own deprecation.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_dual_tensor_keeps_its_tangent(kernel: Any) -> None:
    import torch.autograd.forward_ad as fwAD

    def run(m: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), fwAD.dual_level():
            out = fwAD.unpack_dual(m(fwAD.make_dual(X, T)))
            assert out.tangent is not None, "the tangent was lost"
            return out.primal.clone(), out.tangent.clone()

    _same_as_eager(kernel, run)
    assert kernel.last_path == EAGER


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: torch.func.vmap(m)(torch.stack([X, T])), id="vmap"),
        pytest.param(lambda m: torch.func.jvp(m, (X,), (T,)), id="jvp"),
        pytest.param(lambda m: m(X.to_mkldnn()), id="mkldnn"),
        pytest.param(lambda m: m(X.to_sparse_csr()), id="sparse-csr"),
        pytest.param(lambda m: m(torch._neg_view(X)), id="negative-bit"),
        pytest.param(lambda m: m(torch.complex(X, T).conj().imag), id="conj-imag-view"),
    ],
)
def test_tensors_the_guard_refuses_run_eager_with_the_eager_answer(kernel: Any, make: Any) -> None:
    with torch.no_grad():
        _same_as_eager(kernel, make)


def test_keyword_arguments_are_accepted_by_input_name(kernel: Any, caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(kernel(x=x), blueprint_module("tiny_mlp")(x=x), atol=1e-5, rtol=1e-5)
        assert kernel.last_path == COMPILED
        with pytest.raises(TypeError):  # what the eager module says about a wrong name
            kernel(y=x)
    assert kernel.last_path == EAGER


# -- a blueprint edited without a version bump is served eager, never mixed -----------------------


def test_edited_source_without_a_version_bump_is_stale(urza_copy: Path, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "bps"
    folder.mkdir()
    shutil.copy(TINY / "tiny_mlp.py", folder / "tiny_mlp.py")
    same = Kasmina(urza_copy, blueprint_paths=[folder]).load("tiny_mlp")
    assert same.route == COMPILED and warnings_of(caplog) == []  # an unchanged copy is the same source
    source = (folder / "tiny_mlp.py").read_text()
    (folder / "tiny_mlp.py").write_text(source.replace("x + torch.relu(self.fc(x))", "x - torch.relu(self.fc(x))"))
    kernel = Kasmina(urza_copy, blueprint_paths=[folder]).load("tiny_mlp")
    served_safely(kernel, caplog, folder)  # the new code, eagerly, everywhere
    assert kernel.route == EAGER
    (message,) = warnings_of(caplog)
    assert "(stale)" in message and "bump its version" in message


# -- the property: any mutation of any column is served safely -----------------------------------------------

COLUMNS = [
    "blueprint_version", "profile", "variant", "artifact", "content_hash", "torch_version", "platform", "isa",
    "device_type", "kind", "status", "checksum", "artifact_size", "guards", "parity", "performance", "meta",
    "failure_reason", "failed_check", "signature",
]  # fmt: skip
JUNK = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["[]", "{}", "[1,2]", '{"inputs": 5}', "null", "certified", "eager", "aoti", "training", "x" * 64]),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3).map(json.dumps),
)


def _json_mutations(original: dict[str, Any]) -> st.SearchStrategy[tuple[str, Any]]:
    """A JSON column with one value inside replaced: closer to a plausible tampering than raw junk."""

    def mutate(column: str, path_seed: int, value: Any) -> tuple[str, Any]:
        data = json.loads(original[column])
        node, keys = data, []
        rng = path_seed
        while isinstance(node, dict | list) and node:
            key = sorted(node)[rng % len(node)] if isinstance(node, dict) else rng % len(node)
            keys.append(key)
            rng //= 7
            if not isinstance(node[key], dict | list) or rng == 0:
                break
            node = node[key]
        if not keys:
            return column, json.dumps(value)
        target = data
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return column, json.dumps(data)

    scalars = st.one_of(st.none(), st.integers(-5, 1 << 40), st.text(max_size=12), st.booleans(), st.just([]))
    return st.builds(mutate, st.sampled_from(["guards", "meta"]), st.integers(0, 10_000), scalars)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_any_mutated_row_is_served_safely(
    compiled_urza: Path, tmp_path_factory: pytest.TempPathFactory, keys: signing.KeyPair, signed: bool
) -> None:
    dest = tmp_path_factory.mktemp("mutated") / "urza"
    shutil.copytree(compiled_urza.parent, dest, ignore=shutil.ignore_patterns("inductor-cache"))
    path = dest / "urza.db"
    if signed:
        sign(path, keys)
    original = row(path)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = blueprint_module("tiny_mlp")(x)

    @given(st.one_of(st.tuples(st.sampled_from(COLUMNS), JUNK), _json_mutations(original)))
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def case(mutation: tuple[str, Any]) -> None:
        column, value = mutation
        try:
            update(path, column, value)
        except sqlite3.IntegrityError:
            return  # the schema itself refuses it (NOT NULL): nothing reaches Kasmina
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        log = logging.getLogger("esper.kasmina")
        log.addHandler(handler)
        try:
            kernel = Kasmina(path, blueprint_paths=[TINY], public_key=keys.public if signed else None).load("tiny_mlp")
            with torch.no_grad():
                got = kernel(x)
        finally:
            log.removeHandler(handler)
            update(path, column, original[column])
        if not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"{column}={value!r}: wrong output")
        if kernel.route == EAGER and not any(r.levelno == logging.WARNING for r in records):
            raise AssertionError(f"{column}={value!r}: eager without a WARNING ({kernel.reason})")

    case()


def test_an_unsigned_eager_training_row_never_switches_training_to_eager(
    training_urza: Path, tmp_path: Path, keys: signing.KeyPair, caplog: pytest.LogCaptureFixture
) -> None:
    """For training: with a key set, an unsigned ``certified`` eager training row is refused like any
    other row (it used to switch training to eager with only an INFO line); the signed artifact still trains."""
    dest = tmp_path / "urza"
    shutil.copytree(training_urza.parent, dest, ignore=shutil.ignore_patterns("inductor-cache"))
    path = dest / "urza.db"
    sign(path, keys)
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    trained = dict(
        conn.execute("SELECT * FROM entries WHERE blueprint = 'tiny_bn' AND artifact = 'training'").fetchone()
    )
    conn.close()
    trained.update(kind="eager", status="certified", signature=None, variant="eager")
    insert(path, trained)
    kasmina = Kasmina(path, blueprint_paths=[TRAINING, CATALOG], public_key=keys.public)
    kernel = kasmina.load_training("tiny_bn")
    assert kernel.route == COMPILED, kernel.reason
    (message,) = warnings_of(caplog)
    assert "(signature)" in message and "not signed" in message

"""Pins the private AOTInductor C++ loader behaviour that esper.artifacts.runtime relies on."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import pytest
import torch

from esper.artifacts.runtime import CompiledPackage, PackageLoadError
from esper.urza import Urza

pytestmark = pytest.mark.compiles


def test_loader_exists_with_the_methods_we_call() -> None:
    loader = torch._C._aoti.AOTIModelPackageLoader
    for method in ("run", "get_call_spec", "get_metadata", "get_constant_fqns", "load_constants"):
        assert hasattr(loader, method), method
    # (path: str, model_name: str, run_single_threaded: bool, num_runners: int, device_index: int)
    doc = inspect.getdoc(loader.__init__) or ""
    assert "arg0: str, arg1: str, arg2: bool, arg3:" in doc and "arg4:" in doc


def _package(compiled_urza: Path) -> Path:
    with Urza(compiled_urza, readonly=True) as urza:
        (entry,) = urza.entries("tiny_mlp")
        return urza.store.verify(entry.checksum, entry.artifact_size)


def test_package_runs_reports_isa_and_swaps_constants(compiled_urza: Path) -> None:
    package = CompiledPackage(_package(compiled_urza))
    meta = package.metadata()
    assert meta["AOTI_DEVICE_KEY"] == "cpu" and "AOTI_CPU_ISA" in meta
    x = torch.randn(3, 8)
    y = package([x])
    assert isinstance(y, torch.Tensor) and y.shape == (3, 8)
    names = package.constant_names()
    assert "fc.weight" in names
    package.load_constants({n: torch.zeros_like(dict(_state()).get(n)) for n in names})
    # With fc zeroed, the module reduces to x + relu(bias or 0): check the weight was really replaced.
    bias = _state()["fc.bias"] if "fc.bias" not in names else torch.zeros(8)
    torch.testing.assert_close(package([x]), x + torch.relu(bias).expand(3, 8))


def test_package_does_not_check_input_shapes_by_itself(compiled_urza: Path) -> None:
    """Why Kasmina's guard check exists: a batch outside the exported range [1, 32] runs, unchecked."""
    package = CompiledPackage(_package(compiled_urza))
    assert package([torch.randn(100, 8)]).shape == (100, 8)


def test_garbage_package_raises_a_catchable_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(PackageLoadError):
        CompiledPackage(bad)


def _state() -> dict[str, torch.Tensor]:
    from esper.catalog import load_catalog
    from tests.support import TINY

    return load_catalog([TINY]).get("tiny_mlp").build().state_dict()


def test_copies_share_the_loaded_package_and_pickling_refuses(compiled_urza: Path) -> None:
    import copy
    import pickle

    package = CompiledPackage(_package(compiled_urza))
    assert copy.deepcopy(package) is package and copy.copy(package) is package
    holder = copy.deepcopy({"kernel": [package]})
    assert holder["kernel"][0] is package
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(package)


def test_loader_loads_an_extracted_folder_and_leaves_it_in_place(compiled_urza: Path, tmp_path: Path) -> None:
    """CompiledPackage extracts packages itself (esper.artifacts.extraction): the loader must accept the folder
    (only the package's ``<model>/data/`` files), run from it, and never remove it."""
    import gc
    import zipfile

    folder = tmp_path / "extracted"
    with zipfile.ZipFile(_package(compiled_urza)) as z:
        z.extractall(folder, [n for n in z.namelist() if n.split("/")[1:2] == ["data"]])
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    loader = torch._C._aoti.AOTIModelPackageLoader(str(folder), "model", False, 1, -1)
    assert loader.get_metadata()["AOTI_DEVICE_KEY"] == "cpu"
    x = torch.randn(3, 8)
    torch.testing.assert_close(loader.run([x])[0], x + torch.relu(torch.nn.functional.linear(x, **_weights())))
    del loader
    gc.collect()
    assert sorted(p for p in folder.rglob("*") if p.is_file()) == files


def _weights() -> dict[str, torch.Tensor]:
    state = _state()
    return {"weight": state["fc.weight"], "bias": state["fc.bias"]}


def test_runner_serves_threads_at_once_and_fixes_the_constants(compiled_urza: Path) -> None:
    """The lock-free runner: calls from several threads at once each get their own input's answer (the
    container's pool serializes them), and once it is handed out the package's constants cannot be replaced
    under it; a reloaded copy's can."""
    package = CompiledPackage(_package(compiled_urza))
    inputs = [torch.randn(1 + i % 4, 8) for i in range(16)]
    want = [package([x]) for x in inputs]
    box = package.boxed_runner

    def run(args: list[torch.Tensor]) -> torch.Tensor:
        return box(args)[0]

    got: dict[int, list[torch.Tensor]] = {}

    def worker(k: int) -> None:
        got[k] = [run([x]) for x in inputs for _ in range(5)][::5]

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for answers in got.values():
        for w, g in zip(want, answers, strict=True):
            torch.testing.assert_close(g, w)
    names = package.constant_names()
    zeros = {n: torch.zeros_like(dict(_state()).get(n)) for n in names}
    with pytest.raises(RuntimeError, match="lock-free runner"):
        package.load_constants(zeros)
    torch.testing.assert_close(run([inputs[0]]), want[0])
    copy = package.reload()
    copy.load_constants(zeros)
    assert not torch.equal(copy([inputs[0]]), want[0])

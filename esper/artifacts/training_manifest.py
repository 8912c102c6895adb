"""The training artifact: a forward package, a backward package and the manifest that wires them, in one zip.

Tezzeret writes it (stored, uncompressed: the packages are zips already) as the single content-addressed
artifact of an Urza entry whose ``artifact`` column is ``"training"``; Kasmina verifies the zip's checksum
before it opens it (:func:`open_artifact`) and loads the two packages from their members.

The manifest says, for each graph input and output, what it is (plain JSON, versioned):

- ``forward_inputs``: ``["param", fqn]``, ``["buffer", fqn]`` or ``["input", k]``;
- ``forward_outputs``: ``["mutation", fqn]`` (a buffer's new value, e.g. BatchNorm's running mean),
  ``["output", k]`` (the k-th flattened output) or ``["saved"]`` (an activation the backward needs);
- ``backward_inputs``: ``["sizes"]`` (a zero-size tensor whose dims carry the dynamic sizes, read from
  ``sizes``: input k, dim d), ``["forward_input", i]``, ``["forward_output", j]`` or ``["tangent", k]``;
- ``backward_outputs``: ``["param", fqn]`` or ``["input", k]``, the gradients.

``params`` and ``buffers`` list every tensor the forward may read, by name, shape and dtype; each buffer
says whether it is ``persistent`` (format 2). A non-persistent buffer (a rotary embedding's ``inv_freq``, a
causal mask, position ids) is part of the module as the blueprint builds it, not of a seed's weights: a
seed's state dict does not hold it, and the runtime feeds it from the seed's module like any buffer.
Format 1 manifests, from before the flag, hold persistent buffers only.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.artifacts.guards import SchemaVersionError
from esper.artifacts.runtime import CompiledPackage
from esper.artifacts.tensors import TensorSpec

FORMAT = "esper-training/2"
FORMAT_VERSION = 2
# The first format whose buffer rows carry ``persistent``.
PERSISTENT_FLAG_VERSION = 2
FORWARD, BACKWARD, MANIFEST = "forward.pt2", "backward.pt2", "manifest.json"
MEMBERS = (FORWARD, BACKWARD, MANIFEST)

Slot = tuple[Any, ...]


class ArtifactFormatError(ValueError):
    """The zip is not a training artifact this Esper can read (the message says what is wrong)."""


@dataclass(frozen=True)
class TrainingManifest:
    """How the forward and backward packages are called; see the module docstring for the slots."""

    blueprint: str
    params: tuple[TensorSpec, ...]
    trainable: tuple[str, ...]
    buffers: tuple[TensorSpec, ...]
    forward_inputs: tuple[Slot, ...]
    forward_outputs: tuple[Slot, ...]
    backward_inputs: tuple[Slot, ...]
    backward_outputs: tuple[Slot, ...]
    sizes: tuple[tuple[int, int], ...]
    n_inputs: int
    n_outputs: int
    differentiable: tuple[int, ...]
    out_spec: str
    # The buffers (of ``buffers``) that are not persistent: not in a seed's state dict, as built.
    nonpersistent: tuple[str, ...] = ()
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        names = {s.name for s in self.buffers}
        stray = [n for n in self.nonpersistent if n not in names]
        if stray:
            raise ArtifactFormatError(f"non-persistent buffers {stray} are not buffers of the manifest")
        if self.nonpersistent and self.version < PERSISTENT_FLAG_VERSION:
            raise ArtifactFormatError(f"a version {self.version} manifest cannot hold non-persistent buffers")

    def weights(self) -> dict[str, TensorSpec]:
        """The weight schema a seed's state dict must match: every parameter and persistent buffer."""
        return {s.name: s for s in (*self.params, *self.buffers) if s.name not in self.nonpersistent}

    def mutated(self) -> list[str]:
        """The buffers the forward updates, in forward output order."""
        return [s[1] for s in self.forward_outputs if s[0] == "mutation"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": f"esper-training/{self.version}",
            "version": self.version,
            "blueprint": self.blueprint,
            "params": [{"name": s.name, **s.to_dict()} for s in self.params],
            "trainable": list(self.trainable),
            "buffers": [self._buffer_row(s) for s in self.buffers],
            "forward_inputs": [list(s) for s in self.forward_inputs],
            "forward_outputs": [list(s) for s in self.forward_outputs],
            "backward_inputs": [list(s) for s in self.backward_inputs],
            "backward_outputs": [list(s) for s in self.backward_outputs],
            "sizes": [list(s) for s in self.sizes],
            "n_inputs": self.n_inputs,
            "n_outputs": self.n_outputs,
            "differentiable": list(self.differentiable),
            "out_spec": self.out_spec,
        }

    def _buffer_row(self, spec: TensorSpec) -> dict[str, Any]:
        row = {"name": spec.name, **spec.to_dict()}
        if self.version >= PERSISTENT_FLAG_VERSION:
            row["persistent"] = spec.name not in self.nonpersistent
        return row

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingManifest:
        if not str(data.get("format", "")).startswith("esper-training/"):
            raise ArtifactFormatError(f"not a training manifest (format {data.get('format')!r})")
        version = int(data["version"])
        if version > FORMAT_VERSION:
            raise SchemaVersionError(f"training manifest version {version} is newer than this Esper's {FORMAT_VERSION}")
        if version < 1:
            raise ArtifactFormatError(f"training manifest version {version} does not exist")

        def specs(rows: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec.from_dict(r["name"], r) for r in rows)

        def slots(rows: list[list[Any]]) -> tuple[Slot, ...]:
            return tuple(tuple(r) for r in rows)

        return cls(
            blueprint=data["blueprint"],
            params=specs(data["params"]),
            trainable=tuple(data["trainable"]),
            buffers=specs(data["buffers"]),
            nonpersistent=nonpersistent(data["buffers"], version),
            forward_inputs=slots(data["forward_inputs"]),
            forward_outputs=slots(data["forward_outputs"]),
            backward_inputs=slots(data["backward_inputs"]),
            backward_outputs=slots(data["backward_outputs"]),
            sizes=tuple((int(k), int(d)) for k, d in data["sizes"]),
            n_inputs=int(data["n_inputs"]),
            n_outputs=int(data["n_outputs"]),
            differentiable=tuple(int(k) for k in data["differentiable"]),
            out_spec=data["out_spec"],
            version=version,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainingManifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArtifactFormatError(f"manifest is not JSON: {e}") from e
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArtifactFormatError | SchemaVersionError):
                raise
            raise ArtifactFormatError(f"manifest is malformed: {type(e).__name__}: {e}") from e


def nonpersistent(rows: list[dict[str, Any]], version: int) -> tuple[str, ...]:
    """The names of the non-persistent buffers among a manifest's buffer rows: none before
    :data:`PERSISTENT_FLAG_VERSION`, whose rows have no flag; from it on, each row's ``persistent`` must be
    a JSON boolean (Urza's content is not trusted: ``"false"`` or ``0`` is refused, not read as true)."""
    out = []
    for row in rows:
        name = row["name"]
        if version < PERSISTENT_FLAG_VERSION:
            if "persistent" in row:
                raise ArtifactFormatError(f"buffer {name!r}: a version {version} manifest has no 'persistent' flag")
            continue
        flag = row.get("persistent")
        if not isinstance(flag, bool):
            raise ArtifactFormatError(f"buffer {name!r}: 'persistent' must be true or false, not {flag!r}")
        if not flag:
            out.append(name)
    return tuple(out)


def write_artifact(path: Path, forward: Path, backward: Path, manifest: TrainingManifest) -> Path:
    """Write the zip holding the two packages and the manifest."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.write(forward, FORWARD)
        z.write(backward, BACKWARD)
        z.writestr(MANIFEST, manifest.to_json())
    return path


def open_artifact(path: Path, *, device_index: int = -1) -> tuple[TrainingManifest, CompiledPackage, CompiledPackage]:
    """Load a training artifact whose checksum the caller has verified: the manifest and both packages.

    Each package is loaded from its member of the zip (no copy of the package beside it).
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(z.namelist())
            if names != sorted(MEMBERS):
                raise ArtifactFormatError(f"training artifact holds {names}, expected {sorted(MEMBERS)}")
            manifest = TrainingManifest.from_json(z.read(MANIFEST))
    except zipfile.BadZipFile as e:
        raise ArtifactFormatError(f"training artifact is not a zip: {e}") from e
    forward = CompiledPackage(path, member=FORWARD, device_index=device_index)
    backward = CompiledPackage(path, member=BACKWARD, device_index=device_index)
    return manifest, forward, backward

"""The training artifact: a forward package, a backward package and the manifest that wires them, in one zip.

Tezzeret writes it (stored, uncompressed: the packages are zips already) as the single content-addressed
artifact of an Urza entry whose ``artifact`` column is ``"training"``; Kasmina verifies the zip's checksum
before it opens it (:func:`open_artifact`), extracts the two packages into a private temporary folder, loads
them and removes the folder.

The manifest says, for each graph input and output, what it is (plain JSON, versioned):

- ``forward_inputs``: ``["param", fqn]``, ``["buffer", fqn]`` or ``["input", k]``;
- ``forward_outputs``: ``["mutation", fqn]`` (a buffer's new value, e.g. BatchNorm's running mean),
  ``["output", k]`` (the k-th flattened output) or ``["saved"]`` (an activation the backward needs);
- ``backward_inputs``: ``["sizes"]`` (a zero-size tensor whose dims carry the dynamic sizes, read from
  ``sizes``: input k, dim d), ``["forward_input", i]``, ``["forward_output", j]`` or ``["tangent", k]``;
- ``backward_outputs``: ``["param", fqn]`` or ``["input", k]``, the gradients.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.artifacts import ArtifactKind
from esper.guards import SchemaVersionError
from esper.kasmina.runtime import CompiledPackage
from esper.kasmina.tensors import TensorSpec
from esper.urza import Entry

FORMAT = "esper-training/1"
FORMAT_VERSION = 1
FORWARD, BACKWARD, MANIFEST = "forward.pt2", "backward.pt2", "manifest.json"
MEMBERS = (FORWARD, BACKWARD, MANIFEST)

Slot = tuple[Any, ...]


class ArtifactFormatError(ValueError):
    """The zip is not a training artifact this Esper can read (the message says what is wrong)."""


def is_training_entry(entry: Entry) -> bool:
    """Whether an Urza entry is a training artifact (or a blueprint's eager training route)."""
    return entry.artifact == ArtifactKind.TRAINING


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
    version: int = FORMAT_VERSION

    def weights(self) -> dict[str, TensorSpec]:
        """The weight schema a seed must match: every parameter and buffer."""
        return {s.name: s for s in (*self.params, *self.buffers)}

    def mutated(self) -> list[str]:
        return [s[1] for s in self.forward_outputs if s[0] == "mutation"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "blueprint": self.blueprint,
            "params": [{"name": s.name, **s.to_dict()} for s in self.params],
            "trainable": list(self.trainable),
            "buffers": [{"name": s.name, **s.to_dict()} for s in self.buffers],
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

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingManifest:
        if not str(data.get("format", "")).startswith("esper-training/"):
            raise ArtifactFormatError(f"not a training manifest (format {data.get('format')!r})")
        version = int(data["version"])
        if version > FORMAT_VERSION:
            raise SchemaVersionError(f"training manifest version {version} is newer than this Esper's {FORMAT_VERSION}")

        def specs(rows: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec.from_dict(r["name"], r) for r in rows)

        def slots(rows: list[list[Any]]) -> tuple[Slot, ...]:
            return tuple(tuple(r) for r in rows)

        return cls(
            blueprint=data["blueprint"],
            params=specs(data["params"]),
            trainable=tuple(data["trainable"]),
            buffers=specs(data["buffers"]),
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


def write_artifact(path: Path, forward: Path, backward: Path, manifest: TrainingManifest) -> Path:
    """Write the zip holding the two packages and the manifest."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.write(forward, FORWARD)
        z.write(backward, BACKWARD)
        z.writestr(MANIFEST, manifest.to_json())
    return path


def open_artifact(path: Path, *, device_index: int = -1) -> tuple[TrainingManifest, CompiledPackage, CompiledPackage]:
    """Load a training artifact whose checksum the caller has verified: the manifest and both packages.

    The packages are extracted into a private temporary folder, which is removed once they are loaded.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = sorted(z.namelist())
            if names != sorted(MEMBERS):
                raise ArtifactFormatError(f"training artifact holds {names}, expected {sorted(MEMBERS)}")
            manifest = TrainingManifest.from_json(z.read(MANIFEST))
            with tempfile.TemporaryDirectory(prefix="esper-train-") as tmp:
                os.chmod(tmp, 0o700)
                packages = []
                for member in (FORWARD, BACKWARD):
                    target = Path(tmp) / member
                    target.write_bytes(z.read(member))
                    packages.append(CompiledPackage(target, device_index=device_index))
    except zipfile.BadZipFile as e:
        raise ArtifactFormatError(f"training artifact is not a zip: {e}") from e
    return manifest, packages[0], packages[1]

"""The store's process-wide digest cache: a file verified once is not hashed again while its identity (inode,
size, mtime, ctime) is unchanged; a file changed in place, or a racily new one, is hashed again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.urza import store as store_module
from esper.urza.store import ArtifactError, ArtifactStore, forget_verified


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    forget_verified()
    yield
    forget_verified()


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the store hashes, in order."""
    seen: list[Path] = []
    real = store_module.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(store_module, "sha256_file", counting)
    return seen


def _stored(tmp_path: Path, content: bytes = b"artifact bytes" * 100) -> tuple[ArtifactStore, str, int, Path]:
    src = tmp_path / "src.bin"
    src.write_bytes(content)
    store = ArtifactStore(tmp_path / "objects")
    checksum, size = store.add(src)
    path = store.path_for(checksum)
    old = 1_600_000_000_000_000_000
    os.utime(path, ns=(old, old))  # an old file (its ctime is now: see RACY_SECONDS)
    return store, checksum, size, path


def test_a_verified_file_is_not_hashed_again(
    tmp_path: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store, checksum, size, path = _stored(tmp_path)
    hashes.clear()
    assert store.verify(checksum, size) == path
    assert store.verify(checksum, size) == path
    assert store.verify(checksum) == path
    assert hashes == [path]


def test_a_file_changed_in_place_is_hashed_again_and_refused(
    tmp_path: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store, checksum, size, path = _stored(tmp_path)
    store.verify(checksum, size)
    st = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:  # same inode, same size, one byte flipped
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back (the ctime moves)
    assert path.stat().st_ino == st.st_ino and path.stat().st_size == st.st_size
    hashes.clear()
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.verify(checksum, size)
    assert hashes == [path]


def test_a_file_replaced_by_another_is_hashed_again(
    tmp_path: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store, checksum, size, path = _stored(tmp_path)
    store.verify(checksum, size)
    other = tmp_path / "other"
    other.write_bytes(b"X" * size)
    os.replace(other, path)  # a new inode under the same name
    hashes.clear()
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.verify(checksum, size)
    assert hashes == [path]


def test_a_racily_new_file_is_not_remembered(tmp_path: Path, hashes: list[Path]) -> None:
    """Within RACY_SECONDS of its last change a write could keep the same mtime (a coarse file-system clock):
    such a file is hashed at every verify."""
    store, checksum, size, path = _stored(tmp_path)  # its ctime is now
    hashes.clear()
    store.verify(checksum, size)
    store.verify(checksum, size)
    assert hashes == [path, path]


def test_rehash_and_forget_hash_again(tmp_path: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store, checksum, size, path = _stored(tmp_path)
    store.verify(checksum, size)
    hashes.clear()
    store.verify(checksum, size, rehash=True)
    forget_verified()
    store.verify(checksum, size)
    store.verify(checksum, size)
    assert hashes == [path, path]


def test_the_cache_vouches_only_for_the_checksum_it_hashed(
    tmp_path: Path, hashes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RACY_SECONDS", 0.0)
    store, checksum, size, path = _stored(tmp_path)
    store.verify(checksum, size)
    wrong = "0" * 64
    wrong_path = store.path_for(wrong)
    wrong_path.parent.mkdir(parents=True, exist_ok=True)
    os.link(path, wrong_path)  # the same inode under another checksum's name
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        store.verify(wrong, size)
    with pytest.raises(ArtifactError, match="bytes"):
        store.verify(checksum, size + 1)

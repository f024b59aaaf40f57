"""Real-world bounce samples from flufl.bounce's source distribution, fetched at test time.

flufl.bounce's sdist ships about 115 bounces collected by Mailman from real MTAs, and in
``tests/test_detectors.py`` a table of the addresses each detector must find in them.
They are not copied into this repository: :func:`fetch` downloads the sdist that
``uv.lock`` pins (its URL and sha256), checks the hash, and extracts the samples and
the table into a git-ignored cache, reused while its tarball still matches the lock.
Only the standard library is used; nothing from the archive is imported or run (the
table is read with :func:`ast.literal_eval`).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import shutil
import tarfile
import tempfile
import tomllib
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
PACKAGE = "flufl-bounce"
TABLE_MODULE = "test_detectors.py"
DOWNLOAD_TIMEOUT_S = 60


class SamplesUnavailable(Exception):
    """The sdist could not be downloaded (no network, registry unreachable)."""


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What flufl.bounce's own tests expect of one sample."""

    addresses: frozenset[str]
    """Lower-cased; empty when flufl.bounce finds nothing in it."""
    hard: bool
    detector: str
    """The flufl.bounce detector module the table names."""


@dataclasses.dataclass(frozen=True)
class Samples:
    data: Path
    """The directory of sample messages (``tests/data`` in the sdist)."""
    expected: dict[str, Expectation]
    """Per sample file name, from the sdist's detector table."""


@dataclasses.dataclass(frozen=True)
class Sdist:
    version: str
    url: str
    sha256: str


def locked_sdist(lock: Path = ROOT / "uv.lock") -> Sdist:
    """The sdist of :data:`PACKAGE` that ``uv.lock`` pins."""
    for package in tomllib.loads(lock.read_text())["package"]:
        if package["name"] == PACKAGE:
            sdist = package["sdist"]
            algorithm, _, digest = sdist["hash"].partition(":")
            assert algorithm == "sha256", sdist["hash"]
            return Sdist(package["version"], sdist["url"], digest)
    raise LookupError(f"{PACKAGE} is not in {lock}")


def fetch(cache: Path = CACHE) -> Samples:
    """The samples, downloaded and extracted on first use.

    Raises:
        SamplesUnavailable: the download failed.
        AssertionError: the download (or the cached tarball) does not match the lock.
    """
    sdist = locked_sdist()
    home = cache / f"{PACKAGE}-{sdist.version}"
    home.mkdir(parents=True, exist_ok=True)
    tarball = home / sdist.url.rsplit("/", 1)[-1]
    if not tarball.exists() or _sha256(tarball) != sdist.sha256:
        _download(sdist.url, tarball)
    actual = _sha256(tarball)
    assert actual == sdist.sha256, f"{tarball} has sha256 {actual}, uv.lock pins {sdist.sha256}"
    extracted = home / f"extracted-{sdist.sha256[:16]}"
    if not extracted.is_dir():
        _extract(tarball, extracted)
    return Samples(extracted / "data", _table(extracted / TABLE_MODULE))


def _download(url: str, target: Path) -> None:
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            partial.write_bytes(response.read())
    except OSError as error:  # URLError, timeouts and refused connections are OSErrors
        partial.unlink(missing_ok=True)
        raise SamplesUnavailable(f"cannot download {url}: {error}") from error
    os.replace(partial, target)  # atomic, so parallel workers never see half a file


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _extract(tarball: Path, target: Path) -> None:
    """Extract ``tests/data/*`` and the detector table, by base name (no member paths)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix="extracting-"))
    (staging / "data").mkdir()
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[1] != "tests":
                continue
            if parts[2:] == (TABLE_MODULE,):
                destination = staging / TABLE_MODULE
            elif len(parts) == 4 and parts[2] == "data" and parts[3].endswith(".txt"):
                destination = staging / "data" / parts[3]
            else:
                continue
            source = archive.extractfile(member)
            assert source is not None
            destination.write_bytes(source.read())
    try:
        staging.rename(target)
    except OSError:  # another worker extracted it first
        shutil.rmtree(staging)


def _table(module: Path) -> dict[str, Expectation]:
    """flufl.bounce's ``DETECTORS`` table, per file: its non-empty expectation if any.

    A file can appear once per detector that was tried on it (``groupwise_02.txt``:
    nothing for GroupWise, one address for Exchange); the pipeline stops at the first
    detector that finds something, so the non-empty row is the one that holds.
    """
    tree = ast.parse(module.read_text())
    rows = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "DETECTORS" for t in node.targets)
    )
    table: dict[str, Expectation] = {}
    for detector, name, addresses, temporary in rows:
        row = Expectation(frozenset(a.decode().lower() for a in addresses), not temporary, detector)
        if name not in table or not table[name].addresses:
            table[name] = row
    return table

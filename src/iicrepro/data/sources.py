"""Dataset registry: which archives make up each dataset and where their contents land.

UCF101 and HMDB51 come from their official servers (spec 2.1, 2.2), optionally from mirrors listed
in params.yaml (``download.mirrors.<dataset>``, tried first: base URLs, ``file://`` folders or plain
folder paths), or from a file the user puts into the downloads folder by hand. The synthetic dataset is written
locally by `iicrepro synthesize` and fetched through the same download / verify / extract path
from ``file://`` URLs.

Sizes and checksums are recorded only where they are known. Where they are not, `fetch` records
the sha256 of the first verified download next to the file and holds later downloads to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from iicrepro import layout
from iicrepro.errors import UserError

DATASETS = ("ucf101", "hmdb51", "synthetic")
ROLES = ("videos", "splits")

# File names `iicrepro synthesize` writes into layout.synthetic_source(settings).
SYNTHETIC_VIDEOS_ZIP = "synthetic_videos.zip"  # top folder SyntheticMotion/
SYNTHETIC_SPLITS_ZIP = "synthetic_splits.zip"  # top folder synthTrainTestlist/
SYNTHETIC_SUMS = "SHA256SUMS"  # sha256sum format


@dataclass(frozen=True)
class Archive:
    """One downloadable archive of a dataset.

    `into` is the folder, relative to ``layout.raw(settings, dataset)``, that the archive is
    extracted into; `nested` means the archive holds further RARs to be extracted in turn.
    """

    role: str  # "videos" | "splits"
    url: str  # official URL
    filename: str
    size: int | None = None  # exact bytes, only where documented
    sha256: str | None = None
    approx_size: int | None = None  # documented order of magnitude: far smaller is not the file
    nested: bool = False
    into: str = ""
    mirrors: tuple[str, ...] = ()  # full URLs, tried before `url`
    official: bool = True  # False: the mirrors hold other copies (download.mirror_sums)

    def urls(self) -> list[str]:
        """Download candidates in order: mirrors first, then the official URL."""
        return [*self.mirrors, *([self.url] if self.official else [])]


# Official archives (spec 2.1, 2.2). The servers publish no checksums and no exact sizes, so none
# are pinned here; the videos archives carry their documented approximate size.
_OFFICIAL: dict[str, tuple[Archive, ...]] = {
    "ucf101": (
        # ~6.5 GB RAR 4 archive holding UCF-101/<Class>/v_<Class>_gXX_cYY.avi
        Archive(
            "videos",
            "https://www.crcv.ucf.edu/data/UCF101/UCF101.rar",
            "UCF101.rar",
            approx_size=6_500_000_000,
        ),
        # zip holding ucfTrainTestlist/{classInd,trainlist0N,testlist0N}.txt
        Archive(
            "splits",
            "https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip",
            "UCF101TrainTestSplits-RecognitionTask.zip",
        ),
    ),
    "hmdb51": (
        # ~2 GB RAR of 51 per-class RARs (<class>.rar holding <class>/*.avi)
        Archive(
            "videos",
            "http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/hmdb51_org.rar",
            "hmdb51_org.rar",
            approx_size=2_000_000_000,
            nested=True,
            into="videos",
        ),
        # RAR holding testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt
        Archive(
            "splits",
            "http://serre-lab.clps.brown.edu/wp-content/uploads/2013/10/test_train_splits.rar",
            "test_train_splits.rar",
        ),
    ),
}

# Official servers known to be unreachable, with what is known; fetch's error repeats it.
KNOWN_DOWN = {
    "serre-lab.clps.brown.edu": "HMDB51's official server, reported defunct since 2025",
}

# Folders (relative to layout.raw) that hold the extracted contents, per dataset and role.
_ROOTS = {
    "ucf101": {"videos": "UCF-101", "splits": "ucfTrainTestlist"},
    "hmdb51": {"videos": "videos", "splits": "testTrainMulti_7030_splits"},
    "synthetic": {"videos": "SyntheticMotion", "splits": "synthTrainTestlist"},
}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")


def archive_filenames(dataset: str) -> dict[str, str]:
    """role -> archive file name, without touching the disk (for workflow wiring)."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        return {"videos": SYNTHETIC_VIDEOS_ZIP, "splits": SYNTHETIC_SPLITS_ZIP}
    return {a.role: a.filename for a in _OFFICIAL[dataset]}


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse a `sha256sum` listing ("<hex>  <name>" or "<hex> *<name>") into name -> hex."""
    sums = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        digest, _, name = line.strip().partition(" ")
        sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _synthetic_archives(settings: Any) -> tuple[Archive, ...]:
    source = layout.synthetic_source(settings)
    sums_path = source / SYNTHETIC_SUMS
    names = {"videos": SYNTHETIC_VIDEOS_ZIP, "splits": SYNTHETIC_SPLITS_ZIP}
    missing = [p for p in [sums_path, *(source / n for n in names.values())] if not p.is_file()]
    if missing:
        raise UserError(
            "the synthetic dataset has not been written yet (missing "
            + ", ".join(str(p) for p in missing)
            + "): run `iicrepro synthesize` first (same --params/--preset/--set options)"
        )
    sums = read_sha256sums(sums_path)
    out = []
    for role, name in names.items():
        if name not in sums:
            raise UserError(
                f"{sums_path} lists no checksum for {name}: run `iicrepro synthesize` again"
            )
        path = (source / name).resolve()
        out.append(Archive(role, path.as_uri(), name, path.stat().st_size, sums[name]))
    return tuple(out)


def archives(settings: Any, dataset: str) -> list[Archive]:
    """The dataset's archives, each with its mirror URLs from ``download.mirrors.<dataset>``."""
    _check_dataset(dataset)
    found = _synthetic_archives(settings) if dataset == "synthetic" else _OFFICIAL[dataset]
    bases = (settings["download"]["mirrors"] or {}).get(dataset) or []
    out = [replace(a, mirrors=tuple(mirror_url(base, a.filename) for base in bases)) for a in found]
    sums_file = settings["download"].get("mirror_sums")
    if dataset == "synthetic" or not sums_file:
        return out
    return [_mirror_copy(a, Path(sums_file), dataset) for a in out]


def _mirror_copy(archive: Archive, sums_file: Path, dataset: str) -> Archive:
    """An archive the mirrors hold as their own copy (its sum listed in download.mirror_sums):
    checked against that sum, fetched from the mirrors only."""
    if not sums_file.is_file():
        raise UserError(
            f"download.mirror_sums names {sums_file}, which does not exist: write it (one "
            "'<sha256>  <file name>' line per archive; the rehearsal's builder writes it with "
            "`iicrepro rehearsal build`) or set download.mirror_sums to null."
        )
    sums = read_sha256sums(sums_file)
    if archive.filename not in sums:
        return archive
    if not archive.mirrors:
        raise UserError(
            f"{sums_file} lists {archive.filename}, but download.mirrors.{dataset} is empty: "
            "those sums describe a mirror's copies, so list the mirror that holds them."
        )
    return replace(
        archive, sha256=sums[archive.filename], size=None, approx_size=None, official=False
    )


def mirror_url(base: str, filename: str) -> str:
    """The URL of `filename` on a mirror: `base` is a base URL (http, https, file) or a folder."""
    if urlparse(base).scheme in ("http", "https", "file"):
        return base.rstrip("/") + "/" + quote(filename)
    return (Path(base).expanduser().absolute() / filename).as_uri()


def known_down(url: str) -> str | None:
    """What is known about `url`'s server being down, or None."""
    return KNOWN_DOWN.get(urlparse(url).hostname or "")


def extract_target(settings: Any, dataset: str, archive: Archive) -> Path:
    """The folder an archive is extracted into."""
    root = layout.raw(settings, dataset)
    return root / archive.into if archive.into else root


def content_root(settings: Any, dataset: str, role: str) -> Path:
    """The folder an archive of `role` ("videos" or "splits") produces once extracted."""
    _check_dataset(dataset)
    return layout.raw(settings, dataset) / _ROOTS[dataset][role]


def video_root(settings: Any, dataset: str) -> Path:
    """The folder holding ``<Class>/<video>.avi`` after extraction."""
    return content_root(settings, dataset, "videos")


def splits_root(settings: Any, dataset: str) -> Path:
    """The folder holding the official split files after extraction."""
    return content_root(settings, dataset, "splits")

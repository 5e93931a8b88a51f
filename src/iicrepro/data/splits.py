"""Official split files -> one manifest CSV per split (`iicrepro splits`).

Two official formats (spec 2.1, 2.2):

* UCF101 (also written by the synthetic dataset): ``classInd.txt`` ("<1-based index> <Class>"),
  ``trainlistNN.txt`` ("<Class>/<file>.avi <label>") and ``testlistNN.txt`` ("<Class>/<file>.avi");
  the label comes from classInd via the class folder prefix.
* HMDB51: 153 per-class files ``<class>_test_split{1,2,3}.txt`` with lines "<video>.avi <tag>"
  (1 train, 2 test, 0 unused); classes are numbered alphabetically.

Each split becomes ``split{1,2,3}.csv`` with columns ``video,class,label,subset`` (``video`` =
``<Class>/<name>.avi`` relative to the dataset's video root, ``label`` 0-based, ``subset`` train or
test), plus ``classes.csv`` (label,class).
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from iicrepro.errors import UserError

SPLITS = (1, 2, 3)
MISSING = "missing.csv"  # listed videos absent from the video folder
COLUMNS = ("video", "class", "label", "subset")
HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<split>[123])\.txt$")
HMDB_TAGS = {"1": "train", "2": "test"}  # tag 0 = unused by this split (spec 2.2)


@dataclass(frozen=True)
class Entry:
    """One video of one split."""

    video: str  # '<Class>/<name>.avi', relative to the dataset's video root
    class_name: str
    label: int  # 0-based
    subset: str  # 'train' | 'test'


@dataclass
class Splits:
    """A dataset's classes (index = 0-based label) and its three splits."""

    classes: list[str]
    splits: dict[int, list[Entry]]

    def subset(self, split: int, subset: str) -> list[Entry]:
        return [e for e in self.splits[split] if e.subset == subset]


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a split file with their 1-based numbers; CRLF or LF endings."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not a UTF-8 text file ({exc}); is it really a split file?"
        ) from None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, line.strip()


def _bad(path: Path, number: int, line: str, why: str) -> UserError:
    return UserError(
        f"{path}:{number}: {why}: {line!r}. The split files look corrupted or are not the official "
        "ones; download them again."
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path} is missing: the official split folder must contain it.")
    return path


def parse_class_index(path: Path) -> list[str]:
    """classInd.txt -> class names in label order; indices must run 1, 2, 3, ..."""
    classes: list[str] = []
    for number, line in read_lines(_require(path)):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise _bad(path, number, line, "expected '<index> <Class>'")
        if int(parts[0]) != len(classes) + 1:
            raise _bad(path, number, line, f"expected index {len(classes) + 1}")
        if parts[1] in classes:
            raise _bad(path, number, line, "class listed twice")
        classes.append(parts[1])
    if not classes:
        raise UserError(f"{path} lists no classes.")
    return classes


def _ucf_list(path: Path, classes: list[str], subset: str) -> list[Entry]:
    """One trainlistNN / testlistNN file; train lines carry a 1-based label checked against classInd."""
    labels = {name: i for i, name in enumerate(classes)}
    entries = []
    for number, line in read_lines(_require(path)):
        parts = line.split()
        if len(parts) != (2 if subset == "train" else 1):
            form = "<Class>/<file>.avi <label>" if subset == "train" else "<Class>/<file>.avi"
            raise _bad(path, number, line, f"expected '{form}'")
        video = parts[0]
        folder, _, name = video.partition("/")
        if not name or "/" in name or not name.endswith(".avi"):
            raise _bad(path, number, line, "expected a video path '<Class>/<file>.avi'")
        if folder not in labels:
            raise _bad(path, number, line, f"unknown class {folder!r} (not in classInd.txt)")
        label = labels[folder]
        if subset == "train" and parts[1] != str(label + 1):
            raise _bad(
                path, number, line, f"label {parts[1]} disagrees with classInd.txt ({label + 1})"
            )
        entries.append(Entry(video, folder, label, subset))
    return entries


def parse_ucf101(folder: Path) -> Splits:
    """The UCF101 split format (classInd.txt, trainlist0N.txt, testlist0N.txt) in `folder`.

    The HandstandPushups quirk (spec 2.1) needs no rewriting here: the lists already name the real
    files, folder ``HandstandPushups`` and file names ``v_HandStandPushups_*``.
    """
    classes = parse_class_index(folder / "classInd.txt")
    splits = {}
    for s in SPLITS:
        train = _ucf_list(folder / f"trainlist0{s}.txt", classes, "train")
        test = _ucf_list(folder / f"testlist0{s}.txt", classes, "test")
        splits[s] = _check_unique(train + test, folder, s)
    return Splits(classes, splits)


def parse_hmdb51(folder: Path) -> Splits:
    """The official HMDB51 per-class files ``<class>_test_split{1,2,3}.txt`` in `folder`."""
    files: dict[str, dict[int, Path]] = {}
    for path in folder.iterdir():
        match = HMDB_FILE.match(path.name)
        if match and not path.name.startswith("."):
            files.setdefault(match["cls"], {})[int(match["split"])] = path
    if not files:
        raise UserError(f"{folder} holds no '<class>_test_split<N>.txt' files.")
    classes = sorted(files)
    for name in classes:
        missing = [s for s in SPLITS if s not in files[name]]
        if missing:
            raise UserError(
                f"{folder}: class {name!r} has no {name}_test_split{missing[0]}.txt; the official "
                "archive has all three splits for every class."
            )
    splits = {}
    for s in SPLITS:
        rows: dict[str, list[Entry]] = {"train": [], "test": []}
        for label, name in enumerate(classes):
            path = files[name][s]
            for number, line in read_lines(path):
                parts = line.split()
                if (
                    len(parts) != 2
                    or not parts[0].endswith(".avi")
                    or parts[1] not in ("0", "1", "2")
                ):
                    raise _bad(path, number, line, "expected '<video>.avi <tag 0|1|2>'")
                if parts[1] in HMDB_TAGS:
                    subset = HMDB_TAGS[parts[1]]
                    rows[subset].append(Entry(f"{name}/{parts[0]}", name, label, subset))
        splits[s] = _check_unique(rows["train"] + rows["test"], folder, s)
    return Splits(classes, splits)


def _check_unique(entries: list[Entry], folder: Path, split: int) -> list[Entry]:
    seen: set[str] = set()
    for e in entries:
        if e.video in seen:
            raise UserError(f"{folder}: split {split} lists {e.video} more than once.")
        seen.add(e.video)
    return entries


# dataset -> (parser, a file that marks the split folder); everything else uses UCF101's format.
FORMATS: dict[str, tuple[Callable[[Path], Splits], str]] = {
    "ucf101": (parse_ucf101, "classInd.txt"),
    "hmdb51": (parse_hmdb51, "*_test_split1.txt"),
}


def locate(root: Path, marker: str) -> Path:
    """The one folder under `root` (recursively) holding files named like `marker`."""
    hits = {
        p.parent
        for p in root.rglob(marker)
        if p.is_file() and not p.name.startswith(".") and "__MACOSX" not in p.parts
    }
    if not hits:
        raise UserError(f"no split files ({marker}) found under {root}.")
    if len(hits) > 1:
        listed = ", ".join(str(h) for h in sorted(hits))
        raise UserError(f"several split folders under {root}: {listed}; pass the one to use.")
    return hits.pop()


class _CaseInsensitive:
    """Resolve '<Class>/<name>.avi' against the disk, matching names case-insensitively if needed."""

    def __init__(self, root: Path):
        self.root = root
        self._listings: dict[Path, dict[str, str]] = {}

    def _listing(self, folder: Path) -> dict[str, str]:
        if folder not in self._listings:
            names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            self._listings[folder] = {n.lower(): n for n in names}
        return self._listings[folder]

    def resolve(self, video: str) -> str | None:
        if (self.root / video).is_file():
            return video
        current, parts = self.root, []
        for part in video.split("/"):
            actual = self._listing(current).get(part.lower())
            if actual is None:
                return None
            parts.append(actual)
            current = current / actual
        return "/".join(parts) if current.is_file() else None


def verify_videos(
    splits: Splits, videos: Path, max_missing: float = 0.0
) -> tuple[Splits, list[str]]:
    """Check the listed videos exist under `videos`; use the real on-disk path of each.

    Returns the splits without the absent videos, and the absent ones. More than `max_missing`
    (a fraction of the listed videos; splits.max_missing in params.yaml) absent is an error.
    """
    if not videos.is_dir():
        raise UserError(f"video folder {videos} does not exist; extract the videos first.")
    finder = _CaseInsensitive(videos)
    resolved: dict[str, str | None] = {}
    for entries in splits.splits.values():
        for e in entries:
            if e.video not in resolved:
                resolved[e.video] = finder.resolve(e.video)
    missing = sorted(v for v, real in resolved.items() if real is None)
    if len(missing) > max_missing * len(resolved):
        head = "\n  ".join(missing[:10])
        raise UserError(
            f"{len(missing)} of {len(resolved)} listed videos are missing under {videos}, e.g.:\n"
            f"  {head}\nPass the folder that holds the <Class>/ folders as --videos, or extract "
            "the complete video archive (splits.max_missing in params.yaml is the fraction of "
            f"listed videos that may be absent: {max_missing})."
        )
    kept = {
        s: [replace(e, video=resolved[e.video]) for e in entries if resolved[e.video] is not None]
        for s, entries in splits.splits.items()
    }
    return Splits(splits.classes, kept), missing


def _csv_text(header: tuple[str, ...], rows: list[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_manifests(splits: Splits, out: Path, missing: list[str] | None = None) -> list[Path]:
    """DIR/split{1,2,3}.csv, DIR/classes.csv and DIR/missing.csv (listed videos absent from the
    video folder, left out of the manifests), each written atomically."""
    from iicrepro.io import write_text

    write_text(out / MISSING, _csv_text(("video",), [(v,) for v in missing or []]))
    written = []
    for s, entries in sorted(splits.splits.items()):
        rows = [(e.video, e.class_name, e.label, e.subset) for e in entries]
        write_text(out / f"split{s}.csv", _csv_text(COLUMNS, rows))
        written.append(out / f"split{s}.csv")
    write_text(out / "classes.csv", _csv_text(("label", "class"), list(enumerate(splits.classes))))
    return [*written, out / "classes.csv", out / MISSING]


def parse(dataset: str, source: Path) -> Splits:
    """Parse the official split files of `dataset` from an archive or a folder (searched recursively)."""
    parser, marker = FORMATS.get(dataset, FORMATS["ucf101"])
    if source.is_dir():
        return parser(locate(source, marker))
    if not source.is_file():
        raise UserError(f"split source {source} does not exist; run `iicrepro fetch` first.")
    from iicrepro.data.archives import extract

    with tempfile.TemporaryDirectory(prefix="iicrepro-splits-") as tmp:
        extract(source, Path(tmp))
        return parser(locate(Path(tmp), marker))


def build(
    dataset: str, source: Path, out: Path, videos: Path | None = None, max_missing: float = 0.0
) -> Splits:
    """Parse, optionally verify the videos (leaving out up to `max_missing` absent), write the
    manifests."""
    splits, missing = parse(dataset, Path(source)), []
    if videos is not None:
        splits, missing = verify_videos(splits, Path(videos), max_missing)
    write_manifests(splits, Path(out), missing)
    return splits


def missing_count(manifests: Path) -> int | None:
    """How many listed videos the manifests in `manifests` left out as absent (None: unknown)."""
    path = manifests / MISSING
    if not path.is_file():
        return None
    return max(0, len(path.read_text().splitlines()) - 1)


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="dataset name, e.g. ucf101, hmdb51, synthetic")
    parser.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="official split archive (zip/rar) or its extracted folder "
        "(default: the dataset's split location under paths.data)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="manifest folder (default: <paths.data>/manifests/DATASET)",
    )
    parser.add_argument(
        "--videos",
        type=Path,
        default=None,
        help="video root holding <Class>/<name>.avi; if given, the listed videos must exist "
        "(up to splits.max_missing of them may be absent: they are left out and counted)",
    )


def main(args) -> int:
    from iicrepro import layout
    from iicrepro.cli import settings_from_args

    settings = settings_from_args(args)
    source, out = args.source, args.out
    if source is None:
        from iicrepro.data.sources import splits_root

        source = splits_root(settings, args.dataset)
    out = out if out is not None else layout.manifests(settings, args.dataset)
    splits = build(args.dataset, source, out, args.videos, settings["splits"]["max_missing"])
    absent = missing_count(Path(out))
    if absent:
        print(f"{args.dataset}: {absent} listed videos are absent and left out ({out / MISSING})")
    for s, entries in sorted(splits.splits.items()):
        n_train = sum(e.subset == "train" for e in entries)
        print(f"{args.dataset} split{s}: {n_train} train / {len(entries) - n_train} test")
    print(f"{len(splits.classes)} classes -> {out}")
    return 0

"""`iicrepro rehearsal`: the paper's path end to end on stand-ins of the official archives.

``build`` writes the four official archives under their official names and formats, holding the
official split lists and tiny videos:

* ``ucf101/UCF101.rar``: RAR 4 holding ``UCF-101/<Class>/v_<Class>_gXX_cYY.avi``;
* ``ucf101/UCF101TrainTestSplits-RecognitionTask.zip``: ``ucfTrainTestlist/`` with the official
  classInd/trainlist/testlist files byte for byte (CRLF endings, the HandstandPushups folder whose
  files are named ``v_HandStandPushups_*``);
* ``hmdb51/hmdb51_org.rar``: a RAR 4 of 51 per-class RARs ``<class>.rar`` holding
  ``<class>/<video>.avi``;
* ``hmdb51/test_train_splits.rar``: ``testTrainMulti_7030_splits/<class>_test_split<k>.txt`` with
  ``<video>.avi <tag>`` lines (1 train, 2 test, 0 unused), rebuilt from the official lists.

The videos are a stated subset of the listed ones, every class in the train and the test part of
every split: for UCF101 the first listed clip of groups 1, 8 and 15 of each class (split k tests
groups 7k-6 .. 7k, so each of the three is tested in one split and trained on in the other two);
for HMDB51, per class, the first video tested in each split plus, where a split would otherwise
have no training video of the class, its first training video. Every other listed video is absent,
as from an incomplete archive: the splits step counts and leaves them out (``splits.max_missing``).
Each video is a short mpeg4/XVID AVI (``synthetic.write_avi``) of one synthetic motion, chosen by
the class index, so fine-tuning has something to learn.

``SHA256SUMS`` beside them lists the stand-ins' sums: the ``rehearsal`` preset names it as
``download.mirror_sums``, so `fetch` checks the stand-ins against it and fetches them only from the
mirror (``download.mirrors``), never from the official servers.

``serve`` serves that folder over HTTP at the host and port of the preset's mirror URLs; ``run``
builds, serves and runs ``snakemake --config preset=<preset>`` to the end, stops the server (also on
failure) and writes the wall time and jobs per rule to ``<paths.results>/rehearsal.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import io
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from iicrepro.errors import UserError

UCF_FOLDER, UCF_LISTS = "UCF-101", "ucfTrainTestlist"
HMDB_LISTS = "testTrainMulti_7030_splits"
UCF_GROUPS = (1, 8, 15)  # the first group tested by split 1, 2 and 3
DEFAULT_LISTS = Path("tests/data/splits")  # the official lists (HMDB51's converted to UCF's form)
ZIP_TIME = (2013, 10, 1, 0, 0, 0)  # fixed member times: the same inputs give the same bytes
SUMS = "SHA256SUMS"
RECORD = ".rehearsal-build.json"


# ------------------------------------------------------------------------------- split lists
def read_list(path: Path) -> list[str]:
    """The first field of every non-blank line (CRLF or LF)."""
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def ucf101_subset(lists: Path) -> list[str]:
    """'<Class>/<file>.avi' of the first listed clip of groups 1, 8 and 15 of every class."""
    listed = read_list(lists / "trainlist01.txt") + read_list(lists / "testlist01.txt")
    first: dict[tuple[str, int], str] = {}
    for video in sorted(listed):
        m = re.search(r"_g(\d+)_c\d+\.avi$", video)
        if m:
            first.setdefault((video.split("/")[0], int(m.group(1))), video)
    classes = [ln.split()[1] for ln in (lists / "classInd.txt").read_text().splitlines() if ln]
    missing = [(c, g) for c in classes for g in UCF_GROUPS if (c, g) not in first]
    if missing:
        raise UserError(f"{lists}: no listed clip of group {missing[0][1]} of {missing[0][0]}")
    return [first[(c, g)] for c in classes for g in UCF_GROUPS]


def hmdb51_tags(lists: Path) -> dict[str, dict[int, dict[str, str]]]:
    """class -> split -> video file name -> tag ('1' train, '2' test, '0' unused), from the lists
    in UCF101's form (``classInd.txt``, ``trainlist0k.txt``, ``testlist0k.txt``)."""
    classes = [ln.split()[1] for ln in (lists / "classInd.txt").read_text().splitlines() if ln]
    tags: dict[str, dict[int, dict[str, str]]] = {c: {1: {}, 2: {}, 3: {}} for c in classes}
    for k in (1, 2, 3):
        for tag, name in (("1", f"trainlist0{k}.txt"), ("2", f"testlist0{k}.txt")):
            for video in read_list(lists / name):
                cls, _, file = video.partition("/")
                tags[cls][k][file] = tag
    for per_split in tags.values():
        every = set().union(*per_split.values())
        for k in (1, 2, 3):
            for file in every - set(per_split[k]):
                per_split[k][file] = "0"
    return tags


def hmdb51_split_files(tags: dict) -> dict[str, bytes]:
    """The official per-class files: '<class>_test_split<k>.txt' -> '<video>.avi <tag> ' lines."""
    return {
        f"{HMDB_LISTS}/{cls}_test_split{k}.txt": "".join(
            f"{file} {tag} \n" for file, tag in sorted(per_split[k].items())
        ).encode()
        for cls, per_split in tags.items()
        for k in (1, 2, 3)
    }


def hmdb51_subset(tags: dict) -> list[str]:
    """'<class>/<video>.avi': per class the first video tested in each split, plus a training
    video for any split that would otherwise have none."""
    chosen = []
    for cls, per_split in tags.items():
        pick: list[str] = []
        for k in (1, 2, 3):
            tested = sorted(f for f, t in per_split[k].items() if t == "2")
            if not any(per_split[k][f] == "2" for f in pick):
                pick.append(tested[0])
        for k in (1, 2, 3):
            if not any(per_split[k][f] == "1" for f in pick):
                pick.append(sorted(f for f, t in per_split[k].items() if t == "1")[0])
        chosen += [f"{cls}/{f}" for f in pick]
    return chosen


# ------------------------------------------------------------------------------- archives
def _video_bytes(
    index: int, name: str, *, seed: int, width: int, height: int, frames: int, fps: int
) -> bytes:
    """A short XVID AVI of the synthetic motion `index` selects (mod the motion classes); its
    appearance and motion parameters are drawn from `seed` and the video's `name`."""
    import tempfile
    import zlib

    import numpy as np

    from iicrepro.data import synthetic

    motions = list(synthetic.CLASS_NAMES)
    motion = motions[index % len(motions)]
    rng = np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(index, zlib.crc32(name.encode())))
    )
    video = synthetic.render_video(
        motion, rng, width=width, height=height, frames=frames, noise=0.005
    )
    with tempfile.TemporaryDirectory(prefix="iicrepro-rehearsal-") as tmp:
        path = Path(tmp) / "v.avi"
        synthetic.write_avi(path, video, fps)
        return path.read_bytes()


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, ZIP_TIME), data, zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def _rar_with_dirs(files: dict[str, bytes]) -> bytes:
    """A stored RAR 4 with a directory entry before the files of each folder, like WinRAR's."""
    from iicrepro.data.rar import Entry, rar4_bytes

    entries, seen = [], set()
    for name, data in files.items():
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder not in seen:
                seen.add(folder)
                entries.append(Entry(folder, kind="dir"))
        entries.append(Entry(name, data))
    return rar4_bytes(entries)


def _options(args_or_dict: Any) -> dict:
    keys = ("width", "height", "frames", "fps", "seed")
    get = args_or_dict.get if isinstance(args_or_dict, dict) else lambda k: getattr(args_or_dict, k)
    return {k: get(k) for k in keys}


def mirror_folder(settings: Any) -> Path:
    """The folder served as the mirror: where download.mirror_sums lives."""
    sums = settings["download"].get("mirror_sums")
    if not sums:
        raise UserError(
            f"preset {settings.get('preset')!r} sets no download.mirror_sums: the rehearsal "
            "needs a preset whose mirror holds the stand-ins (preset `rehearsal`)."
        )
    return Path(sums).parent


def build(settings: Any, lists: Path, options: dict, force: bool = False) -> dict:
    """Write the four stand-in archives and SHA256SUMS under the mirror folder (skipped when
    they exist with the same options and lists). Returns what was written (counts)."""
    from iicrepro.io import atomic_path, sha256_file, write_text

    out = mirror_folder(settings)
    ucf_lists, hmdb_lists = lists / "ucf101", lists / "hmdb51-converted"
    for folder in (ucf_lists, hmdb_lists):
        if not (folder / "classInd.txt").is_file():
            raise UserError(f"{folder} holds no classInd.txt: pass the official lists as --lists")
    record = {
        "options": options,
        "lists": {
            p.relative_to(lists).as_posix(): p.stat().st_size for p in sorted(lists.rglob("*.txt"))
        },
    }
    record_path = out / RECORD
    if not force and record_path.is_file() and (out / SUMS).is_file():
        previous = json.loads(record_path.read_text())
        if previous.get("options") == options and previous.get("lists") == record["lists"]:
            return previous["counts"]

    video = functools.partial(_video_bytes, **options)
    ucf = ucf101_subset(ucf_lists)
    ucf_classes = sorted({v.split("/")[0] for v in ucf})
    ucf_files = {
        f"{UCF_FOLDER}/{v}": video(ucf_classes.index(v.split("/")[0]), v) for v in sorted(ucf)
    }
    ucf_split_files = {f"{UCF_LISTS}/{p.name}": p.read_bytes() for p in sorted(ucf_lists.iterdir())}
    tags = hmdb51_tags(hmdb_lists)
    hmdb = hmdb51_subset(tags)
    hmdb_classes = sorted(tags)
    inner = {}
    for cls in hmdb_classes:
        label = hmdb_classes.index(cls)
        files = {v: video(label, v) for v in hmdb if v.startswith(f"{cls}/")}
        inner[f"{cls}.rar"] = _rar_with_dirs(files)
    archives = {
        "ucf101/UCF101.rar": _rar_with_dirs(ucf_files),
        "ucf101/UCF101TrainTestSplits-RecognitionTask.zip": _zip_bytes(ucf_split_files),
        "hmdb51/hmdb51_org.rar": _rar_with_dirs(inner),
        "hmdb51/test_train_splits.rar": _rar_with_dirs(hmdb51_split_files(tags)),
    }
    for rel, data in archives.items():
        with atomic_path(out / rel) as tmp:
            tmp.write_bytes(data)
    sums = "".join(f"{sha256_file(out / rel)}  {Path(rel).name}\n" for rel in archives)
    write_text(out / SUMS, sums)
    listed_ucf = len(set(read_list(ucf_lists / "trainlist01.txt"))
                     | set(read_list(ucf_lists / "testlist01.txt")))  # fmt: skip
    listed_hmdb = len({f"{c}/{f}" for c, ps in tags.items() for s in ps.values() for f in s})
    counts = {
        "ucf101": {"videos": len(ucf), "listed": listed_ucf, "classes": len(ucf_classes)},
        "hmdb51": {"videos": len(hmdb), "listed": listed_hmdb, "classes": len(hmdb_classes)},
    }
    write_text(record_path, json.dumps({**record, "counts": counts}, indent=2) + "\n")
    return counts


# ------------------------------------------------------------------------------- the mirror
def mirror_address(settings: Any) -> tuple[str, int]:
    """(host, port) of the preset's mirror URLs; every dataset's must be <base>/<dataset>."""
    bases = set()
    for dataset, urls in (settings["download"]["mirrors"] or {}).items():
        for url in urls:
            u = urlparse(url)
            if u.scheme != "http" or u.path.rstrip("/") != f"/{dataset}" or not u.port:
                raise UserError(
                    f"download.mirrors.{dataset} lists {url}: the rehearsal mirror serves "
                    f"http://HOST:PORT/{dataset}/ (an explicit port) for each dataset"
                )
            bases.add((u.hostname, u.port))
    if len(bases) != 1:
        raise UserError("the rehearsal preset must list one mirror (http://HOST:PORT/<dataset>/)")
    return bases.pop()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class Mirror:
    """``with Mirror(folder, host, port):`` serves `folder` over HTTP in a thread."""

    def __init__(self, folder: Path, host: str, port: int):
        handler = functools.partial(_Quiet, directory=str(folder))
        try:
            self.server = http.server.ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise UserError(
                f"cannot serve the rehearsal mirror at http://{host}:{port}/ ({exc.strerror}): "
                "another program uses the port; stop it, or change the port of "
                "download.mirrors in the preset"
            ) from exc
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Mirror:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


# ------------------------------------------------------------------------------- the run
def job_counts(dry_run: str) -> dict[str, int]:
    """rule -> jobs, from the 'Job stats' table of a Snakemake (dry) run."""
    counts: dict[str, int] = {}
    if "Job stats:" not in dry_run:
        return counts
    for line in dry_run.split("Job stats:", 1)[1].splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        if m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def _let_snakemake_stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """After Ctrl-C: Snakemake, in the same process group, got it too and stops its jobs; give it
    the signal when only this process got it, and keep the mirror up until it has exited."""
    try:
        out, _ = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    sys.stdout.write(out or "")
    sys.stdout.flush()


def run(settings: Any, preset: str, cores: int, extra: list[str], build_s: float = 0.0) -> int:
    """Serve the mirror and run the whole workflow; record wall time and jobs per rule."""
    from iicrepro import layout
    from iicrepro.io import write_text

    host, port = mirror_address(settings)
    cmd = ["snakemake", "--cores", str(cores), *extra, "--config", f"preset={preset}"]
    print(f"rehearsal: serving the mirror at http://{host}:{port}/; {' '.join(cmd)}", flush=True)
    started, lines = time.monotonic(), []
    # Snakemake's output passes through (and is kept for its 'Job stats' table).
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True, "bufsize": 1}
    interrupted = False
    with Mirror(mirror_folder(settings), host, port), subprocess.Popen(cmd, **pipe) as proc:
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line)
        except KeyboardInterrupt:
            interrupted = True
            _let_snakemake_stop(proc)
    wall = time.monotonic() - started
    if interrupted:
        print(f"rehearsal: interrupted after {wall / 60:.1f} min; the mirror is stopped. Finished "
              "jobs are kept: run it again to go on from there.")  # fmt: skip
        return 130
    used = resource.getrusage(resource.RUSAGE_CHILDREN)  # Snakemake and every job it waited for
    record = {
        "preset": preset,
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(build_s + wall, 1),  # building the stand-ins included
        "build_s": round(build_s, 1),
        "workflow_s": round(wall, 1),
        "cores": cores,
        # CPU seconds of the workflow, whatever else the machine ran: wall time on idle cores is
        # about cpu_s / cores
        "cpu_s": round(used.ru_utime + used.ru_stime, 1),
        "cpu_count": os.cpu_count(),
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "jobs": job_counts("".join(lines)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = layout.summary_md(settings).with_name("rehearsal.json")
    write_text(out, json.dumps(record, indent=2) + "\n")
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"rehearsal: {status} in {(build_s + wall) / 60:.1f} min; {out}")
    return proc.returncode


# ------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build", "serve", "run"))
    parser.add_argument("--lists", type=Path, default=DEFAULT_LISTS,
                        help=f"official split lists: ucf101/, hmdb51-converted/ "
                        f"(default: {DEFAULT_LISTS})")  # fmt: skip
    parser.add_argument("--width", type=int, default=64, help="video width (default 64)")
    parser.add_argument("--height", type=int, default=48, help="video height (default 48)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores (run)")
    parser.add_argument(
        "--snakemake", default="", metavar="ARGS",
        help="run: further snakemake arguments, e.g. --snakemake 'data --keep-going'",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from iicrepro import config

    preset = args.preset or "rehearsal"
    settings = config.load(args.params, preset, args.set)
    started = time.monotonic()
    counts = build(settings, args.lists, _options(args), force=args.force)
    for dataset, c in counts.items():
        print(f"rehearsal {dataset}: {c['videos']} of {c['listed']} listed videos "
              f"({c['classes']} classes); the rest are absent")  # fmt: skip
    print(f"rehearsal: archives and {SUMS} in {mirror_folder(settings)}")
    if args.action == "build":
        return 0
    if args.action == "serve":
        host, port = mirror_address(settings)
        with Mirror(mirror_folder(settings), host, port):
            print(f"serving {mirror_folder(settings)} at http://{host}:{port}/ (Ctrl-C stops)")
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
        return 0
    extra = shlex.split(args.snakemake)
    return run(settings, preset, args.cores, extra, time.monotonic() - started)

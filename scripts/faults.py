"""The fault sweep: every injected fault the project promises to handle, re-run as one table.

Each case names the tests (pytest node-id patterns) that inject the fault with real components
(a SIGKILLed pipeline, damaged files, hostile archives, a misbehaving HTTP server, a dead MLflow
server, a tiny tmpfs) and assert the expected behaviour. The sweep runs them in one pytest session
and prints case, expected and observed: "as expected" only when every test of the case passed;
a failing, skipped or missing test is reported as such, never hidden. Tests may record what they
saw (pytest's `record_property("observed", ...)`), which is shown in the table.

    scripts/faults.sh                     # print the table (Markdown)
    scripts/faults.sh --out docs/faults.md
    scripts/faults.sh --quick             # leave out the cases marked slow
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    name: str
    expected: str
    patterns: list[str]  # fnmatch patterns of pytest node ids (file::test[param])
    slow: bool = False
    results: list[tuple[str, str, str, list[str]]] = field(
        default_factory=list
    )  # id, outcome, why, seen


CASES = [
    Case(
        "kill -9 mid-pretraining, then resume",
        "the rerun resumes after the last checkpoint; final weights, banks and per-epoch metrics "
        "equal an uninterrupted run's; a killed write's .tmp is removed",
        [
            "tests/test_workflow.py::test_interrupted_pretraining_resumes_to_the_same_model",
            "tests/test_pretrain.py::test_resume_is_bit_identical",
            "tests/test_finetune.py::test_finetune_end_to_end_and_resume_equals_uninterrupted",
        ],
        slow=True,
    ),
    Case(
        "checkpoint write killed (SIGKILL) mid-write",
        "the old checkpoint is intact; the left .tmp is removed when the run starts again, a "
        "live writer's is kept",
        [
            "tests/test_io.py::test_stale_temporary_files_are_removed_and_live_ones_kept",
            "tests/test_checkpoint.py::test_a_run_start_removes_the_temporary_files*",
            "tests/test_checkpoint.py::test_failed_write_leaves_no_file_and_keeps_the_old_one",
        ],
    ),
    Case(
        "truncated, random-bytes or pickled-object checkpoint",
        "one UserError in our words (damaged / not a checkpoint / holds Python objects), never "
        "the advice to load with weights_only=False",
        [
            "tests/test_checkpoint.py::test_unreadable_or_missing_checkpoint_is_a_user_error",
            "tests/test_checkpoint.py::test_unloadable_files_get_our_message*",
        ],
    ),
    Case(
        "bare state dict or mismatched checkpoint",
        "says what the file holds (a bare state dict, the other backbone, the missing entry) and "
        "what is expected",
        [
            "tests/test_checkpoint.py::test_a_bare_state_dict_is_named*",
            "tests/test_checkpoint.py::test_load_backbone_is_strict",
            "tests/test_finetune.py::test_missing_backbone_entry_fails_with_its_name",
            "tests/test_retrieval.py::test_missing_backbone_entry_is_named",
        ],
    ),
    Case(
        "bad videos (truncated, corrupt, unreadable, broken tags, decoder crash)",
        "each is listed in failures.csv with its reason and excluded (or kept when usable); the "
        "step goes on; nothing decodable is an error",
        [
            "tests/test_frames.py::test_damaged_videos_are_reported_and_the_rest_is_stored",
            "tests/test_frames.py::test_isolated_map_reports_the_item_that_kills_its_process",
            "tests/test_frames.py::test_nothing_decodable_is_an_error",
            "tests/test_flow.py::test_short_and_unreadable_videos_are_reported_not_fatal",
        ],
    ),
    Case(
        "hostile archive: traversal, absolute path, link escape",
        "refused before anything is written, the member named (zip, tar, RAR 4, RAR 5)",
        [
            "tests/test_archives.py::test_malicious_members_are_refused_before_writing*",
            "tests/test_archives.py::test_nested_inner_archive_is_checked_too",
        ],
    ),
    Case(
        "hostile archive pair: link in one, escape through it in the next",
        "nothing written outside the target; the error names the member (every format, order)",
        [
            "tests/test_archives.py::test_two_archives_cannot_build_an_escape*",
            "tests/test_archives.py::test_extract_cli_checks_all_archives_of_a_dataset_together",
            "tests/test_archives.py::test_a_symlink_already_on_disk_is_never_written_through",
            "tests/test_archives.py::test_nested_inner_archives_cannot_build_an_escape",
        ],
    ),
    Case(
        "zip bomb (small archive, huge contents)",
        "refused before extraction fills the disk",
        ["tests/test_archives.py::test_zip_bomb_is_refused_before_extraction"],
    ),
    Case(
        "HTTP 404 / 500 / connection refused",
        "404: error naming status and URL, no retry; 500 and refused: retried, then a clear error",
        [
            "tests/test_fetch.py::test_404_names_status_and_url_without_retrying",
            "tests/test_fetch.py::test_500_is_retried",
            "tests/test_fetch.py::test_retries_run_out_with_a_clear_error",
            "tests/test_fetch.py::test_connection_refused_is_retried_then_reported",
        ],
    ),
    Case(
        "HTTP transfer cut off",
        "resumed with Range; a server ignoring Range restarts from zero; checksum verified",
        [
            "tests/test_fetch.py::test_dropped_connection_resumes_with_range",
            "tests/test_fetch.py::test_server_ignoring_range_restarts_from_zero",
            "tests/test_fetch.py::test_wrong_bytes_fail_checksum_and_leave_no_dest",
        ],
    ),
    Case(
        "HTTP resume spliced onto a changed file",
        "the resume proves the file unchanged (If-Range, Content-Range total) or restarts from "
        "zero; no spliced file is trusted",
        [
            "tests/test_fetch.py::test_file_changed_between_break_and_resume_is_fetched_whole*",
            "tests/test_fetch.py::test_resume_answer_that_does_not_match_restarts_from_zero*",
            "tests/test_fetch.py::test_server_without_validators_is_never_resumed",
            "tests/test_fetch.py::test_file_url_resume_restarts_when_the_source_changed",
        ],
    ),
    Case(
        "HTTP 200 carrying an HTML error page",
        "refused before its checksum is trusted; the error says which files to delete",
        [
            "tests/test_fetch.py::test_html_page_is_refused_before_anything_is_trusted",
            "tests/test_fetch.py::test_wrong_magic_and_far_too_small_are_refused",
            "tests/test_fetch.py::test_a_trusted_error_page_is_replaced_by_the_genuine_file",
            "tests/test_fetch.py::test_mismatch_against_a_recorded_sum_names_the_file_to_delete",
        ],
    ),
    Case(
        "dead MLflow tracking server",
        "the step finishes; its run (also the report's summary run) is queued and logged by the next "
        "sync",
        [
            "tests/test_track.py::test_server_down_queues_the_run_then_sync_logs_it",
            "tests/test_report.py::test_cli_report_syncs_pending_runs_and_logs_one_summary_run",
            "tests/test_track.py::test_disabled_tracking_and_unusable_folders_never_raise",
        ],
    ),
    Case(
        "concurrent writers to one tracking store",
        "no metric is lost",
        ["tests/test_track.py::test_concurrent_writers_lose_no_metric"],
    ),
    Case(
        "bad value in params.yaml or on the command line",
        "the workflow stops before any job, naming the setting",
        [
            "tests/test_workflow.py::test_bad_value_in_params_stops_with_its_name*",
            "tests/test_workflow.py::test_bad_command_line_config_stops_with_its_name",
        ],
    ),
    *[
        Case(
            f"full disk (small tmpfs): {step}",
            "one error (file, file system, free space, size needed when known, what to set), exit 1, "
            "no traceback; nothing incomplete looks complete; a rerun with room completes",
            [f"tests/test_disk_full.py::test_{test}*"],
        )
        for step, test in [
            ("synthesize", "synthesize"),
            ("frames (1 and 2 workers)", "frames"),
            ("flow", "flow"),
            ("pretrain", "pretrain"),
            ("retrieve", "retrieve"),
            ("finetune", "finetune"),
            ("report", "report"),
        ]
    ],
    Case(
        "full disk (small tmpfs): fetch and extract",
        "refused up front when the size is known, with one error (no list of other sources); a "
        "disk filling mid-write is one error and keeps the partial download for resuming",
        [
            "tests/test_disk_full.py::test_fetch_and_extract",
            "tests/test_fetch.py::test_not_enough_space_is_refused_before_downloading",
            "tests/test_fetch.py::test_disk_full_while_writing_is_a_user_error",
            "tests/test_archives.py::test_contents_larger_than_the_free_space_are_refused",
        ],
    ),
    Case(
        "full disk: any write (unit)",
        "ENOSPC/EDQUOT, also behind a library's own error, becomes one OutOfSpace naming the file "
        "system; the old file is kept",
        [
            "tests/test_io.py::test_a_write_that_hits_a_full_disk*",
            "tests/test_io.py::test_out_of_space_is_found_behind_wrapping_errors",
            "tests/test_io.py::test_a_tiny_tmpfs_fills_up*",
            "tests/test_io.py::test_cli_message_for_an_out_of_space_error_outside_atomic_writes",
        ],
    ),
]


class Collector:
    """pytest plugin: keep only the sweep's tests, remember each one's outcome."""

    def __init__(self, cases: list[Case]):
        self.cases = cases
        self.outcomes: dict[str, tuple[str, str, list[str]]] = {}

    def _cases_of(self, nodeid: str) -> list[Case]:
        return [c for c in self.cases if any(fnmatch.fnmatchcase(nodeid, p) for p in c.patterns)]

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if self._cases_of(item.nodeid)]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep

    def pytest_runtest_logreport(self, report):
        seen = [str(v) for k, v in report.user_properties if k == "observed"]
        if report.when == "call" or report.outcome != "passed":
            old = self.outcomes.get(report.nodeid)
            if old and old[0] != "passed":  # keep the first failure (e.g. call before teardown)
                return
            why = ""
            if report.skipped:
                why = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
            elif report.failed:
                why = _first_error_line(report.longreprtext)
            self.outcomes[report.nodeid] = (report.outcome, why, seen)


def _first_error_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("E "):
            return line[1:].strip()
    return text.strip().splitlines()[-1] if text.strip() else "failed"


BASETEMP: list[str] = []  # the session's pytest --basetemp, shortened to $TMP in the table


def _tidy(text: str, limit: int = 600) -> str:
    for base in BASETEMP:
        text = text.replace(base.rstrip("/") + "/", "$TMP/")
    text = re.sub(r"\s+", " ", text).replace("|", "\\|").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def unmatched(patterns: list[str], nodeids: list[str]) -> list[str]:
    """The patterns that name none of these tests (a renamed or removed test)."""
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in nodeids)]


def observed(case: Case) -> str:
    lost = unmatched(case.patterns, [r[0] for r in case.results])
    if lost:
        return f"**NOT CHECKED**: no test matches {', '.join(f'`{p}`' for p in lost)}"
    failed = [r for r in case.results if r[1] == "failed"]
    skipped = [r for r in case.results if r[1] == "skipped"]
    passed = [r for r in case.results if r[1] == "passed"]
    parts = []
    if failed:
        parts.append(f"**NOT AS EXPECTED**: {len(failed)} of {len(case.results)} tests fail")
        parts += [f"`{r[0].split('::')[-1]}`: {_tidy(r[2], 300)}" for r in failed]
    elif skipped and not passed:
        parts.append(f"**NOT CHECKED** (skipped: {_tidy(skipped[0][2], 200)})")
    else:
        parts.append(f"as expected ({len(passed)} of {len(case.results)} tests pass)")
        if skipped:
            parts.append(f"{len(skipped)} skipped: {_tidy(skipped[0][2], 200)}")
    seen = [text for r in case.results for text in r[3]]
    parts += [f"observed: {_tidy(text, 450)}" for text in seen[:2]]
    return "<br>".join(parts)


def table(cases: list[Case]) -> str:
    lines = ["| case | expected | observed |", "|---|---|---|"]
    for c in cases:
        lines.append(f"| {c.name} | {c.expected} | {observed(c)} |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table (with a header) here")
    parser.add_argument("--quick", action="store_true", help="leave out the slow cases")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)

    import pytest

    cases = [c for c in CASES if not (args.quick and c.slow)]
    collector = Collector(cases)
    files = sorted({p.split("::")[0] for c in cases for p in c.patterns})
    os.chdir(ROOT)
    extra, own = list(args.pytest_args), None
    if not any(a.startswith("--basetemp") for a in extra):
        # its own folder: other pytest sessions prune the shared /tmp/pytest-of-USER folders
        own = tempfile.mkdtemp(prefix="iicrepro-faults-")
        extra.append(f"--basetemp={own}")
    BASETEMP[:] = [a.split("=", 1)[1] for a in extra if a.startswith("--basetemp=")]
    start = time.time()
    pytest.main(
        [*files, "-q", "-p", "no:cacheprovider", "--no-header", "-rN", *extra],
        plugins=[collector],
    )
    minutes = (time.time() - start) / 60
    if own:
        shutil.rmtree(own, ignore_errors=True)
    for case in cases:
        case.results = [
            (nodeid, *outcome)
            for nodeid, outcome in sorted(collector.outcomes.items())
            if case in collector._cases_of(nodeid)
        ]
    text = table(cases)
    bad = [c.name for c in cases if not observed(c).startswith("as expected")]
    summary = f"{len(cases) - len(bad)} of {len(cases)} cases as expected" + (
        f"; not as expected or not checked: {', '.join(bad)}" if bad else ""
    )
    print("\n" + text + "\n\n" + summary)
    if args.out:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        command = "scripts/faults.sh" + (" --quick" if args.quick else "")
        args.out.write_text(
            "# Fault sweep\n\n"
            f"Run {when} on commit `{git_commit()}` with `{command} --out {args.out}` "
            f"({minutes:.0f} min on {os.cpu_count()} CPU cores).\n\n"
            "Each case injects a fault with real components (a SIGKILLed run, damaged files, "
            "hostile archives built in the test, a misbehaving local HTTP server, a stopped "
            "MLflow server, a tiny tmpfs) through the tests named in `scripts/faults.py`. "
            '"As expected" means every test of the case passed; anything else is reported '
            "as it happened.\n\n" + text + "\n\n" + summary + "\n"
        )
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())

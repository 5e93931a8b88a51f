"""Screenshots of the MLflow UI for docs/mlflow.md, taken in headless Chromium.

Serves STORE (an MLflow SQLite file the workflow wrote to) with `mlflow server` on 127.0.0.1
(the tests' `MlflowServer`), gives its experiments the current saved views
(`track.refresh_views`), and photographs, for PRESET:

* docs/mlflow-runs-table.png: the retrieval experiment's comparison view (runs table);
* docs/mlflow-loss-curves.png: the pretraining experiment's comparison view as charts;
* docs/mlflow-retrieval-compare.png: the retrieval experiment's comparison view as charts.

Needs Chromium (`apt-get install chromium`); the browser is driven over its DevTools protocol with
aiohttp (an MLflow dependency). Each page is taken once its text shows the expected names.

    .venv/bin/python scripts/mlflow_screenshots.py STORE.db --preset demo --out docs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1600,1000"]  # fmt: skip


async def shoot(port: int, jobs: list[tuple[Path, str, list[str]]]) -> list[str]:
    """Each job: (png, url, texts the page must show before it is taken)."""
    import aiohttp

    profile = tempfile.mkdtemp()
    proc = subprocess.Popen(
        [shutil.which("chromium") or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
         f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    report = []
    try:
        async with aiohttp.ClientSession() as http:
            pages = []
            for _ in range(120):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json") as r:
                        pages = [p for p in await r.json() if p["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(1)
            if not pages:
                raise SystemExit("Chromium opened no page in 120 s (is it installed? apt-get "
                                 "install chromium)")  # fmt: skip
            ws = await http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
            counter = 0

            async def call(method: str, **params):
                nonlocal counter
                counter += 1
                await ws.send_str(json.dumps({"id": counter, "method": method, "params": params}))
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("id") == counter:
                        return msg.get("result", {})

            await call("Page.enable")
            for png, url, texts in jobs:
                await call("Page.navigate", url=url)
                start, found = time.time(), False
                while time.time() - start < 180 and not found:
                    await asyncio.sleep(2)
                    r = await call("Runtime.evaluate", expression="document.body.innerText")
                    body = r.get("result", {}).get("value", "") or ""
                    found = all(t in body for t in texts)
                # the assistant side panel, when shown, is closed to give the page its width
                await call("Runtime.evaluate", expression=(
                    "for (const b of document.querySelectorAll('button[aria-label]'))"
                    " if (/close/i.test(b.getAttribute('aria-label'))) b.click();"))  # fmt: skip
                await asyncio.sleep(8)  # charts draw after their data arrives
                shot = await call("Page.captureScreenshot", format="png")
                png.write_bytes(base64.b64decode(shot["data"]))
                report.append(f"{png}: {'ok' if found else 'MISSING ' + str(texts)}")
    finally:
        proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return report


def main() -> int:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    from mlflow import MlflowClient
    from mlflow_server import MlflowServer, free_port

    from iicrepro import track

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="the MLflow SQLite file")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    client = MlflowClient(f"sqlite:///{args.store.resolve()}")
    track.refresh_views(client)
    ids = {}
    for protocol in ("pretrain", "retrieval"):
        exp = client.get_experiment_by_name(f"iicrepro/{args.preset}/{protocol}")
        if exp is None:
            raise SystemExit(f"{args.store} has no experiment iicrepro/{args.preset}/{protocol}")
        ids[protocol] = exp.experiment_id

    with MlflowServer(Path(tempfile.mkdtemp()), store=args.store) as server:
        view = f"runs?viewStateShareKey={track.VIEW_KEY}"
        page = f"{server.uri}/#/experiments"
        jobs = [
            (args.out / "mlflow-runs-table.png",
             f"{page}/{ids['retrieval']}/{view}", ["joint.top1", "intra_negative"]),
            (args.out / "mlflow-loss-curves.png",
             f"{page}/{ids['pretrain']}/{view}&compareRunsMode=CHART", ["loss", "positive_rank1"]),
            (args.out / "mlflow-retrieval-compare.png",
             f"{page}/{ids['retrieval']}/{view}&compareRunsMode=CHART", ["joint.top1"]),
        ]  # fmt: skip
        for line in asyncio.run(shoot(free_port(), jobs)):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""README's screenshots of the four ways to review a sweep, taken in a real headless Chromium.

    python scripts/screenshots.py runs/smoke --studies runs/tpe-demo --out docs/img

report.html and hiplot.html are opened as files; TensorBoard (`--logdir runs/smoke`) and
optuna-dashboard (`<studies>/studies.journal`) are started on 127.0.0.1 at free ports, shot, and
stopped. Every PNG is reduced to 256 colours to keep the repository small.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def shoot(url: str, out: Path, size: tuple[int, int], budget_ms: int = 10000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--no-first-run", f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                       check=True, capture_output=True, timeout=300)
    from PIL import Image

    Image.open(out).convert("RGB").quantize(256).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KiB")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], url: str, timeout_s: float = 120) -> Iterator[None]:
    """Run `command` until `url` answers; stop it (this process only) afterwards."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} did not answer at {url}") from None
                time.sleep(1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="a finished sweep folder (report/ and the Ray experiments)")
    p.add_argument("--studies", help="a sweep folder with Optuna studies (an optimise phase); default: sweep")
    p.add_argument("--out", default="docs/img")
    args = p.parse_args()
    if CHROMIUM is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 2
    sweep, out = Path(args.sweep).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shoot((sweep / "report" / "report.html").as_uri(), out / "report.png", (1280, 1500), 3000)
    shoot((sweep / "report" / "hiplot.html").as_uri(), out / "hiplot.png", (1400, 900))
    bin_dir = Path(sys.executable).parent
    port = free_port()
    with server([str(bin_dir / "tensorboard"), "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
                f"http://127.0.0.1:{port}/"):
        time.sleep(10)  # let it read the event files
        shoot(f"http://127.0.0.1:{port}/#hparams", out / "tensorboard.png", (1400, 900), 20000)
    journal = Path(args.studies or args.sweep).resolve() / "studies.journal"
    port = free_port()
    with server([str(bin_dir / "optuna-dashboard"), str(journal), "--host", "127.0.0.1", "--port", str(port)],
                f"http://127.0.0.1:{port}/api/studies"):
        studies = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=30).read())
        study_id = studies["study_summaries"][0]["study_id"]
        shoot(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}", out / "optuna-dashboard.png", (1400, 1100),
              20000)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""demo_gradio.py in a real server: driven through gradio_client, rendered by headless Chromium."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, str(REPO / "demo_gradio.py"), "--port", str(port)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"demo exited early:\n{proc.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("demo did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_generate_through_gradio_client(demo_url):
    from gradio_client import Client
    client = Client(demo_url, verbose=False)
    gallery, info, seed = client.predict("a red circle", "", 4.0, 100, 0.95, 3, False, False, 2, None, None,
                                         api_name="/generate")
    assert len(gallery) == 2 and seed == 3 and "2 image(s)" in info
    image = Image.open(gallery[0]["image"])
    assert image.size == (64, 64)


def test_page_renders_in_headless_chromium(demo_url, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium not found: install Debian's package (apt-get install -y chromium); "
                    "scripts/setup.sh does so when run as root")
    shot = tmp_path / "demo.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1200,900", "--virtual-time-budget=8000",
           f"--screenshot={shot}", demo_url]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 10 and colours > 50, (pixels.std(), colours)  # a rendered page, not a blank one
    # The orange "Generate" button of the default theme is on the page (the UI rendered, not an error page).
    orange = (pixels[..., 0] > 200) & (pixels[..., 1] > 80) & (pixels[..., 1] < 160) & (pixels[..., 2] < 80)
    assert orange.sum() > 2000

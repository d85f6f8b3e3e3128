"""The sweep's report.html in headless Chromium (Debian's /usr/bin/chromium, DevTools protocol): no console
error, every image loaded, the key table present; and the checker itself catches a deliberately broken page."""

from __future__ import annotations

import base64
import io
import re

import pytest
from helpers.chromium import CHROMIUM, inspect_page
from helpers.sweep_run import shared_sweep

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                "(apt-get install chromium)")


def _png_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_checker_catches_a_broken_page(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(f"""<!DOCTYPE html><html><head><title>broken</title></head><body>
        <img id="ok" src="{_png_uri()}"><img id="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAA">
        <img id="missing" src="no-such-figure.png"><table id="cells"><tbody><tr><td>1</td></tr></tbody></table>
        <script>console.error("boom from the page"); undefined_function();</script></body></html>""")
    r = inspect_page(page.as_uri(), tmp_path / "profile")
    assert len(r.images) == 3 and len(r.broken_images) == 2, r.images
    assert r.images[0]["width"] == 4 and r.images[0]["height"] == 3
    assert any(e.startswith("console:") and "boom from the page" in e for e in r.errors), r.errors
    assert any(e.startswith("exception:") and "undefined_function" in e for e in r.errors), r.errors
    assert any("ERR_FILE_NOT_FOUND" in e for e in r.errors), r.errors
    clean = tmp_path / "clean.html"
    clean.write_text(f'<!DOCTYPE html><html><head><title>c</title></head><body><img src="{_png_uri()}"></body></html>')
    c = inspect_page(clean.as_uri(), tmp_path / "profile2")
    assert c.errors == [] and c.broken_images == [] and len(c.images) == 1


def test_report_html_loads_cleanly_with_every_image_and_the_key_table(tmp_path_factory, tmp_path):
    sweep = shared_sweep(tmp_path_factory)
    html = (sweep.out / "report.html").read_text()
    sources = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "self-contained: inline PNGs"
    assert not re.search(r"(href|src)=\"(https?:|//)", html)
    shot = tmp_path / "report.png"
    r = inspect_page((sweep.out / "report.html").as_uri(), tmp_path / "profile", shot)
    assert r.errors == [], r.errors
    assert len(r.images) == len(sources) == 3 + 5 and r.broken_images == [], r.images
    tables = {t["id"]: t["rows"] for t in r.tables}
    assert tables["cells"] == len(sweep.report["cells"]) and {"per-category", "stages", "models"} <= set(tables)
    assert r.title == f"qtool sweep: {sweep.report['recipe']}"
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width == 1400 and im.height > 2000

"""The HTTP service through a real uvicorn server on loopback, and the drawing page in headless Chromium."""

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_health_and_openapi(server):
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["model"] == "guide-cnn" and len(health["class_names"]) == 10
    spec = httpx.get(f"{server}/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(content)
    assert httpx.get(f"{server}/docs").status_code == 200


def test_drawing_page_is_served(server):
    page = httpx.get(server)
    assert page.status_code == 200 and "<canvas" in page.text and 'id="clear"' in page.text


def test_predict_uploaded_images_of_mnist_digits(server, splits):
    """Test images rendered large, dark on light, as PNG uploads: the service must read them right."""
    correct = 0
    for i in range(20):
        digit = splits.test_images[i, 0].numpy()
        img = Image.fromarray(255 - digit).resize((200, 200), Image.BICUBIC)
        r = httpx.post(f"{server}/predict", files={"file": ("d.png", _png(img), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3
        correct += body["digit"] == int(splits.test_labels[i])
    assert correct >= 19


def test_predict_json_pixels_both_ways(server, splits):
    for i in range(10):
        pixels = splits.test_images[i, 0].tolist()
        for preprocess in (True, False):
            r = httpx.post(f"{server}/predict", json={"pixels": pixels, "preprocess": preprocess})
            assert r.status_code == 200, r.text
            assert r.json()["digit"] == int(splits.test_labels[i])


def test_predict_raw_image_body(server, splits):
    img = Image.fromarray(splits.test_images[0, 0].numpy())
    r = httpx.post(f"{server}/predict", content=_png(img), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["digit"] == int(splits.test_labels[0])


@pytest.mark.parametrize("kwargs, status", [
    ({"files": {"file": ("x.png", b"not an image", "image/png")}}, 400),
    ({"files": {"file": ("x.png", b"", "image/png")}}, 400),
    ({"files": {"other": ("x.png", b"abc", "image/png")}}, 422),
    ({"json": {"pixels": [[0] * 28] * 27}}, 422),
    ({"json": {"pixels": [[300] * 28] * 28}}, 422),
    ({"json": {"pixels": "seven"}}, 422),
    ({"json": [1, 2, 3]}, 422),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ({"content": b"--xyz\r\ngarbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 422),
])
def test_malformed_requests_get_4xx_json(server, kwargs, status):
    r = httpx.post(f"{server}/predict", **kwargs)
    assert r.status_code == status, r.text
    assert "detail" in r.json()


def test_blank_image_says_no_digit(server):
    r = httpx.post(f"{server}/predict", files={"file": ("w.png", _png(Image.new("L", (64, 64), 255)), "image/png")})
    assert r.status_code == 422 and "no digit" in r.json()["detail"]


def test_body_size_limit(server):
    r = httpx.post(f"{server}/predict", content=b"\0" * 6_000_000, headers={"content-type": "image/png"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_serves_no_other_files(server):
    for path in ("/static/index.html", "/../pyproject.toml", "/index.html", "/etc/passwd"):
        assert httpx.get(server + path).status_code == 404


def test_small_load_run_has_no_errors(server, splits):
    """1,000 requests at concurrency 16 (timings are the benchmark's job, not the test's)."""
    bodies = [_png(Image.fromarray(255 - splits.test_images[i, 0].numpy()).resize((84, 84))) for i in range(50)]

    # idle connections dropped well before the server's 5 s keep-alive closes them (no race on reuse)
    with httpx.Client(timeout=30, limits=httpx.Limits(keepalive_expiry=1.0)) as client:
        def one(i: int) -> int:
            return client.post(f"{server}/predict", files={"file": ("d.png", bodies[i % 50], "image/png")}).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(1000)))
    assert codes.count(200) == 1000


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium is not installed (make test installs it)")
def test_draw_a_digit_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import sync_playwright

    strokes = {
        "7": [[(70, 60), (210, 60), (130, 240)]],
        "1": [[(140, 40), (140, 240)]],
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 520})
        page.goto(server)
        box = page.locator("#canvas").bounding_box()
        for digit, lines in strokes.items():
            page.click("#clear")
            assert page.inner_text("#digit") == ""
            for line in lines:
                page.mouse.move(box["x"] + line[0][0], box["y"] + line[0][1])
                page.mouse.down()
                for (x0, y0), (x1, y1) in zip(line, line[1:]):
                    for t in range(1, 21):  # many small moves, as a hand does
                        page.mouse.move(box["x"] + x0 + (x1 - x0) * t / 20, box["y"] + y0 + (y1 - y0) * t / 20)
                page.mouse.up()
            page.wait_for_function("document.querySelector('#digit').textContent !== ''", timeout=10_000)
            assert page.inner_text("#digit") == digit
            assert page.locator("#bars .row").count() == 10
            page.screenshot(path=str(tmp_path / f"drawn-{digit}.png"))
        browser.close()
    assert (tmp_path / "drawn-1.png").stat().st_size > 5000

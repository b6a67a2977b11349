import io
import json
import sys

import numpy as np
import torch
import pytest
from PIL import Image

from conftest import REPO, cli_in_process, run_cli
from mnist_classifier.models import checkpoint
from mnist_classifier.data.decode import ImageError, open_image
from mnist_classifier.data.images import prepare_digit

sys.path.insert(0, str(REPO / "benchmarks"))
from printed_digits import render_set  # noqa: E402


def _jpeg_of(digit_28: np.ndarray, size: int = 280) -> Image.Image:
    """An MNIST digit rendered large, dark on light, through JPEG."""
    buf = io.BytesIO()
    Image.fromarray(255 - digit_28).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_large_dark_on_light_jpeg_comes_back_close_to_the_original(splits):
    errors = []
    for i in range(100):
        original = splits.test_images[i, 0].numpy()
        back = prepare_digit(_jpeg_of(original))[0].numpy()
        errors.append(np.abs(back.astype(float) - original.astype(float)).mean() / 255)
    # mean absolute difference on the 0-1 scale: resampling twice and JPEG blur cost a little, no more
    assert np.mean(errors) < 0.04 and max(errors) < 0.12


def test_preprocessing_steps_on_tricky_inputs():
    # RGBA: a dark digit on a transparent background is flattened onto white, then inverted
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (40, 10, 60, 90))
    out = prepare_digit(rgba)[0]
    assert out.shape == (28, 28) and out[14, 14] > 200 and out[0, 0] == 0
    # a tall thin stroke keeps its proportions: 20 pixels high, narrow
    rows, cols = (out > 50).any(1).nonzero().flatten(), (out > 50).any(0).nonzero().flatten()
    assert 19 <= len(rows) <= 21 and len(cols) <= 8
    # light ink on grey paper: the background level is removed
    grey = Image.new("L", (60, 60), 90)
    grey.paste(230, (25, 5, 35, 55))
    out = prepare_digit(grey)[0]
    assert out[0, 0] == 0 and out.max() == 255
    # EXIF orientation is applied: a wide bar stored with "rotate 90" becomes tall
    wide = Image.new("L", (120, 40), 255)
    wide.paste(0, (10, 15, 110, 25))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif)
    out = prepare_digit(Image.open(io.BytesIO(buf.getvalue())))[0]
    assert (out > 50).any(1).sum() > (out > 50).any(0).sum()


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.zeros((50, 50), dtype=np.uint16)
    arr[10:40, 22:28] = 60000
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = prepare_digit(open_image(buf.getvalue()))[0]
    assert out.max() == 255 and (out > 128).sum() > 20


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (_truncated_png(), "broken image"),
    (b"just text", "not an image"),
])
def test_bad_files(data, message):
    with pytest.raises(ImageError, match=message):
        open_image(data)


def test_image_bomb_is_refused_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 megapixels in a small file
    with pytest.raises(ImageError, match="too large"):
        open_image(buf.getvalue())


def test_blank_image_has_no_digit():
    with pytest.raises(ImageError, match="no digit"):
        prepare_digit(Image.new("RGB", (64, 64), "white"))


@pytest.mark.accuracy
def test_printed_digits_in_many_fonts_formats_and_polarities(trained_checkpoint, tmp_path):
    items = render_set(tmp_path / "digits", per_digit=12)
    proc = cli_in_process("predict", str(tmp_path / "digits"), "--checkpoint", str(trained_checkpoint), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(items) == 120
    truth = {str(p): d for p, d in items}
    accuracy = sum(r["digit"] == truth[r["path"]] for r in results) / len(results)
    # benchmarks/test_margins.py --cases checkpoint, seeds 0-4 x OMP_NUM_THREADS 1-3 on CPU-4: 90.83-98.33 %;
    # seed 0, the shared checkpoint's, is the lowest (90.83 % with 1 and 3 threads): 85 % leaves 7 of 120 images
    assert accuracy >= 0.85, accuracy
    for r in results:
        assert {"path", "digit", "confidence", "top_k"} <= set(r) and len(r["top_k"]) == 3


def test_cli_keeps_going_after_bad_files_and_exits_nonzero(trained_checkpoint, tmp_path, splits):
    good = tmp_path / "good.png"
    Image.fromarray(255 - splits.test_images[0, 0].numpy()).resize((112, 112)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    saved = tmp_path / "seen"
    proc = cli_in_process("predict", str(tmp_path / "empty.png"), str(good), str(tmp_path / "notes.txt"),
                   str(tmp_path / "missing.png"), "--checkpoint", str(trained_checkpoint), "--top-k", "2",
                   "--save-preprocessed", str(saved), "--device", "cpu")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{good}: {int(splits.test_labels[0])} (") and "top-2:" in lines[0]
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 3
    assert any("empty.png: is empty" in e for e in errors) and any("notes.txt: is not an image" in e for e in errors)
    assert any("missing.png" in e for e in errors) and "Traceback" not in proc.stderr
    with Image.open(saved / "good.png") as img:
        assert img.size == (28, 28)


def test_low_confidence_is_flagged(trained_checkpoint, splits, tmp_path):
    """A model with a zeroed last layer gives every class 10 %: each image must be flagged and warned about.
    The trained model must flag none of the clean test digits."""
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(splits.test_images[i, 0].numpy()).save(paths[-1])
    payload = checkpoint.load(trained_checkpoint)
    for name in ("fc2.weight", "fc2.bias"):
        payload["state_dict"][name].zero_()
    unsure = tmp_path / "unsure.pt"
    checkpoint.save(unsure, payload)
    for ckpt, expect_flagged in ((unsure, True), (trained_checkpoint, False)):
        proc = cli_in_process("predict", *map(str, paths), "--checkpoint", str(ckpt), "--json", "--device", "cpu")
        results = [json.loads(line) for line in proc.stdout.splitlines()]
        assert proc.returncode == 0 and len(results) == 4
        assert [r["low_confidence"] for r in results] == [expect_flagged] * 4
        assert proc.stderr.count("low confidence") == (4 if expect_flagged else 0)
        if expect_flagged:
            assert all(r["confidence"] == pytest.approx(0.1) for r in results)
        else:
            assert all(r["confidence"] > 0.9 for r in results)


def test_predict_without_any_run_says_how_to_get_one(tmp_path):
    proc = run_cli("predict", "x.png", cwd=tmp_path)
    assert proc.returncode == 2 and "mnist train" in proc.stderr


def test_a_folder_is_walked_without_following_links_and_every_image_name_is_answered(trained_checkpoint, tmp_path,
                                                                                       splits):
    """Sub-folders in path order, a link back up not followed (a loop), and a FIFO named like an image answered
    with its own error line (before, `Path.is_file` dropped it silently and one EACCES entry was a traceback)."""
    import os

    from mnist_classifier.inference import expand_paths

    digit = Image.fromarray(splits.test_images[0, 0].numpy())
    (tmp_path / "b" / "inner").mkdir(parents=True)
    for name in ("a.png", "b/inner/c.PNG", "b/d.jpg"):
        digit.save(tmp_path / name)
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "loop").symlink_to("..")
    os.mkfifo(tmp_path / "b" / "pipe.png")
    found = expand_paths([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png", "b/d.jpg", "b/inner/c.PNG", "b/pipe.png"]
    proc = cli_in_process("predict", str(tmp_path), "--checkpoint", str(trained_checkpoint), "--device", "cpu")
    assert proc.returncode == 1 and len(proc.stdout.splitlines()) == 3
    assert proc.stderr.count("error:") == 1 and "pipe.png: is not a regular file" in proc.stderr


def test_many_files_are_classified_in_evaluation_sized_batches(trained_checkpoint, splits):
    """A folder of thousands of images must not hold every image's feature maps at once (20,000 files: a
    2.4 GB peak before, 0.74 GB in batches); each image's answer is the same as alone."""
    from mnist_classifier.config import EVAL_BATCH_SIZE
    from mnist_classifier.inference.predict import classify
    from mnist_classifier.models import load_model

    model, info, _ = load_model(trained_checkpoint, torch.device("cpu"))
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    digits = splits.test_images[: 2 * EVAL_BATCH_SIZE + 10]
    try:
        probs = classify(model, digits, info, torch.device("cpu"))
        alone = classify(model, digits[-1:], info, torch.device("cpu"))
    finally:
        hook.remove()
    assert seen == [EVAL_BATCH_SIZE, EVAL_BATCH_SIZE, 10, 1] and probs.shape == (len(digits), 10)
    assert torch.allclose(probs[-1], alone[0], atol=1e-5) and torch.allclose(probs.sum(1), torch.ones(len(digits)))

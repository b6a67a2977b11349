import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import cli_in_process, run_cli
from mnist_classifier.inference import classify
from mnist_classifier.models import checkpoint
from mnist_classifier.evaluation import predict_logits
from mnist_classifier.data.images import model_input


@pytest.mark.slow
def test_one_accuracy_everywhere(trained_checkpoint, splits, data_dir, tmp_path):
    """All 10,000 test images: what training recorded, `mnist evaluate`, the classify step that predict and
    serve share, and onnxruntime on the exported model all count the same images correct."""
    summary = json.loads((trained_checkpoint.parent / "summary.json").read_text())
    proc = cli_in_process("evaluate", "--checkpoint", str(trained_checkpoint), "--json", "--device", "cpu",
                   "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads(proc.stdout)
    assert evaluated["n"] == 10000 and evaluated["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)

    model, info, _ = checkpoint.load_model(trained_checkpoint, "cpu")
    served = classify(model, splits.test_images, info, torch.device("cpu")).argmax(1)
    assert int(served.eq(splits.test_labels).sum()) == evaluated["correct"]

    out = tmp_path / "model.onnx"
    proc = cli_in_process("export", "--checkpoint", str(trained_checkpoint), "--format", "onnx", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    x = model_input(splits.test_images, info.mean, info.std, torch.device("cpu")).contiguous().numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_logits = np.concatenate([session.run(None, {"images": x[i:i + 1000]})[0] for i in range(0, 10000, 1000)])
    assert int((onnx_logits.argmax(1) == splits.test_labels.numpy()).sum()) == evaluated["correct"]
    ours = predict_logits(model, torch.from_numpy(x), 1000).numpy()  # fp32
    assert np.abs(onnx_logits - ours).max() < 1e-4


def test_onnx_has_dynamic_batch_and_metadata(trained_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    assert cli_in_process("export", "--checkpoint", str(trained_checkpoint), "--out", str(out)).returncode == 0
    proto = onnx.load(str(out))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mean"]) == [0.1307] and json.loads(meta["std"]) == [0.3081]
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):
        assert session.run(None, {"images": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)


def test_the_fast_recipes_centre_model_exports_its_crop_to_onnx(splits, data_dir, tmp_path):
    """The fast recipe's model (fast-cnn-centre-16) slices its input's border off inside forward: the ONNX
    graph must do the same, so a 28x28 input still works and a changed border still changes nothing."""
    run = tmp_path / "run"
    proc = cli_in_process("train", "--recipe", "fast", "--train-subset", "2048", "--test-subset", "500",
                          "--device", "cpu", "--data-dir", str(data_dir), "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "centre.onnx"
    assert cli_in_process("export", "--checkpoint", str(run / "model.pt"), "--out", str(out)).returncode == 0
    model, info, _ = checkpoint.load_model(run / "model.pt", "cpu")
    x = model_input(splits.test_images[:500], info.mean, info.std, torch.device("cpu")).contiguous()
    framed = x.clone()
    framed[..., :2, :] = 3.0  # the top border, which the model drops
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"images": x.numpy()})[0]
    assert np.abs(onnx_logits - predict_logits(model, x, 500).numpy()).max() < 1e-4
    assert np.array_equal(session.run(None, {"images": framed.numpy()})[0], onnx_logits)


@pytest.mark.slow
def test_safetensors_round_trip_without_pickle(trained_checkpoint, tmp_path, data_dir):
    out = tmp_path / "model.safetensors"
    assert cli_in_process("export", "--checkpoint", str(trained_checkpoint), "--format", "safetensors", "--out", str(out)).returncode == 0
    assert out.read_bytes()[8:9] == b"{"  # a JSON header, not a pickle
    a = checkpoint.load(trained_checkpoint)["state_dict"]
    b = checkpoint.load(out)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    proc = cli_in_process("evaluate", "--checkpoint", str(out), "--data-dir", str(data_dir), "--json", "--device", "cpu")
    ref = cli_in_process("evaluate", "--checkpoint", str(trained_checkpoint), "--data-dir", str(data_dir), "--json", "--device", "cpu")
    assert json.loads(proc.stdout)["accuracy"] == json.loads(ref.stdout)["accuracy"]


def test_export_errors_are_one_line(tmp_path):
    proc = run_cli("export", "--checkpoint", str(tmp_path / "nope.pt"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_the_servers_export_is_cached_by_the_checkpoints_bytes_and_written_whole(trained_checkpoint, tmp_path, capsys):
    """`mnist serve` exports a checkpoint once (~8 s) and loads that file on later starts; other bytes, another
    file; only the most recently used are kept; an unusable cache folder costs one line, not the start."""
    from dataclasses import replace

    from mnist_classifier.config import ServeConfig
    from mnist_classifier.serving import workers
    from mnist_classifier.serving.backends import cached_export, export_cache_dir

    cache, scratch = tmp_path / "cache", tmp_path / "scratch"
    scratch.mkdir()
    first = cached_export(trained_checkpoint, cache, scratch)
    inode, data = first.stat().st_ino, first.read_bytes()
    again = cached_export(trained_checkpoint, cache, scratch)
    assert again == first and again.stat().st_ino == inode and again.read_bytes() == data  # reused, not rewritten
    onnx.checker.check_model(onnx.load(str(first)))
    assert not list(cache.glob(".*"))  # no temporaries left beside it

    other = tmp_path / "other.pt"  # the same weights, one more metadata entry: other bytes, so another export
    payload = checkpoint.load(trained_checkpoint)
    torch.save({**payload, "note": "retrained"}, other)
    second = cached_export(other, cache, scratch, keep=1)
    assert second != first and list(cache.glob("*.onnx")) == [second]  # keep=1: the older one went

    assert export_cache_dir("off") is None and export_cache_dir("~/x") == export_cache_dir("~/x").expanduser()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cfg = replace(ServeConfig(checkpoint=str(trained_checkpoint)), export_cache=str(blocked / "cache"))
    path = workers._export(cfg, payload, scratch)
    assert path.parent == scratch and path.stat().st_size > 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot use the export cache" in err and "exporting for this start only" in err

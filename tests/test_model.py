import pytest
import torch
import torch.nn.functional as F

from mnist_classifier.errors import UserError
from mnist_classifier.models import MODELS, ModelConfig, build_model, count_parameters
from mnist_classifier.models import checkpoint, layout
from mnist_classifier.models.cnn import FastCNNCentre, GuideCNN

GRAD_IN_CHANNELS_LAST = layout.grad_in_channels_last  # as imported, whatever a test patches in its place


def test_guide_cnn_has_the_guides_parameter_count_and_output_shape():
    model = build_model(ModelConfig())
    assert isinstance(model, GuideCNN)
    assert count_parameters(model) == 206_922
    assert model.flat_features == 32 * 7 * 7 == 1568
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_registry_knows_guide_cnn():
    assert "guide-cnn" in MODELS


def test_names_from_before_the_rename_still_build_and_load():
    """Checkpoints written before 'seed-cnn' became 'guide-cnn' name the old model; they must still load."""
    old = build_model(ModelConfig(name="seed-cnn"))
    assert type(old) is GuideCNN and type(build_model(ModelConfig(name="seed-cnn-deep"))).__name__ == "GuideCNNDeep"
    payload = {"model": {**ModelConfig().to_dict(), "name": "seed-cnn"}, "state_dict": old.state_dict()}
    assert type(checkpoint.model_from_payload(payload)) is GuideCNN


def _guide_forward(m: GuideCNN, x):
    """The guide's order: ReLU, then pool."""
    x = m.pool(F.relu(m.conv1(x)))
    x = m.pool(F.relu(m.conv2(x)))
    x = x.view(-1, 32 * 7 * 7)
    return m.fc2(F.relu(m.fc1(x)))


def test_pool_then_relu_equals_the_guides_relu_then_pool_including_gradients():
    torch.manual_seed(0)
    m = GuideCNN(ModelConfig())
    m.pool.native = False  # torch's layers on both sides: the order is the question (kernels: test_pooling.py)
    x = torch.randn(8, 1, 28, 28)
    x[:, :, :10] = -0.4242  # a flat background, as in MNIST, makes ties inside pooling windows
    y = torch.randint(0, 10, (8,))
    F.cross_entropy(m(x), y).backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(_guide_forward(m, x), y).backward()
    assert torch.equal(m(x), _guide_forward(m, x))
    for n, p in m.named_parameters():
        assert torch.equal(ours[n], p.grad), n


def test_model_follows_input_shape():
    m = build_model(ModelConfig(in_channels=3, image_size=32, num_classes=7))
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_forward_returns_logits_not_log_probabilities():
    torch.manual_seed(1)
    out = build_model(ModelConfig())(torch.randn(4, 1, 28, 28))
    assert not torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-3)


def test_m5_cnn_layout_parameters_and_sizes():
    m = build_model(ModelConfig(name="m5-cnn"))
    # convolutions 25 * (1*32 + 32*64 + 64*96 + 96*128 + 128*160), batch norms 2 * (32+64+96+128+160),
    # linear 160*8*8*10 (no bias: the batch norm after it has one), its batch norm 2 * 10
    assert count_parameters(m) == 25 * 40_992 + 2 * 480 + 102_400 + 20 == 1_128_180
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    colour = build_model(ModelConfig(name="m5-cnn", in_channels=3, image_size=32, num_classes=7))
    assert colour(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_m5_cnn_refuses_images_too_small_for_five_unpadded_convolutions():
    with pytest.raises(UserError, match="at least 21 pixels"):
        build_model(ModelConfig(name="m5-cnn", image_size=16))


@pytest.mark.parametrize("name, full, params", [("fast-cnn-centre", "fast-cnn-deep", 26_138),
                                                 ("fast-cnn-centre-16", None, 23_530)])
def test_fast_cnn_centre_sees_only_the_centre_24_pixels_and_keeps_the_28_pixel_interface(name, full, params):
    torch.manual_seed(0)
    m = build_model(ModelConfig(name=name)).eval()
    assert count_parameters(m) == params
    x = torch.randn(4, 1, 28, 28)
    border = x.clone()
    border[..., :2, :] = border[..., -2:, :] = border[..., :, :2] = border[..., :, -2:] = 5.0
    assert torch.equal(m(x), m(border))  # the 2-pixel border never reaches a layer
    inside = x.clone()
    inside[..., 2, 2] += 5.0  # the centre's corner pixel does
    assert not torch.equal(m(x), m(inside))
    if full:  # the same layers, on a smaller map
        deep = build_model(ModelConfig(name=full))
        deep.load_state_dict(m.state_dict())  # same weights: on the centre alone, the deep model's computation
        assert torch.allclose(m(x), deep.eval()(x[..., 2:-2, 2:-2]), atol=1e-6)
    colour = build_model(ModelConfig(name=name, in_channels=3, image_size=32, num_classes=7))
    assert colour(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(UserError, match=f"^{name} needs images of at least 12 pixels"):
        build_model(ModelConfig(name=name, image_size=10))


def test_the_border_fast_cnn_centre_drops_is_nearly_empty_on_mnist(splits):
    """Why the model may drop it: MNIST centres each digit's 20x20 box in 28x28. Measured: 0.237 % of the
    60,000 training images' ink lies in the 2-pixel border (Fashion-MNIST: 8.3 %)."""
    b, images = FastCNNCentre.BORDER, splits.train_images
    total = images.sum(dtype=torch.float64)
    border = total - images[..., b:-b, b:-b].sum(dtype=torch.float64)
    assert 0 < border / total < 0.003


@pytest.mark.parametrize("name", ["fast-cnn-centre-16", "guide-cnn"])
def test_whitening_start_decorrelates_the_first_layer_on_images_it_was_not_fitted_on(name, splits):
    from mnist_classifier.data import model_input
    from mnist_classifier.models.whiten import SAMPLE_IMAGES, conv_inputs, first_conv, whiten_first_conv

    images = model_input(splits.train_images[:12_000], (0.1307,), (0.3081,), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name)).train()
    torch.manual_seed(0)
    fresh = build_model(ModelConfig(name=name))
    assert whiten_first_conv(model, images) == 16  # 16 filters: 8 components and their negatives
    conv = first_conv(model)
    assert torch.equal(conv.weight[8:], -conv.weight[:8]) and model.training  # the mode fit set is kept
    # every other tensor (the bias, later layers, batch norm's statistics) is as the seed made it
    before, after = fresh.state_dict(), model.state_dict()
    assert [k for k in after if not torch.equal(after[k], before[k])] == ["features.1.0.weight" if "fast" in name
                                                                          else "conv1.weight"]
    # on 2,000 other training images, the first 8 outputs have unit variance and are uncorrelated:
    # measured 0.97-1.04 and |r| <= 0.025 (fast-cnn-centre-16), 0.98-1.04 and 0.017 (guide-cnn)
    held_out = images[10_000:]
    assert len(held_out) == SAMPLE_IMAGES and not torch.equal(held_out, images[:SAMPLE_IMAGES])
    out = F.conv2d(conv_inputs(model, conv, held_out), conv.weight[:8], None, conv.stride, conv.padding)
    flat = out.transpose(0, 1).reshape(8, -1)
    assert ((flat.var(1) > 0.9) & (flat.var(1) < 1.1)).all()
    assert (torch.corrcoef(flat) - torch.eye(8)).abs().max() < 0.06


def test_whitening_refuses_a_model_without_a_convolution():
    from mnist_classifier.models.whiten import whiten_first_conv

    with pytest.raises(UserError, match="no convolution"):
        whiten_first_conv(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), torch.zeros(4, 1, 28, 28))


def test_whitening_counts_a_bounded_number_of_patches_whatever_the_image_size(splits):
    """EfficientNet-Lite0 at 512 px sees 256 x 256 = 65,536 patches per image in its stride-2 stem: the start
    then reads 64 images (MAX_PATCHES), 8 at a time (CHUNK_PATCHES), not 2,000 at 500 (7 MB of patches per
    image: 3.5 GB per pass)."""
    from mnist_classifier.data import model_input
    from mnist_classifier.models.whiten import CHUNK_PATCHES, MAX_PATCHES, first_conv, whiten_first_conv

    model = build_model(ModelConfig(name="efficientnet-lite0", input_size=512))
    seen = []
    first_conv(model).register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    images = model_input(splits.train_images[:2000], (0.1307,), (0.3081,), torch.device("cpu"))
    assert 0 < whiten_first_conv(model, images) <= 32
    per_image = seen[0][-1] * seen[0][-2] // 4  # stride 2, padding keeps the half
    assert per_image == 65_536 and seen[0][0] == 1  # one image first, to learn the patch count
    assert max(s[0] for s in seen[1:]) == CHUNK_PATCHES // per_image == 8
    assert sum(s[0] for s in seen[1:]) == MAX_PATCHES // per_image == 64



def _with_flatten(channels_last_grad: bool, monkeypatch: pytest.MonkeyPatch, name: str = "fast-cnn-centre-16"
                  ) -> torch.nn.Module:
    """``name`` (seed 0, channels_last, training mode) whose head's flatten hands its gradient back in
    channels_last, or as ``nn.Flatten`` does."""
    monkeypatch.setattr(layout, "grad_in_channels_last",
                        GRAD_IN_CHANNELS_LAST if channels_last_grad else lambda x: False)
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name)).to(memory_format=torch.channels_last).train()


def _normalised(splits, n: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The first ``n`` training images as `mnist train` feeds them on a CPU (channels_last), and their labels."""
    from mnist_classifier.data import model_input

    return model_input(splits.train_images[:n], (0.1307,), (0.3081,), torch.device("cpu")), splits.train_labels[:n]


@pytest.mark.parametrize("name", ["fast-cnn-centre-16", "bn-cnn", "m5-cnn"])
@pytest.mark.parametrize("channels_last_grad", [True, False])
def test_the_heads_flatten_hands_a_channels_last_gradient_back_with_the_same_values(name, channels_last_grad, splits,
                                                                                    monkeypatch):
    """The head's flatten gave the last ReLU its gradient in (C, H, W) order while the ReLU's saved output was
    channels_last: torch's ReLU backward on two layouts took a slow path (484 against 20 µs at (256, 48, 3, 3)
    held to AVX2). ``layout.Flatten`` hands it back in channels_last; every parameter's gradient is the same,
    bit for bit, as with ``nn.Flatten``, since only where the values sit changes."""
    x, y = _normalised(splits, 32)
    model = _with_flatten(channels_last_grad, monkeypatch, name)
    strides = []
    last_relu = [m for m in model.features.modules() if isinstance(m, torch.nn.ReLU)][-1]

    def watch(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.register_hook(lambda g: strides.append(g.stride()))

    last_relu.register_forward_hook(watch)
    F.cross_entropy(model(x), y).backward()
    reference = _with_flatten(False, monkeypatch, name)
    # hooked alike: a hooked ReLU keeps torch's batch norm, not the fast models' batch norm kernel
    [m for m in reference.features.modules() if isinstance(m, torch.nn.ReLU)][-1].register_forward_hook(watch)
    F.cross_entropy(reference(x), y).backward()
    assert (strides[0][1] == 1) == channels_last_grad  # channels innermost, or (C, H, W) order as before
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), reference.parameters()))


def test_the_heads_flatten_can_be_differentiated_twice_and_steps_aside_under_torch_func(splits, monkeypatch):
    """Its backward is torch's operators, so an input-gradient penalty differentiates through it and gives what
    ``nn.Flatten`` gives; under torch.func's transforms (per-sample gradients) it steps aside, as the kernels do."""
    from torch.func import functional_call, grad, vmap

    x, y = _normalised(splits, 8)
    penalties = []
    for channels_last_grad in (True, False):
        model = _with_flatten(channels_last_grad, monkeypatch)
        inputs = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(F.cross_entropy(model(inputs), y), inputs, create_graph=True)
        gx.pow(2).sum().backward()
        penalties.append([p.grad for p in model.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*penalties))

    model = _with_flatten(True, monkeypatch).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (image[None],)), label[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    first = grad(loss)(params, x[0], y[0])
    assert all(torch.allclose(per_sample[k][0], first[k], rtol=1e-4, atol=1e-6) for k in params)
    batch = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)  # the whole batch at once
    F.cross_entropy(model(x), y).backward()
    assert all(torch.allclose(batch[k], p.grad, rtol=1e-4, atol=1e-6) for k, p in model.named_parameters())


@pytest.mark.parametrize("factor, shape, dtype", [
    (2, (256, 1, 28, 28), torch.float32), (2, (3, 5, 8, 12), torch.float32), (4, (3, 5, 8, 12), torch.bfloat16),
    (2, (2, 3, 6, 4), torch.float64),
])
@pytest.mark.parametrize("layout_of", ["contiguous", "channels_last", "centre crop"])
def test_the_pixel_unshuffle_as_one_copy_gives_torchs_values_and_gradients(factor, shape, dtype, layout_of):
    """``layout.PixelUnshuffle`` (the fast models' first layer) computes torch's ``pixel_unshuffle`` as a
    reshape, a permute and one copy on a CPU (56 against 308 µs at the fast models' crop, held to AVX2): the same
    values, in every input layout, and the same gradient."""
    torch.manual_seed(0)
    base = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout_of == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    elif layout_of == "centre crop":
        base = torch.nn.functional.pad(base, (2, 2, 2, 2))
    ours, theirs = base.clone().requires_grad_(True), base.clone().requires_grad_(True)

    def as_given(t: torch.Tensor) -> torch.Tensor:  # the crop a view, as fast-cnn-centre's forward hands it on
        return t[..., 2:-2, 2:-2] if layout_of == "centre crop" else t

    x = as_given(ours)
    assert layout_of != "centre crop" or not x.is_contiguous()  # a strided view, not a copy
    out, expected = layout.PixelUnshuffle(factor)(x), torch.nn.functional.pixel_unshuffle(as_given(theirs), factor)
    assert layout.unshuffle_as_copy(x, factor) and torch.equal(out, expected)
    weights = torch.randn(expected.shape, dtype=torch.float64).to(dtype)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)

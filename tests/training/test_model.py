"""The HRNet-C family: exact sizes, costs, shapes and trainability."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from training.info import count_macs, count_params
from training.model import ARCHS, canonical_arch, create_model

# Trainable parameters at 1000 classes. W48's figure is the official architecture's exact count;
# every entry also has to round to the published table (13.2M ... 128.1M).
EXACT_PARAMS = {
    "w18_small_v1": 13_187_464,
    "w18_small_v2": 15_597_464,
    "w18": 21_299_004,
    "w30": 37_712_220,
    "w32": 41_232_680,
    "w40": 57_557_160,
    "w44": 67_064_984,
    "w48": 77_469_864,
    "w64": 128_059_944,
}
PUBLISHED_MILLIONS = {
    "w18_small_v1": 13.2,
    "w18_small_v2": 15.6,
    "w18": 21.3,
    "w30": 37.7,
    "w32": 41.2,
    "w40": 57.6,
    "w44": 67.1,
    "w48": 77.5,
    "w64": 128.1,
}


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, nn.Cell]:
    ms.set_seed(0)
    return {arch: create_model(arch, 1000) for arch in ARCHS}


# Building all nine widths at 1000 classes takes ~50 s: every test that uses them is slow.
uses_imagenet_models = pytest.mark.slow


def test_registry_covers_every_published_width() -> None:
    assert set(ARCHS) == set(PUBLISHED_MILLIONS)


@uses_imagenet_models
@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_counts_match_the_official_architecture(imagenet_models: dict, arch: str) -> None:
    trainable, total = count_params(imagenet_models[arch])
    assert trainable == EXACT_PARAMS[arch]
    assert round(trainable / 1e6, 1) == PUBLISHED_MILLIONS[arch]
    assert total > trainable  # BatchNorm running statistics are parameters too, but not trainable


@uses_imagenet_models
def test_w48_state_dict_has_the_official_tensor_count(imagenet_models: dict) -> None:
    names = [p.name for p in imagenet_models["w48"].get_parameters()]
    assert len(names) == 1631
    for key in (
        "conv1.weight",
        "bn1.gamma",
        "layer1.0.downsample.0.weight",
        "transition1.1.0.0.weight",
        "stage2.0.branches.0.0.conv1.weight",
        "stage3.0.fuse_layers.2.0.1.1.moving_mean",
        "incre_modules.0.0.downsample.1.beta",
        "downsamp_modules.0.0.bias",
        "final_layer.0.bias",
        "classifier.weight",
    ):
        assert key in names


@uses_imagenet_models
def test_w48_macs_at_224_match_published_figures(imagenet_models: dict) -> None:
    macs = count_macs(imagenet_models["w48"], 224)
    # Counted once with hooks on a full 224-pixel pass; the proxy pass must reproduce it exactly.
    assert macs == 17_277_996_032
    for published in (16.1e9, 17.3e9):  # the paper, timm
        assert abs(macs - published) / published < 0.10


@uses_imagenet_models
def test_mac_count_rejects_sizes_hrnet_cannot_fuse(imagenet_models: dict) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        count_macs(imagenet_models["w18_small_v1"], 100)


@uses_imagenet_models
@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_at_64_gives_batch_by_classes(imagenet_models: dict, arch: str) -> None:
    net = imagenet_models[arch]
    net.set_train(False)
    out = net(ms.Tensor(np.random.default_rng(0).standard_normal((2, 3, 64, 64), dtype=np.float32)))
    assert out.shape == (2, 1000)
    assert np.isfinite(out.asnumpy()).all()


@pytest.mark.slow  # ~3 s: a 224-pixel forward pass
def test_forward_at_224_with_custom_class_count() -> None:
    net = create_model("w18_small_v1", num_classes=7)
    net.set_train(False)
    out = net(ms.Tensor(np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)))
    assert out.shape == (1, 7)


@pytest.mark.slow  # ~6 s: eval and training-mode passes
def test_batch_norm_uses_running_statistics_in_eval_and_batch_statistics_in_training() -> None:
    """The same image in two different batches: in eval mode its logits do not depend on its
    batch-mates (BatchNorm normalises with the running statistics); in training mode they do
    (each batch is normalised with its own statistics)."""
    ms.set_seed(2)
    net = create_model("w18_small_v1", num_classes=5)
    rng = np.random.default_rng(2)
    image = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    quiet = np.concatenate([image, 0.1 * rng.standard_normal((3, 3, 32, 32), dtype=np.float32)])
    loud = np.concatenate([image, 5.0 + 3.0 * rng.standard_normal((3, 3, 32, 32), dtype=np.float32)])

    def change_with_batch_mates() -> float:
        """How far the image's logits move between the two batches, relative to their size."""
        in_quiet, in_loud = net(ms.Tensor(quiet)).asnumpy()[0], net(ms.Tensor(loud)).asnumpy()[0]
        return float(np.abs(in_quiet - in_loud).max() / np.abs(in_quiet).max())

    net.set_train(False)
    # Measured 0 (same running statistics; a different batch may still sum in another order,
    # hence a float-rounding allowance far above 1e-7 and far below the training-mode change).
    assert change_with_batch_mates() < 1e-3
    net.set_train(True)
    assert change_with_batch_mates() > 0.1  # measured 1.4: the batch statistics differ widely


@pytest.mark.slow  # ~16 s: five training steps
def test_a_training_step_changes_weights_and_lowers_the_loss() -> None:
    ms.set_seed(3)
    net = create_model("w18_small_v1", num_classes=4)
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    optimizer = nn.Momentum(net.trainable_params(), learning_rate=0.01, momentum=0.9)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), optimizer)
    step.set_train(True)
    rng = np.random.default_rng(3)
    x = ms.Tensor(rng.standard_normal((8, 3, 32, 32), dtype=np.float32))
    y = ms.Tensor(np.arange(8, dtype=np.int32) % 4)
    before = net.classifier.weight.asnumpy().copy()
    losses = [float(step(x, y).asnumpy()) for _ in range(5)]
    assert not np.allclose(before, net.classifier.weight.asnumpy())
    assert losses[-1] < 0.7 * losses[0]  # measured 0.27 (1.50 -> 0.40): 2.6x inside the bound


@pytest.mark.parametrize(
    ("alias", "arch"),
    [("W48", "w48"), ("hrnet_w48", "w48"), ("w48", "w48"), ("hrnet_w18_small", "w18_small_v1")],
)
def test_architecture_aliases(alias: str, arch: str) -> None:
    assert canonical_arch(alias) == arch


def test_unknown_architecture_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'w99'"):
        canonical_arch("w99")
    with pytest.raises(ValueError, match="num_classes"):
        create_model("w18_small_v1", num_classes=0)

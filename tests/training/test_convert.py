"""Weights conversion: official/timm key names <-> MindSpore, strict and loud about every bad key.

With PyTorch installed, an independent PyTorch implementation of the official HRNet-C (written
here from the architecture description, not imported from anywhere) produces the official state
dict; it is converted through `hrnet convert` and the logits of both frameworks are compared,
then our checkpoint goes back to PyTorch through `--to-official` and loads strictly.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from core.metadata import ModelMetadata
from hrnet.cli import main
from training.checkpoint import load_into, read_checkpoint, save_checkpoint
from training.convert import ConversionError, convert_official, name_table, to_official
from training.model import ARCHS, create_model

pytestmark = pytest.mark.slow  # builds W48 and official PyTorch networks and converts their weights

ARCH = "w18_small_v1"
CLASSES = 10
META = ModelMetadata(
    arch=ARCH, num_classes=CLASSES, input_size=64, labels=tuple(f"c{i}" for i in range(CLASSES))
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(
        create_model(ARCH, CLASSES), tmp_path_factory.mktemp("ckpt") / "ours.ckpt", META, step=5
    )


@pytest.fixture(scope="module")
def official(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return to_official(ckpt, tmp_path_factory.mktemp("official") / "official.safetensors")


def test_to_official_uses_the_official_key_names(official):
    keys = set(load_file(str(official)))
    for key in (
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.downsample.0.weight",
        "transition1.1.0.0.weight",
        "stage3.0.fuse_layers.2.0.1.1.weight",
        "stage2.0.branches.0.0.conv1.weight",
        "incre_modules.0.0.downsample.1.bias",
        "downsamp_modules.0.0.bias",
        "final_layer.0.bias",
        "classifier.weight",
        "classifier.bias",
    ):
        assert key in keys, key
    assert not any(k.endswith((".gamma", ".beta", ".moving_mean", ".moving_variance")) for k in keys)


def test_round_trip_gives_identical_tensors(ckpt, official, tmp_path):
    back = convert_official(official, ARCH, tmp_path / "back.ckpt")
    before, after = read_checkpoint(ckpt), read_checkpoint(back)
    assert after.metadata == before.metadata  # the card travels in the safetensors header
    assert set(after.params) == set(before.params)
    for name, param in before.params.items():
        np.testing.assert_array_equal(after.params[name].asnumpy(), param.asnumpy(), err_msg=name)


def test_w48_has_the_official_tensor_count():
    assert len(name_table(create_model("w48"))) == 1631


def _tampered(official: Path, tmp_path: Path, edit) -> Path:
    tensors = load_file(str(official))
    edit(tensors)
    path = tmp_path / "tampered.safetensors"
    save_file(tensors, str(path))
    return path


def test_renamed_key_is_named(official, tmp_path, capsys):
    def rename(t):
        t["stage2.0.branches.1.0.bn2.wieght"] = t.pop("stage2.0.branches.1.0.bn2.weight")

    bad = _tampered(official, tmp_path, rename)
    with pytest.raises(ConversionError) as err:
        convert_official(bad, ARCH, tmp_path / "x.ckpt")
    assert "1 missing (stage2.0.branches.1.0.bn2.weight)" in str(err.value)
    assert "1 unexpected (stage2.0.branches.1.0.bn2.wieght)" in str(err.value)
    assert main(["convert", "--from", str(bad), "--arch", ARCH, "--out", str(tmp_path / "x.ckpt")]) == 2
    assert "1 missing (stage2.0.branches.1.0.bn2.weight)" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_wrong_shape_is_named(official, tmp_path):
    def shrink(t):
        t["final_layer.0.weight"] = t["final_layer.0.weight"][:, :512]

    with pytest.raises(
        ConversionError, match=r"1 of another shape \(final_layer\.0\.weight: file \(2048, 512, 1, 1\)"
    ):
        convert_official(_tampered(official, tmp_path, shrink), ARCH, tmp_path / "x.ckpt")


def test_num_classes_must_match_the_classifier(official, tmp_path):
    with pytest.raises(ConversionError) as err:
        convert_official(official, ARCH, tmp_path / "x.ckpt", num_classes=5)
    assert "2 of another shape (classifier.weight: file" in str(err.value) and "classifier.bias: " in str(
        err.value
    )


def test_a_wrong_architecture_is_summarised_with_the_cards_hint(official, tmp_path, capsys):
    code = main(
        ["convert", "--from", str(official), "--arch", "w18_small_v2", "--out", str(tmp_path / "x.ckpt")]
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(line) < 2000  # was one 79 KB line listing ~1,500 problems
    assert re.search(r"error: \d+ problem\(s\) mapping the weights: \d+ missing \(layer1\.1\.", line)
    assert re.search(r"\d+ of another shape \(layer1\.0\.conv1\.weight: file", line)
    assert re.search(r", and \d+ more\)", line)
    assert line.endswith("(as w18_small_v2; the file's model card says w18_small_v1: leave out --arch)")
    assert not (tmp_path / "x.ckpt").exists()


def test_our_own_safetensors_need_no_arch_and_no_out(official, tmp_path, capsys):
    src = tmp_path / "ours.safetensors"
    shutil.copy(official, src)
    assert main(["convert", "--from", str(src)]) == 0
    out = tmp_path / "ours.ckpt"
    assert capsys.readouterr().out.strip() == str(out)
    assert read_checkpoint(out).metadata.arch == ARCH
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(official)), str(foreign))  # the same tensors without our model card
    assert main(["convert", "--from", str(foreign)]) == 2
    assert "carries no model card: give its architecture with --arch" in capsys.readouterr().err


def test_cli_round_trip_and_force(ckpt, tmp_path, capsys):
    st = tmp_path / "w.safetensors"
    assert main(["convert", "--from", str(ckpt), "--to-official", str(st)]) == 0
    assert main(["convert", "--from", str(ckpt), "--to-official", str(st)]) == 2
    assert "pass --force" in capsys.readouterr().err
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"name {i}" for i in range(CLASSES)) + "\n", encoding="utf-8")
    out = tmp_path / "m.ckpt"
    assert (
        main(
            [
                "convert",
                "--from",
                str(st),
                "--arch",
                "hrnet_w18_small",
                "--out",
                str(out),
                "--labels",
                str(labels),
            ]
        )
        == 0
    )
    assert read_checkpoint(out).metadata.label(3) == "name 3"


def test_pth_without_torch_is_a_clear_error(tmp_path):
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        pytest.skip("torch is installed")
    pth = tmp_path / "w.pth"
    pth.write_bytes(b"not really")
    with pytest.raises(ConversionError, match="needs PyTorch"):
        convert_official(pth, ARCH, tmp_path / "x.ckpt")


class _Payload:
    """Unpickling this runs code: what a hostile .pth file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_pth_that_would_run_code_is_refused_unrun(tmp_path):
    """.pth files are read with weights_only=True: only tensors and plain containers unpickle."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    pth = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": _Payload(marker)}, pth)
    with pytest.raises(ConversionError, match="is not a loadable PyTorch state dict"):
        convert_official(pth, ARCH, tmp_path / "x.ckpt")
    assert not marker.exists()


# ---- with PyTorch: an independent implementation of the official architecture ----


def torch_hrnet(arch: str, classes: int):
    """HRNet-C in plain PyTorch with the official module names (conv1, layer1, transitionN, stageN, ...)."""
    torch = pytest.importorskip("torch")
    tnn = torch.nn
    spec = ARCHS[arch]

    def bn(c):
        return tnn.BatchNorm2d(c)

    class Basic(tnn.Module):
        expansion = 1

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = bn(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = bn(planes)
            self.downsample = downsample

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

    class Bottle(tnn.Module):
        expansion = 4

        def __init__(self, cin, planes, stride=1, downsample=None):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = bn(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = bn(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = bn(planes * 4)
            self.downsample = downsample

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(y)))))
            return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))

    blocks = {"BASIC": Basic, "BOTTLENECK": Bottle}

    def layer(block, cin, planes, count):
        ds = None
        if cin != planes * block.expansion:
            ds = tnn.Sequential(
                tnn.Conv2d(cin, planes * block.expansion, 1, bias=False), bn(planes * block.expansion)
            )
        return tnn.Sequential(
            block(cin, planes, 1, ds), *[block(planes * block.expansion, planes) for _ in range(1, count)]
        )

    class Module(tnn.Module):
        def __init__(self, block, counts, cins, chans):
            super().__init__()
            self.branches = tnn.ModuleList(
                [layer(block, cins[i], chans[i], counts[i]) for i in range(len(chans))]
            )
            self.outs = [c * block.expansion for c in chans]
            n, o = len(chans), self.outs
            rows = []
            for i in range(n):
                row = []
                for j in range(n):
                    if j > i:
                        up = tnn.Upsample(scale_factor=2 ** (j - i), mode="nearest")
                        row.append(tnn.Sequential(tnn.Conv2d(o[j], o[i], 1, bias=False), bn(o[i]), up))
                    elif j == i:
                        row.append(tnn.Identity())
                    else:
                        steps = []
                        for k in range(i - j):
                            last = k == i - j - 1
                            cout = o[i] if last else o[j]
                            parts = [tnn.Conv2d(o[j], cout, 3, 2, 1, bias=False), bn(cout)]
                            steps.append(tnn.Sequential(*parts, *([] if last else [tnn.ReLU()])))
                        row.append(tnn.Sequential(*steps))
                rows.append(tnn.ModuleList(row))
            self.fuse_layers = tnn.ModuleList(rows) if n > 1 else None

        def forward(self, xs):
            xs = [b(x) for b, x in zip(self.branches, xs, strict=True)]
            if self.fuse_layers is None:
                return xs
            return [torch.relu(sum(f(x) for f, x in zip(row, xs, strict=True))) for row in self.fuse_layers]

    def transition(pre, cur):
        out = []
        for i, c in enumerate(cur):
            if i < len(pre):
                same = c == pre[i]
                out.append(
                    tnn.Identity()
                    if same
                    else tnn.Sequential(tnn.Conv2d(pre[i], c, 3, 1, 1, bias=False), bn(c), tnn.ReLU())
                )
            else:
                chain = []
                for k in range(i + 1 - len(pre)):
                    cout = c if k == i - len(pre) else pre[-1]
                    chain.append(
                        tnn.Sequential(tnn.Conv2d(pre[-1], cout, 3, 2, 1, bias=False), bn(cout), tnn.ReLU())
                    )
                out.append(tnn.Sequential(*chain))
        return tnn.ModuleList(out)

    def stage(s, cins):
        mods = []
        for _ in range(s.num_modules):
            mods.append(Module(blocks[s.block], s.num_blocks, cins, s.num_channels))
            cins = mods[-1].outs
        return tnn.Sequential(*mods), cins

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 3, 2, 1, bias=False)
            self.bn1 = bn(64)
            self.conv2 = tnn.Conv2d(64, 64, 3, 2, 1, bias=False)
            self.bn2 = bn(64)
            b1 = blocks[spec.stage1.block]
            self.layer1 = layer(b1, 64, spec.stage1.num_channels[0], spec.stage1.num_blocks[0])
            chans = [spec.stage1.num_channels[0] * b1.expansion]
            self.transition1 = transition(chans, spec.stage2.num_channels)
            self.stage2, chans = stage(spec.stage2, list(spec.stage2.num_channels))
            self.transition2 = transition(chans, spec.stage3.num_channels)
            self.stage3, chans = stage(spec.stage3, list(spec.stage3.num_channels))
            self.transition3 = transition(chans, spec.stage4.num_channels)
            self.stage4, chans = stage(spec.stage4, list(spec.stage4.num_channels))
            head = [32, 64, 128, 256]
            self.incre_modules = tnn.ModuleList([layer(Bottle, c, head[i], 1) for i, c in enumerate(chans)])
            self.downsamp_modules = tnn.ModuleList(
                [
                    tnn.Sequential(
                        tnn.Conv2d(head[i] * 4, head[i + 1] * 4, 3, 2, 1), bn(head[i + 1] * 4), tnn.ReLU()
                    )
                    for i in range(3)
                ]
            )
            self.final_layer = tnn.Sequential(tnn.Conv2d(1024, 2048, 1), bn(2048), tnn.ReLU())
            self.classifier = tnn.Linear(2048, classes)

        @staticmethod
        def _next(trans, ys):
            # official semantics: an unchanged branch passes through, a new one grows from the lowest
            return [
                ys[i] if isinstance(t, tnn.Identity) else t(ys[-1] if i >= len(ys) else ys[i])
                for i, t in enumerate(trans)
            ]

        def forward(self, x):
            x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
            x = self.layer1(x)
            ys = self.stage2([t(x) for t in self.transition1])
            ys = self.stage3(self._next(self.transition2, ys))
            ys = self.stage4(self._next(self.transition3, ys))
            y = self.incre_modules[0](ys[0])
            for i in range(1, 4):
                y = self.incre_modules[i](ys[i]) + self.downsamp_modules[i - 1](y)
            y = self.final_layer(y)
            return self.classifier(y.mean(dim=(2, 3)))

    return Net()


def calibrated_torch_model(arch: str, classes: int, size: int):
    """Running statistics taken from one random batch, so that the logits depend on the image."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch_hrnet(arch, classes)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    torch.nn.init.normal_(model.classifier.weight, std=0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size))
    return model.eval()


def test_official_pytorch_weights_convert_and_agree(tmp_path):
    torch = pytest.importorskip("torch")
    size = 64
    model = calibrated_torch_model(ARCH, CLASSES, size)
    state = model.state_dict()
    ours = name_table(create_model(ARCH, CLASSES))
    official_keys = {k for k in state if not k.endswith("num_batches_tracked")}
    assert official_keys == set(ours)
    assert all(tuple(state[k].shape) == tuple(p.shape) for k, p in ours.items())

    pth = tmp_path / "hrnet_w18_small_v1.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}}, pth
    )  # a DataParallel training file
    out = tmp_path / "converted.ckpt"
    assert main(["convert", "--from", str(pth), "--arch", ARCH, "--out", str(out)]) == 0

    loaded = read_checkpoint(out)
    net = create_model(ARCH, CLASSES)
    load_into(net, loaded.params)
    net.set_train(False)
    images = np.random.default_rng(5).standard_normal((4, 3, size, size)).astype(np.float32)
    ms_logits = net(ms.Tensor(images)).asnumpy()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images)).numpy()
    bound = 1e-4 * max(1.0, float(np.abs(torch_logits).max()))
    assert np.abs(ms_logits - torch_logits).max() <= bound
    np.testing.assert_array_equal(ms_logits.argmax(1), torch_logits.argmax(1))
    assert len(set(torch_logits.argmax(1).tolist())) > 1

    back = to_official(out, tmp_path / "back.safetensors")
    fresh = torch_hrnet(ARCH, CLASSES).eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(back)).items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.from_numpy(images)).numpy(), torch_logits, rtol=0, atol=1e-6)

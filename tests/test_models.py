"""Feature shapes of every architecture and stem, connectors, the frozen teacher, teacher weights."""
import urllib.error

import pytest
import torch
import torchvision

from fastcd.config import TeacherConfig, config_from_dict
from fastcd.errors import FastcdError
from fastcd.models import ARCHS, StudentWithConnectors, build_resnet, freeze
from fastcd.models.teacher import load_teacher
from fastcd.utils.checkpoint import save_checkpoint

EXPANSION = {"resnet18": 1, "resnet34": 1, "resnet50": 4, "resnet152": 4}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("stem,side,first", [("imagenet", 64, 16), ("cifar", 32, 32)])
def test_feature_shapes(arch, stem, side, first):
    width = 0.125
    net = build_resnet(arch, num_classes=7, stem=stem, width=width)
    out = net(torch.randn(2, 3, side, side))
    for i, f in enumerate(out.feats):
        channels = round(64 * 2**i * width) * EXPANSION[arch]
        assert f.shape == (2, channels, first // 2**i, first // 2**i)
    assert net.stage_channels == [f.shape[1] for f in out.feats]
    assert out.embed.shape == (2, net.stage_channels[-1]) and out.logits.shape == (2, 7)


def test_full_width_matches_torchvision_parameters():
    ours, theirs = build_resnet("resnet18").state_dict(), torchvision.models.resnet18().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("student,teacher,expected", [
    ("resnet18", "resnet34", [(64, 64), (128, 128), (256, 256), (512, 512)]),
    ("resnet50", "resnet152", [(256, 256), (512, 512), (1024, 1024), (2048, 2048)]),
    ("resnet18", "resnet50", [(64, 256), (128, 512), (256, 1024), (512, 2048)]),
])
def test_connectors_map_student_to_teacher_channels(student, teacher, expected):
    t = build_resnet(teacher, width=1.0)
    pair = StudentWithConnectors(build_resnet(student, width=1.0), t.stage_channels, range(4))
    got = [(c[0].in_channels, c[0].out_channels) for c in pair.connectors.values()]
    assert got == expected
    assert all(c[0].bias is None and isinstance(c[1], torch.nn.BatchNorm2d) for c in pair.connectors.values())
    assert list(pair.state_dict())[-1].startswith("connectors.3.")  # the names of a ModuleList, as saved before


def test_only_the_connectors_asked_for_are_built_and_run():
    t = build_resnet("resnet34", 10, "cifar", 0.125)
    pair = StudentWithConnectors(build_resnet("resnet18", 10, "cifar", 0.125), t.stage_channels, [2])
    _, conn = pair(torch.randn(2, 3, 16, 16))
    assert list(pair.connectors) == ["2"] and [c is None for c in conn] == [True, True, False, True]
    _, none = StudentWithConnectors(build_resnet("resnet18", 10, "cifar", 0.125), None)(torch.randn(2, 3, 16, 16))
    assert none is None


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_teacher_is_frozen(bn_mode):
    teacher = freeze(build_resnet("resnet34", 10, "cifar", 0.125), bn_mode)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pair = StudentWithConnectors(build_resnet("resnet18", 10, "cifar", 0.125), teacher.stage_channels, range(4))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        t = teacher(x)
    out, conn = pair(x)
    loss = sum((c.mean((2, 3)) - f.mean((2, 3))).pow(2).mean() for c, f in zip(conn, t.feats)) + out.logits.sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert teacher.training == (bn_mode == "train")
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, before[k])]
    assert (changed == []) == (bn_mode == "eval")  # train mode updates running stats, like the original


def _fastcd_checkpoint(path, arch, width=0.125, num_classes=10):
    cfg = config_from_dict({"student": {"arch": arch, "stem": "cifar", "width": width, "num_classes": num_classes},
                            "teacher": None})
    net = build_resnet(arch, num_classes, "cifar", width)
    save_checkpoint(path, {"config": cfg.to_dict(), "model": net.state_dict()})
    return net


def test_teacher_from_checkpoint(tmp_path):
    net = _fastcd_checkpoint(tmp_path / "t.pt", "resnet34")
    teacher = load_teacher(TeacherConfig("resnet34", "cifar", 0.125, 10, weights=str(tmp_path / "t.pt")))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(teacher.eval()(x).logits, net.eval()(x).logits)


def test_teacher_checkpoint_of_wrong_architecture_is_an_error(tmp_path):
    _fastcd_checkpoint(tmp_path / "t.pt", "resnet18")
    with pytest.raises(FastcdError, match="arch 'resnet18' \\(config wants 'resnet34'\\)"):
        load_teacher(TeacherConfig("resnet34", "cifar", 0.125, 10, weights=str(tmp_path / "t.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastcdError, match="junk.pt' is not a fastcd checkpoint"):
        load_teacher(TeacherConfig("resnet34", "cifar", 0.125, 10, weights=str(tmp_path / "junk.pt")))


def test_torchvision_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FastcdError, match="could not download resnet34 weights IMAGENET1K_V1.*TORCH_HOME"):
        load_teacher(TeacherConfig("resnet34"))
    with pytest.raises(FastcdError, match="needs width 1"):
        load_teacher(TeacherConfig("resnet34", width=0.5))
    with pytest.raises(FastcdError, match="no weights 'IMAGENET9K'"):
        load_teacher(TeacherConfig("resnet34", weights="torchvision:IMAGENET9K"))

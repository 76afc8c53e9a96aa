"""Architectures: shapes, the exposed penultimate features, normalisation inside the model, probe layers."""

import pytest
import torch

from ncpipe.models import ARCHS, build_model

CASES = [
    # (arch, in_channels, size, stem, probes)
    ("vgg11bn", 3, 32, "cifar", 8),
    ("vgg11bn", 1, 28, "cifar", 8),
    ("preactresnet18", 3, 32, "cifar", 7),
    ("vgg11bn", 3, 160, "imagenet", 8),
    ("preactresnet18", 3, 160, "imagenet", 7),
]


def _model(arch: str, c: int, stem: str, width: float = 0.125, classes: int = 10):
    torch.manual_seed(0)
    return build_model(arch, num_classes=classes, in_channels=c, mean=[0.5] * c, std=[0.25] * c, width=width,
                       stem=stem).eval()


@pytest.mark.parametrize(("arch", "c", "size", "stem", "n_probes"), CASES)
def test_forward_features_and_logits(arch, c, size, stem, n_probes):
    m = _model(arch, c, stem)
    x = torch.rand(2, c, size, size)
    h, logits = m.forward_features(x)
    assert h.shape == (2, m.feature_dim)
    assert logits.shape == (2, 10)
    # the classifier is exactly a linear map of the exposed features
    torch.testing.assert_close(logits, m.linear(h))
    torch.testing.assert_close(m(x), logits)
    assert len(m.probe_layers()) == n_probes


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_paper_width_has_512_features(arch):
    m = _model(arch, 3, "cifar", width=1.0)
    assert m.feature_dim == 512


def test_normalisation_lives_in_the_model():
    """Pixels go in raw ([0, 1]); shifting the model's mean buffer must change the output."""
    m = _model("vgg11bn", 3, "cifar")
    x = torch.rand(4, 3, 32, 32)
    before = m(x)
    m.normalize.mean.add_(0.1)
    assert not torch.allclose(before, m(x))


def test_unknown_arch_names_the_choices():
    with pytest.raises(KeyError, match="preactresnet18"):
        build_model("resnet50", num_classes=10, in_channels=3, mean=[0.0] * 3, std=[1.0] * 3)


def test_probe_outputs_shrink_towards_the_head():
    """Probes run shallow to deep: every probe fires and the last VGG probe is the pre-pool feature map."""
    m = _model("vgg11bn", 3, "cifar")
    outs: list[torch.Size] = []
    hooks = [mod.register_forward_hook(lambda _m, _i, o: outs.append(o.shape)) for _, mod in m.probe_layers()]
    m(torch.rand(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(outs) == 8
    assert outs[-1][1] == m.feature_dim

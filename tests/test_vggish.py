"""VGGish backbone against torchvggish's VGG with the same (random) weights."""

import numpy as np
import pytest
import torch
from torchvggish.torchvggish import VGG, make_layers

from mtt.features.frontend import log_mel_patches
from mtt.models.vggish import VGGish, freeze, load_torchvggish_state_dict


@pytest.fixture(scope="module")
def reference():
    """torchvggish's full-size VGG with seeded random weights (postprocess=False: no download)."""
    torch.manual_seed(0)
    ref = VGG(make_layers(), postprocess=False).eval()
    with torch.no_grad():  # larger than default init so the 128-d output is not all zero
        for p in ref.parameters():
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.1)
    return ref


@pytest.fixture(scope="module")
def patches():
    return torch.randn(3, 96, 64, generator=torch.Generator().manual_seed(1)) * 2


def test_published_layout_loads_and_matches_torchvggish(reference, patches):
    ours = VGGish(embeddings=True).eval()
    assert ours.state_dict().keys() == reference.state_dict().keys()
    load_torchvggish_state_dict(ours, reference.state_dict())
    with torch.no_grad():
        ref_map = reference.features(patches[:, None])
        ref_emb = reference(patches[:, None])
        our_map, our_emb = ours(patches), ours.embed(patches)
    assert our_map.shape == (3, 512, 6, 4) and ours.out_channels == 512
    assert (our_map - ref_map).abs().max() <= 1e-5
    assert our_emb.shape == (3, 128) and (ref_emb > 0).sum() > 10  # a comparison of non-zeros
    assert (our_emb - ref_emb).abs().max() <= 1e-5


def test_embedding_relu_flag(reference, patches):
    ours = VGGish(embeddings=True, embedding_relu=False).eval()
    load_torchvggish_state_dict(ours, reference.state_dict())
    with torch.no_grad():
        raw, ref_emb = ours.embed(patches), reference(patches[:, None])
    assert (raw < 0).any()  # Google's TF reference: no ReLU on the embedding
    assert (raw.clamp(min=0) - ref_emb).abs().max() <= 1e-5


def test_conv_only_model_ignores_embeddings_in_file(reference, patches):
    ours = VGGish().eval()
    load_torchvggish_state_dict(ours, reference.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(patches), reference.features(patches[:, None]))
    with pytest.raises(RuntimeError, match="embeddings=True"):
        ours.embed(patches)


def test_wrong_width_or_keys_fail_clearly(reference):
    with pytest.raises(ValueError, match=r"shape mismatches: \['features.0.weight.*width=1.0"):
        load_torchvggish_state_dict(VGGish(width=0.5), reference.state_dict())
    bad = {k: v for k, v in reference.state_dict().items() if k != "features.0.bias"}
    bad["features.99.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError,
        match=r"missing keys: \['features.0.bias'\].*unexpected keys: "
        r"\['features.99.weight'\]",
    ):
        load_torchvggish_state_dict(VGGish(), bad)


def test_narrow_model_shapes_and_conv_layers():
    model = VGGish(width=0.125)
    assert model.out_channels == 64
    assert [c.out_channels for c in model.conv_layers] == [8, 16, 32, 32, 64, 64]
    x = log_mel_patches(np.random.default_rng(0).standard_normal(int(29.1 * 16000)), 16000)
    assert x.shape == (30, 96, 64)
    assert model(x).shape == (30, 64, 6, 4)
    with pytest.raises(ValueError, match=r"\(30, 1, 96, 64\)"):
        model(x[:, None])


@pytest.mark.parametrize("n", range(7))
def test_freeze_leaves_exactly_the_last_n_convs_trainable(n):
    model = VGGish(width=0.125)
    freeze(model, finetune_last=n)
    trainable = [c for c in model.conv_layers if c.weight.requires_grad]
    assert trainable == model.conv_layers[6 - n :]
    assert all(p.requires_grad == (c in trainable) for c in model.conv_layers for p in c.parameters())
    assert sum(p.requires_grad for p in model.parameters()) == 2 * n
    out = model(torch.randn(2, 96, 64))
    assert out.requires_grad == (n > 0)
    if n > 0:  # gradients reach only the trainable convs
        out.sum().backward()
        assert all((c.weight.grad is not None) == (c in trainable) for c in model.conv_layers)


def test_freeze_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 6\], got 7"):
        freeze(VGGish(width=0.125), finetune_last=7)

import pytest
import torch

from megatron_m6.model import M6, target_loss
from megatron_m6.model.resnet import ResNetFeatures
from tests.conftest import random_batch, tiny_config


def run(model, batch):
    return model(batch["tokens"], batch["prefix_len"], batch["valid_len"], batch["images"], batch["has_image"])


@pytest.mark.parametrize("overrides", [
    {},
    {"position_embedding_type": "rope"},
    {"untie_embeddings_and_output_weights": True},
    {"num_experts": 4, "moe_router_topk": 2},
    {"num_experts": 4, "moe_router_topk": 1, "moe_capacity_factor": 1.0, "moe_layer_freq": 2},
    {"num_experts": 4, "moe_router_topk": 2, "moe_expert_prototypes": 2, "moe_z_loss_coeff": 1e-3},
])
def test_forward_backward_reaches_every_parameter(overrides):
    cfg = tiny_config(**overrides)
    model = M6(cfg)
    batch = random_batch(cfg)
    logits, aux = run(model, batch)
    assert logits.shape == (4, 32, cfg.vocab_size)
    loss = target_loss(logits, batch["labels"], batch["loss_mask"]) / batch["loss_mask"].sum() + aux
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if cfg.position_embedding_type == "rope":
        assert not hasattr(model.embedding, "pos_emb")
    assert no_grad == [], no_grad


# What the mask hides leaves the logits unchanged but for rounding: in float64 that is ~1e-16
# relative on logits of order 1, so 1e-12 is far below the ~1e-2 a visible token changes.
HIDDEN_ATOL = 1e-12


def test_prefix_is_bidirectional_and_target_causal():
    """Changing a target token must not change logits at earlier positions; changing a late
    prefix token must change logits at earlier prefix positions; padding changes nothing."""
    cfg = tiny_config()
    model = M6(cfg).double().eval()
    batch = random_batch(cfg, batch=1)
    batch["images"] = batch["images"].double()
    batch["has_image"][:] = False
    batch["prefix_len"][:] = 10
    batch["valid_len"][:] = 20
    base, _ = run(model, batch)
    t = dict(batch, tokens=batch["tokens"].clone())
    t["tokens"][0, 15] = (t["tokens"][0, 15] + 1) % cfg.vocab_size
    changed, _ = run(model, t)
    assert torch.allclose(changed[0, :15], base[0, :15], rtol=0, atol=HIDDEN_ATOL)
    assert not torch.allclose(changed[0, 15:20], base[0, 15:20])
    p = dict(batch, tokens=batch["tokens"].clone())
    p["tokens"][0, 9] = (p["tokens"][0, 9] + 1) % cfg.vocab_size
    changed, _ = run(model, p)
    assert not torch.allclose(changed[0, 0], base[0, 0])
    pad = dict(batch, tokens=batch["tokens"].clone())
    pad["tokens"][0, 25] = (pad["tokens"][0, 25] + 1) % cfg.vocab_size
    changed, _ = run(model, pad)
    assert torch.allclose(changed[0, :20], base[0, :20], rtol=0, atol=HIDDEN_ATOL)


def test_image_placeholders_carry_the_image():
    cfg = tiny_config()
    model = M6(cfg).double().eval()
    batch = random_batch(cfg, batch=2)
    batch["images"] = batch["images"].double()
    base, _ = run(model, batch)
    other = dict(batch, images=torch.randn_like(batch["images"]))
    changed, _ = run(model, other)
    assert not torch.allclose(changed[0], base[0])  # sample 0 has an image
    assert torch.allclose(changed[1], base[1], rtol=0, atol=HIDDEN_ATOL)  # sample 1 is text only


def test_tied_head_shares_the_embedding():
    model = M6(tiny_config())
    assert model.lm_head.weight is model.embedding.word_emb.weight
    untied = M6(tiny_config(untie_embeddings_and_output_weights=True))
    assert untied.lm_head.weight.data_ptr() != untied.embedding.word_emb.weight.data_ptr()


def test_tiny_model_overfits_one_batch():
    cfg = tiny_config(hidden_size=64, ffn_hidden_size=128)
    model = M6(cfg)
    batch = random_batch(cfg, batch=4, seq=24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    targets = batch["loss_mask"].sum()
    first = None
    for _ in range(150):
        logits, _ = run(model, batch)
        loss = target_loss(logits, batch["labels"], batch["loss_mask"]) / targets
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # From ln(101) = 4.62 (near-zero logits at init); memorising reaches 0.05 by step ~50 and
    # 0.0070 at step 150 (1 and 2 threads agree to 1e-8), so the bound has 100 steps to spare.
    assert first > 4.0 and loss.item() < 0.05, (first, loss.item())


def test_resnet50_matches_torchvision_layout():
    """torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in its classifier."""
    with torch.device("meta"):
        net = ResNetFeatures((3, 4, 6, 3), bottleneck=True, width=64)
    assert sum(p.numel() for p in net.parameters()) == 25_557_032 - 2_049_000
    names = dict(net.state_dict())
    for key, shape in [("conv1.weight", (64, 3, 7, 7)), ("layer1.0.downsample.0.weight", (256, 64, 1, 1)),
                       ("layer2.0.conv2.weight", (128, 128, 3, 3)), ("layer4.2.bn3.running_var", (2048,)),
                       ("layer3.5.conv3.weight", (1024, 256, 1, 1)), ("bn1.num_batches_tracked", ())]:
        assert tuple(names[key].shape) == shape
    assert net.out_channels == 2048


def test_resnet_loads_a_torchvision_style_state_dict_and_rejects_others():
    net = ResNetFeatures((1, 1, 1, 1), bottleneck=False, width=8)
    state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in net.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 64), torch.randn(1000)
    fresh = ResNetFeatures((1, 1, 1, 1), bottleneck=False, width=8)
    fresh.load_torchvision_state_dict(state)
    assert torch.equal(fresh.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])
    del state["layer1.0.bn1.weight"]
    with pytest.raises(ValueError, match="missing"):
        fresh.load_torchvision_state_dict(state)

"""bf16 against fp32 (issue 13): every attention family's logits and gradients, a short training run, and the
defaults. bf16 autocast is the default where the hardware has bf16 matmul units (train.bf16_is_fast)."""
import json

import pytest
import torch
import torch.nn.functional as F

import train
import runtime
from model import CATConfig, build_model

FAMILIES = {"cross_axis": dict(pos="cat"), "softmax": dict(pos="ape", mlp_ratio=4.0, imprint="none"),
            "performer": dict(pos="ape", mlp_ratio=4.0, imprint="none", performer_features=32),
            "swin": dict(pos="rpb", patch=4, stages=(2, 2), window=7, mlp_ratio=4.0)}


def logits_and_gradients(config, res, amp):
    torch.manual_seed(0)
    model = build_model(config)
    torch.manual_seed(1)
    images, labels = torch.randn(1, 3, res, res), torch.tensor([3])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits = model(images).float()
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.slow
@pytest.mark.parametrize("res", [224, 768])
@pytest.mark.parametrize("attn", list(FAMILIES))
def test_bf16_follows_fp32(attn, res):
    """Relative error of the logits and of all gradients together: 0.3-0.7% measured, about bf16's unit
    roundoff (2^-8 = 0.4%): what rounding each matmul's output once costs, far below the noise of a minibatch
    gradient. The gradients point the same way (cosine > 0.9999)."""
    if attn == "swin" and res == 768:
        res = 448                                     # the same 2-stage Swin at 768 px would take seconds more
    config = CATConfig(img_size=res, dim=32, depth=2, heads=2, num_classes=10, attn=attn, **FAMILIES[attn])
    (logits32, grads32), (logits16, grads16) = (logits_and_gradients(config, res, amp) for amp in (False, True))
    assert torch.isfinite(logits16).all() and torch.isfinite(grads16).all()
    assert (logits16 - logits32).norm() / logits32.norm() < 0.02
    assert (grads16 - grads32).norm() / grads32.norm() < 0.02
    assert F.cosine_similarity(grads16, grads32, dim=0) > 0.9999


@pytest.mark.slow
def test_bf16_training_follows_the_fp32_loss_curve(tmp_path):
    """30 steps at 64 px: the bf16 run's losses stay within 0.03 of the fp32 run's (at 32 px: at most ~0.01)."""
    losses = {}
    for amp in ("--amp", "--no-amp"):
        out = tmp_path / amp
        assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "64", "--shapes-size", "512",
                           "--batch-size", "16", "--workers", "0", "--log-every", "1", "--max-steps", "30",
                           "--lr", "3e-3", amp, "--out-dir", str(out)]) == 0
        with open(out / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert records[0]["amp"] == (amp == "--amp")
        losses[amp] = [r["loss"] for r in records if "loss" in r]
    assert len(losses["--amp"]) == 30
    assert max(abs(a - b) for a, b in zip(losses["--amp"], losses["--no-amp"])) < 0.03


def test_bf16_is_the_default_where_the_hardware_has_it(tmp_path):
    cpu_has_bf16 = any(getattr(torch.cpu, name, lambda: False)()
                       for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    assert runtime.bf16_is_fast(torch.device("cpu")) == cpu_has_bf16
    assert train.main(["--dim", "32", "--depth", "2", "--heads", "2", "--res", "32", "--shapes-size", "64",
                       "--batch-size", "32", "--workers", "0", "--max-steps", "1", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "metrics.jsonl") as f:
        assert json.loads(f.readline())["amp"] == cpu_has_bf16

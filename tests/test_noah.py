"""The batched NOAH head against a per-group, loop-based reading of Eq. (1), for every option."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, HeadConfig, parse_head
from pipeline.models.noah import NoahHead

C, M, H, W, B = 16, 5, 3, 4, 2


def eq1_logits(head: NoahHead, x: torch.Tensor) -> torch.Tensor:
    """Eq. (1) read literally: one POCA block per group, each a pair of `conv2d` calls."""
    cfg = head.cfg
    n, ck, pad = cfg.N, head.key_channels, cfg.kernel_size // 2
    blocks = []
    for i in range(n):
        group = x if cfg.feature_split == "none" else x[:, i * C // n:(i + 1) * C // n]
        if cfg.feature_split == "both" and not cfg.shared_attention:
            f_k, f_v = group[:, :ck], group[:, ck:]
        else:
            f_k = f_v = group
        if cfg.extra_linear:
            f_k = F.conv2d(f_k, head.key_linear[i][..., None, None], head.key_linear_bias[i])
            f_v = F.conv2d(f_v, head.value_linear[i][..., None, None], head.value_linear_bias[i])
        key = F.conv2d(f_k, head.key_weight[i], head.key_bias[i], padding=pad)
        value = F.conv2d(f_v, head.value_weight[i], head.value_bias[i], padding=pad)
        if cfg.activation == "sigmoid":
            attn = torch.sigmoid(key)
        elif cfg.softmax_axis == "spatial":
            attn = key.flatten(2).softmax(-1).view_as(key)
        else:
            attn = key.softmax(1)
        blocks.append(attn * value)
    poca = torch.stack(blocks, 1)  # (B, N, M, H, W)
    if cfg.aggregation == "max":
        return poca.amax(dim=(1, 3, 4))
    if cfg.aggregation == "max_spatial":
        return poca.amax(dim=(3, 4)).sum(dim=1)
    logits = poca.sum(dim=(1, 3, 4))
    return logits / {"sum": 1, "avg": n * H * W, "avg_spatial": H * W}[cfg.aggregation]


def variants():
    """Every combination of the head's options (sigmoid ignores the softmax axis)."""
    options = itertools.product(("both", "first", "none"), ("softmax", "sigmoid"), ("spatial", "channel"),
                                ("sum", "avg", "max", "avg_spatial", "max_spatial"), (1, 3), (False, True),
                                (False, True))
    for split, act, axis, agg, k, shared, extra in options:
        if (act == "sigmoid" and axis == "channel") or (shared and act == "softmax" and axis == "channel"):
            continue
        yield HeadConfig(N=4, r=0.5, feature_split=split, activation=act, softmax_axis=axis, aggregation=agg,
                         kernel_size=k, shared_attention=shared, extra_linear=extra, dropout=0.25)


def _grads(logits: torch.Tensor, x: torch.Tensor, head: NoahHead, weight: torch.Tensor):
    return torch.autograd.grad((logits * weight).sum(), [x, *head.parameters()])


@pytest.mark.parametrize("cfg", list(variants()), ids=lambda c: c.name)
def test_head_equals_per_group_eq1(cfg: HeadConfig):
    torch.manual_seed(0)
    head = NoahHead(cfg, C, M).double().eval()  # eval: dropout is the identity
    with torch.no_grad():  # a non-zero init for the extra linear biases too
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(B, M, dtype=torch.float64)
    ours, ref = head(x), eq1_logits(head, x)
    assert ours.shape == (B, M)
    torch.testing.assert_close(ours, ref)
    for g_ours, g_ref in zip(_grads(ours, x, head, weight), _grads(ref, x, head, weight)):
        torch.testing.assert_close(g_ours, g_ref)


@pytest.mark.parametrize("cfg", [HeadConfig(N=4, r=0.5), HeadConfig(N=4, r=0.5, shared_attention=True)],
                         ids=lambda c: c.name)
def test_forward_maps_shapes_and_product(cfg: HeadConfig):
    head = NoahHead(cfg, C, M)
    attn, value, poca = head.forward_maps(torch.randn(B, C, H, W))
    assert attn.shape == (B, 4, 1 if cfg.shared_attention else M, H * W)
    assert value.shape == poca.shape == (B, 4, M, H * W)
    torch.testing.assert_close(poca, attn * value)
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn[..., 0]))


def test_dropout_acts_on_values_in_training_only():
    torch.manual_seed(0)
    head = NoahHead(HeadConfig(N=4, r=0.5, dropout=0.5), C, M)
    x = torch.randn(B, C, H, W)
    _, value, _ = head.forward_maps(x)
    assert (value == 0).float().mean() > 0.3  # about half of the values dropped
    head.eval()
    _, value, _ = head.forward_maps(x)
    assert (value != 0).all()


def test_paper_parameter_count():
    """MC weights plus biases: ResNet18 (C=512, N=4, r=1/2) adds 2·N·M biases to C·M weights."""
    head = NoahHead(HeadConfig(N=4, r=0.5), 512, 1000)
    assert sum(p.numel() for p in head.parameters()) == 512 * 1000 + 2 * 4 * 1000


@pytest.mark.parametrize(("cfg", "channels", "key", "fragments"), [
    (HeadConfig(N=3, r=0.5), 16, "head.N", ["3", "divisor of the 16 feature channels", "[1, 2, 4, 8, 16]"]),
    (HeadConfig(N=4, r=0.2), 16, "head.r", ["0.2", "1..3 key channels of the 4 per group", "C=16, N=4"]),
    (HeadConfig(N=16, r=0.5), 16, "head.r", ["0.5", "1..0 key channels", "N=16"]),
    (HeadConfig(N=None, r=0.5), 16, "head.N", ["None", "backbone's default"]),
    (HeadConfig(N=4, r=None), 16, "head.r", ["None", "backbone's default"]),
    (HeadConfig(N=4, r=0.5, shared_attention=True, softmax_axis="channel"), 16, "head.softmax_axis",
     ["'channel'", "'spatial' with shared_attention"]),
])
def test_head_errors(cfg: HeadConfig, channels: int, key: str, fragments: list[str]):
    with pytest.raises(ConfigError) as err:
        NoahHead(cfg, channels, M)
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{key}: got ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(("data", "key", "fragment"), [
    ({"N": 0}, "head.N", "an integer >= 1"),
    ({"r": 1.5}, "head.r", "0 < r < 1"),
    ({"feature_split": "half"}, "head.feature_split", "'both', 'first', 'none'"),
    ({"activation": "relu"}, "head.activation", "'softmax', 'sigmoid'"),
    ({"softmax_axis": "batch"}, "head.softmax_axis", "'spatial', 'channel'"),
    ({"aggregation": "median"}, "head.aggregation", "'sum', 'avg', 'max', 'avg_spatial', 'max_spatial'"),
    ({"kernel_size": 5}, "head.kernel_size", "1, 3"),
    ({"shared_attention": "yes"}, "head.shared_attention", "true or false"),
    ({"dropout": 1.0}, "head.dropout", "0 <= dropout < 1"),
    ({"heads": 4}, "head.heads", "a known key"),
])
def test_head_option_errors(data: dict, key: str, fragment: str):
    with pytest.raises(ConfigError) as err:
        parse_head(data)
    assert err.value.key == key and fragment in str(err.value)


FUSED = [HeadConfig(N=4, r=0.25), HeadConfig(N=4, r=0.5, feature_split="first", aggregation="avg"),
         HeadConfig(N=2, r=0.5, feature_split="none"), HeadConfig(N=4, r=0.5, activation="sigmoid"),
         HeadConfig(N=4, r=0.5, aggregation="avg_spatial")]


@pytest.mark.parametrize("cfg", FUSED, ids=lambda c: c.name)
@pytest.mark.parametrize("chunk_elements", [1, 10**9], ids=["chunk1", "whole"])
@pytest.mark.parametrize("spread", [1.0, 400.0], ids=["plain", "overflowing"])
def test_fused_matches_reference_and_straightforward(cfg: HeadConfig, chunk_elements: int, spread: float):
    """Float32 at head-like scale: fused logits and gradients equal the materialised ones, in any chunking,
    also when exp of the raw keys overflows (the max-shifted pass takes over)."""
    from pipeline.bench.head import StraightforwardHead

    torch.manual_seed(1)
    head = NoahHead(cfg, 32, 50)
    assert head.fused
    x = (torch.randn(5, 32, 7, 7) * spread).requires_grad_()
    weight = torch.randn(5, 50)
    others = [head.forward_reference]
    if cfg.feature_split == "both" and cfg.activation == "softmax" and cfg.aggregation == "sum":
        others.append(StraightforwardHead(head))
    ours = head.forward_fused(x, chunk_elements)
    grads = _grads(ours, x, head, weight)
    for other in others:
        logits = other(x)
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4 * spread)
        params = head if other == head.forward_reference else other
        ref = torch.autograd.grad((logits * weight).sum(), [x, *params.parameters()])
        for g_ours, g_ref in zip(grads, ref):
            torch.testing.assert_close(g_ours, g_ref.view_as(g_ours), rtol=1e-3, atol=1e-3 * spread)


def test_fused_saves_only_input_and_statistics():
    """Saved for backward: the input plus two (N, M, B) tensors; the others keep >= 2 B·N·M·H·W tensors."""
    from pipeline.bench.head import StraightforwardHead, saved_bytes

    b, c, n, m, hw = 8, 64, 4, 100, 49
    head = NoahHead(HeadConfig(N=n, r=0.5), c, m)
    x = torch.randn(b, c, 7, 7, requires_grad=True)
    ours = saved_bytes(lambda: head(x), list(head.parameters()))
    assert ours <= x.nbytes + 2 * n * m * b * 4
    plain = StraightforwardHead(head)
    assert saved_bytes(lambda: plain(x), list(plain.parameters())) >= 2 * b * n * m * hw * 4
    assert saved_bytes(lambda: head.forward_reference(x), list(head.parameters())) >= 2 * b * n * m * hw * 4


def test_inference_mode_then_training():
    """The fused path's reused scratch works across inference mode, no_grad and autograd calls."""
    head = NoahHead(HeadConfig(N=4, r=0.5), C, M)
    x = torch.randn(B, C, H, W, requires_grad=True)
    with torch.inference_mode():
        first = head(x)
    with torch.no_grad():
        torch.testing.assert_close(head(x), first)
    head(x).sum().backward()
    with torch.inference_mode():
        torch.testing.assert_close(head(torch.cat([x, x]).detach())[:B], first)
    assert x.grad is not None


def test_empty_batch():
    assert NoahHead(HeadConfig(N=4, r=0.5), C, M)(torch.randn(0, C, H, W)).shape == (0, M)


def test_fused_runs_only_where_it_applies():
    assert not NoahHead(HeadConfig(N=4, r=0.5, aggregation="max"), C, M).fused
    assert not NoahHead(HeadConfig(N=4, r=0.5, aggregation="max_spatial"), C, M).fused
    assert not NoahHead(HeadConfig(N=4, r=0.5, softmax_axis="channel"), C, M).fused
    head = NoahHead(HeadConfig(N=4, r=0.5, dropout=0.1), C, M)
    assert not head.fused  # dropout active in training
    assert head.eval().fused


def test_fused_under_autocast_and_channels_last():
    """As the trainer calls it on GPU (bf16 autocast, channels_last features): float32 logits and gradients."""
    torch.manual_seed(2)
    head = NoahHead(HeadConfig(N=4, r=0.5), 32, 50)
    x = torch.randn(3, 32, 7, 7).to(memory_format=torch.channels_last).requires_grad_()
    ref = head.forward_reference(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = head(x.bfloat16())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0.05, atol=0.05)
    ours.sum().backward()
    assert x.grad is not None and head.key_weight.grad.dtype == torch.float32

"""The NOAH head (Section 3, Eq. 1): N parallel POCA blocks run as one batched operation.

For group i the block computes A_i = act(W_ki * F_ki), V_i = W_vi * F_vi, P_i = A_i ⊙ V_i, and the
head aggregates the N·H·W local POCAs of every class into one logit. The groups are a batch dimension
of one matmul (or one grouped convolution for 3×3 kernels), never a Python loop.

With 1×1 kernels, sum/avg aggregation and a per-class spatial softmax (or sigmoid), the head runs as
one autograd function (`PocaSum`) that keeps only its input and two N·M·B statistics for backward
and recomputes A and V there: the logit of class m is Σ_i Σ_hw A_i[m,hw]·V_i[m,hw], so neither the
forward nor the backward pass needs a (B, N, M, H·W) tensor beyond the batch chunk in flight.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import ConfigError, HeadConfig

LOG2E = math.log2(math.e)
SCALED_SUMS = ("sum", "avg", "avg_spatial")
"""Aggregations that are a constant times the sum over blocks and positions: what the fused path computes."""


def sum_scale(aggregation: str, blocks: int, positions: int) -> float:
    """The constant an aggregation of SCALED_SUMS puts on the sum over `blocks` × `positions` local POCAs."""
    return {"sum": 1.0, "avg": 1.0 / (blocks * positions), "avg_spatial": 1.0 / positions}[aggregation]


def split_channels(cfg: HeadConfig, in_channels: int) -> tuple[int, int]:
    """Input widths (key, value) of one POCA block, validating N and r against `in_channels`."""
    n, r = cfg.N, cfg.r
    if n is None or r is None:
        raise ConfigError("head.N" if n is None else "head.r", None, "a value (the backbone's default fills it)")
    if cfg.feature_split == "none":
        return in_channels, in_channels
    if in_channels % n:
        divisors = [d for d in range(1, in_channels + 1) if in_channels % d == 0 and d <= 64]
        raise ConfigError("head.N", n, f"a divisor of the {in_channels} feature channels, e.g. {divisors}")
    group = in_channels // n
    if cfg.feature_split == "first" or cfg.shared_attention:
        return group, group
    key = math.floor(r * group)
    if key < 1 or key >= group:
        raise ConfigError("head.r", r, f"a ratio giving 1..{group - 1} key channels of the {group} per group "
                          f"(floor(r*C/N) with C={in_channels}, N={n})")
    return key, group - key


def _grouped_columns(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) -> (G, C/G, B·H·W): each group's channels as the rows of one GEMM operand."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h * w).permute(1, 2, 0, 3).reshape(groups, c // groups, b * h * w)


def _scratch(workspace: dict | None, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat temporary of `numel` elements, kept in `workspace` across calls (fresh CPU memory costs page
    faults on every call); a new one each call without a workspace."""
    if workspace is None:
        return like.new_empty(numel)
    slot = (name, like.device, like.dtype)
    buf = workspace.get(slot)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = workspace[slot] = torch.empty(numel, device=like.device, dtype=like.dtype)
    return buf[:numel]


class PocaSum(torch.autograd.Function):
    """Σ_i Σ_hw act(K_i) ⊙ V_i for 1×1 embeddings, saving only the input and N·M·B statistics.

    Weights are (G, R, C_in) with G = N groups (or 1 group seen by all N blocks when there is no feature
    split) and R = N/G·M output rows; `rows` = (key rows, value rows) pick each block's channels of its
    group. K and V are computed transposed, as (G, b·H·W, R): the GEMM then has the feature map's
    positions as its long side, as a dense classifier's matmul does, and the spatial reductions run over
    a strided axis with the classes contiguous (both measurably faster than (G, R, b·H·W) on CPU). The
    batch runs in chunks of `chunk` samples whose temporaries live in two reused buffers. Spatial
    softmax uses base 2 (the key weights scaled by log2 e) because `exp2` is the fast one, is blind to
    the key bias (shift invariance: its gradient is 0) and sums to 1, so the value bias adds to the
    logits directly. On CPU the max-shift pass is skipped unless a row's sum of exps is not a normal
    number. Statistics are kept as (G, B, R).
    """

    @staticmethod
    def _chunks(x: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, rows: tuple[slice, slice], chunk: int,
                key_scale: float, workspace: dict | None):
        """Per batch chunk: (start, stop, key columns, value columns, key_scale·K, V); the columns are
        (G, C_in, b·H·W) and K, V (G, b, H·W, R) scratch views."""
        b, _, h, w = x.shape
        groups, outs, hw = wk.shape[0], wk.shape[1], h * w
        size = groups * outs * min(chunk, b) * hw
        buf_k, buf_v = _scratch(workspace, "key", size, x), _scratch(workspace, "value", size, x)
        for start in range(0, b, chunk):
            stop = min(start + chunk, b)
            cols = _grouped_columns(x[start:stop], groups)
            cols_k, cols_v = cols[:, rows[0]], cols[:, rows[1]]
            shape = (groups, (stop - start) * hw, outs)
            key = buf_k[: math.prod(shape)].view(shape).baddbmm_(cols_k.mT, wk.mT, beta=0, alpha=key_scale)
            value = torch.bmm(cols_v.mT, wv.mT, out=buf_v[: math.prod(shape)].view(shape))
            maps = (groups, stop - start, hw, outs)
            yield start, stop, cols_k, cols_v, key.view(maps), value.view(maps)

    @staticmethod
    def forward(ctx, x, wk, bk, wv, bv, rows: tuple[slice, slice], sigmoid: bool, scale: float, chunk: int,
                workspace: dict | None):
        groups, outs = wk.shape[:2]
        bias_k, bias_v = bk.view(groups, 1, 1, outs), bv.view(groups, 1, outs)
        key_scale = 1.0 if sigmoid else LOG2E
        sums, stats = [], []
        for _, _, cols_k, _, key, value in PocaSum._chunks(x, wk, wv, rows, chunk, key_scale, workspace):
            if sigmoid:
                attn = key.add_(bias_k).sigmoid_()
                sums.append(torch.addcmul(value.mul_(attn).sum(2), bias_v, attn.sum(2)))
                continue
            top = None if x.is_cuda else key.new_zeros(())
            if top is not None:
                total = key.exp2_().sum(2)
                low, high = (v.item() for v in torch.aminmax(total))
                if not (low >= 2.0 ** -100 and high < math.inf):  # over/underflow, NaN
                    top = None
                    key.view(groups, -1, outs).baddbmm_(cols_k.mT, wk.mT, beta=0, alpha=LOG2E)
            if top is None:
                top = key.amax(2)
                total = key.sub_(top[:, :, None]).exp2_().sum(2)
            sums.append(key.mul_(value).sum(2).div_(total).add_(bias_v))  # (G, b, R)
            stats.append(total.log2_().add_(top))
        sums_t = torch.cat(sums, 1) if len(sums) > 1 else sums[0]
        ctx.save_for_backward(x, wk, bk, wv, bv, sums_t, *([] if sigmoid else [torch.cat(stats, 1)]))
        ctx.cfg = (rows, sigmoid, scale, chunk, workspace)
        logits = sums_t.view(groups, x.shape[0], -1, bv.shape[-1]).sum((0, 2))
        return logits if scale == 1.0 else logits * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, wk, bk, wv, bv, sums, *lse2 = ctx.saved_tensors
        rows, sigmoid, scale, chunk, workspace = ctx.cfg
        b, c, h, w = x.shape
        groups, outs = wk.shape[:2]
        d_wk, d_bk, d_wv, d_bv = (torch.zeros_like(t) for t in (wk, bk, wv, bv))
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad = (grad * scale).repeat(1, outs // grad.shape[1])  # (B, R): block i's rows share class m's grad
        bias_k, bias_v = bk.view(groups, 1, 1, outs), bv.view(groups, 1, 1, outs)
        centre = sums - bv.view(groups, 1, outs)  # Σ_hw A·V without the value bias, which V recomputed lacks
        key_scale = 1.0 if sigmoid else LOG2E
        for start, stop, cols_k, cols_v, key, value in PocaSum._chunks(x, wk, wv, rows, chunk, key_scale,
                                                                       workspace):
            g = grad[None, start:stop, None]
            if sigmoid:  # dV = g·σ(K), dK = g·V·σ(K)·(1 - σ(K))
                attn = key.add_(bias_k).sigmoid_()
                d_key = value.add_(bias_v).mul_(attn).mul_(1 - attn).mul_(g)
                d_value = attn.mul_(g)
            else:  # dV = g·A, dK = g·A·(V - Σ_hw A·V)
                d_value = key.sub_(lse2[0][:, start:stop, None]).exp2_().mul_(g)
                d_key = value.sub_(centre[:, start:stop, None]).mul_(d_value)
            d_bv += d_value.sum((1, 2)).view_as(bv)
            if sigmoid:
                d_bk += d_key.sum((1, 2)).view_as(bk)
            d_key, d_value = d_key.view(groups, -1, outs), d_value.view(groups, -1, outs)
            d_wk.baddbmm_(d_key.mT, cols_k.mT)
            d_wv.baddbmm_(d_value.mT, cols_v.mT)
            if dx is not None:
                d_cols = dx[start:stop].view(stop - start, groups, c // groups, h * w).permute(1, 2, 0, 3)
                d_in_k = torch.bmm(wk.mT, d_key.mT).view(groups, -1, stop - start, h * w)
                d_in_v = torch.bmm(wv.mT, d_value.mT).view(groups, -1, stop - start, h * w)
                if rows[0] == rows[1]:
                    d_cols.copy_(d_in_k.add_(d_in_v))
                else:
                    d_cols[:, rows[0]] = d_in_k
                    d_cols[:, rows[1]] = d_in_v
        return dx, d_wk, d_bk, d_wv, d_bv, None, None, None, None, None


class NoahHead(nn.Module):
    """Maps a feature map (B, C, H, W) to logits (B, M) through N POCA blocks."""

    def __init__(self, cfg: HeadConfig, in_channels: int, num_classes: int):
        super().__init__()
        if cfg.shared_attention and cfg.activation == "softmax" and cfg.softmax_axis == "channel":
            raise ConfigError("head.softmax_axis", "channel",
                              "'spatial' with shared_attention (a channel softmax over one map is constant)")
        self.cfg = cfg
        self.in_channels, self.num_classes = in_channels, num_classes
        self.key_channels, self.value_channels = split_channels(cfg, in_channels)
        n, k, m = cfg.N, cfg.kernel_size, num_classes
        key_out = 1 if cfg.shared_attention else m
        self.key_weight = nn.Parameter(torch.empty(n, key_out, self.key_channels, k, k))
        self.key_bias = nn.Parameter(torch.empty(n, key_out))
        self.value_weight = nn.Parameter(torch.empty(n, m, self.value_channels, k, k))
        self.value_bias = nn.Parameter(torch.empty(n, m))
        if cfg.extra_linear:
            self.key_linear = nn.Parameter(torch.empty(n, self.key_channels, self.key_channels))
            self.key_linear_bias = nn.Parameter(torch.zeros(n, self.key_channels))
            self.value_linear = nn.Parameter(torch.empty(n, self.value_channels, self.value_channels))
            self.value_linear_bias = nn.Parameter(torch.zeros(n, self.value_channels))
        self.dropout = nn.Dropout(cfg.dropout or 0.0)  # None: unresolved (no backbone), so none
        self._workspace: dict = {}  # CPU scratch of the fused path (one call at a time per module)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init (modules/noah.py): the key and value embeddings, one grouped convolution each,
        get `kaiming_normal_(mode="fan_out")`, i.e. std sqrt(2 / (N·M_out·k·k)), and zero biases."""
        for w, b in ((self.key_weight, self.key_bias), (self.value_weight, self.value_bias)):
            n, rows, _, k, _ = w.shape
            nn.init.normal_(w, std=math.sqrt(2.0 / (n * rows * k * k)))
            nn.init.zeros_(b)
        if self.cfg.extra_linear:
            for w in (self.key_linear, self.value_linear):
                nn.init.uniform_(w, -1 / math.sqrt(w.shape[-1]), 1 / math.sqrt(w.shape[-1]))

    def no_weight_decay(self) -> set[str]:
        """The embedding biases: biases, as the authors' `--nowd-bn` treats them, though stored 2-D (N, M)."""
        return {name for name, _ in self.named_parameters() if name.endswith("bias")}

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value inputs as (B, N or 1, C_in, H, W) views of the feature map."""
        b, c, h, w = x.shape
        if self.cfg.feature_split == "none":
            whole = x.unsqueeze(1)
            return whole, whole
        groups = x.view(b, self.cfg.N, c // self.cfg.N, h, w)
        if self.key_channels == self.value_channels == c // self.cfg.N:
            return groups, groups
        return groups[:, :, : self.key_channels], groups[:, :, self.key_channels:]

    def _embed(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               linear: torch.Tensor | None, linear_bias: torch.Tensor | None) -> torch.Tensor:
        """Per-group embedding (B, N|1, C_in, H, W) -> (B, N, M_out, H·W), all groups in one op."""
        b, g, c, h, w = x.shape
        n, m_out, _, k, _ = weight.shape
        flat = x.reshape(b, g, c, h * w)
        if linear is not None:
            flat = torch.matmul(linear, flat) + linear_bias[..., None]
        if k == 1:
            out = torch.matmul(weight[..., 0, 0], flat)
        else:
            grouped = flat.expand(b, n, c, h * w).reshape(b, n * c, h, w)
            out = F.conv2d(grouped, weight.reshape(n * m_out, c, k, k), padding=k // 2, groups=n)
            out = out.view(b, n, m_out, h * w)
        return out + bias[..., None]

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A, V and P of every POCA block, each (B, N, M, H·W) (A is (B, N, 1, H·W) when shared)."""
        key_in, value_in = self._inputs(x)
        cfg = self.cfg
        key = self._embed(key_in, self.key_weight, self.key_bias,
                          getattr(self, "key_linear", None), getattr(self, "key_linear_bias", None))
        value = self._embed(value_in, self.value_weight, self.value_bias,
                            getattr(self, "value_linear", None), getattr(self, "value_linear_bias", None))
        if cfg.activation == "sigmoid":
            attn = torch.sigmoid(key)
        else:
            attn = key.softmax(dim=-1 if cfg.softmax_axis == "spatial" else 2)
        value = self.dropout(value)
        return attn, value, attn * value

    @property
    def fused(self) -> bool:
        """Whether `forward` runs as `PocaSum` (1×1 kernels, sum/avg, spatial softmax or sigmoid)."""
        cfg = self.cfg
        return (cfg.kernel_size == 1 and cfg.aggregation in SCALED_SUMS and not cfg.shared_attention
                and not cfg.extra_linear and (cfg.activation == "sigmoid" or cfg.softmax_axis == "spatial")
                and (not cfg.dropout or not self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.shape[0]:
            return self.forward_fused(x)
        return self.forward_reference(x)

    def forward_fused(self, x: torch.Tensor, chunk_elements: int | None = None) -> torch.Tensor:
        """Logits through `PocaSum`; a batch chunk's (N, M, b, H·W) temporaries hold `chunk_elements`."""
        cfg, (_, _, h, w) = self.cfg, x.shape
        groups = 1 if cfg.feature_split == "none" else cfg.N
        if cfg.feature_split == "both":
            rows = (slice(0, self.key_channels), slice(self.key_channels, None))
        else:
            rows = (slice(None), slice(None))
        if chunk_elements is None:
            chunk_elements = 1 << 40 if x.is_cuda else 1 << 20
        chunk = max(1, chunk_elements // (cfg.N * self.num_classes * h * w))
        scale = sum_scale(cfg.aggregation, cfg.N, h * w)
        if torch.is_autocast_enabled(x.device.type):  # the head's sums and exps run in float32
            x = x.float()
        with torch.autocast(x.device.type, enabled=False):
            return PocaSum.apply(x.contiguous(), self.key_weight.view(groups, -1, self.key_channels),
                                 self.key_bias, self.value_weight.view(groups, -1, self.value_channels),
                                 self.value_bias, rows, cfg.activation == "sigmoid", scale, chunk,
                                 None if x.is_cuda else self._workspace)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from the materialised A, V and P of `forward_maps` (every option)."""
        _, _, poca = self.forward_maps(x)
        aggregation = self.cfg.aggregation
        if aggregation == "max":
            return poca.amax(dim=(1, 3))
        if aggregation == "max_spatial":
            return poca.amax(dim=3).sum(dim=1)
        logits = poca.sum(dim=(1, 3))
        scale = sum_scale(aggregation, poca.shape[1], poca.shape[3])
        return logits if scale == 1.0 else logits * scale

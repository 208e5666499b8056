"""The NOAH head (Section 3, Eq. 1): N parallel POCA blocks run as one batched operation.

For group i the block computes A_i = act(W_ki * F_ki), V_i = W_vi * F_vi, P_i = A_i ⊙ V_i, and the
head aggregates the N·H·W local POCAs of every class into one logit. The groups are a batch dimension
of one matmul (or one grouped convolution for 3×3 kernels), never a Python loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, HeadConfig


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
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-group init as `nn.Conv2d` does it (fan-in of one group's kernel)."""
        for w, b in ((self.key_weight, self.key_bias), (self.value_weight, self.value_bias)):
            bound = 1 / math.sqrt(w.shape[2] * w.shape[3] * w.shape[4])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        if self.cfg.extra_linear:
            for w in (self.key_linear, self.value_linear):
                nn.init.uniform_(w, -1 / math.sqrt(w.shape[-1]), 1 / math.sqrt(w.shape[-1]))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, poca = self.forward_maps(x)
        if self.cfg.aggregation == "max":
            return poca.amax(dim=(1, 3))
        logits = poca.sum(dim=(1, 3))
        if self.cfg.aggregation == "avg":
            logits = logits / (poca.shape[1] * poca.shape[3])
        return logits

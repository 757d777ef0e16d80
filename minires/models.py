"""The MNIST networks: seed_net (the gradient-flow experiment), resnet (BasicBlocks with BN)
and plain_net / residual_net (the depth study). Imports minires.nn only (and numpy).

Every constructor draws all weights, in construction order, from one numpy Generator made
from `rng` (an int seed or a Generator) on the host; call `.to(device)` afterwards.
"""
import numpy as np

from minires import nn
from minires.nn.init import as_rng

SKIPS = ("residual", "rezero", "none")


class Net(nn.Module):
    """features -> skip -> head (seed_net), with the skip module exposed as `.skip` so
    experiments can read its grad_norms or replace it."""

    def __init__(self, features, skip, head):
        super().__init__()
        self.features, self.skip, self.head = features, skip, head

    def forward(self, x):
        return self.head(self.skip(self.features(x)))


def _conv3x3(c_in, c_out, rng, dtype, stride=1, bias=True):
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=bias, rng=rng, dtype=dtype)


def seed_net(channels=16, skip="residual", rng=0, dtype=np.float32, track_grad_norms=False):
    """The seed network, for MNIST x (N, 1, 28, 28) -> logits (N, 10).

    conv3x3(1->c) ReLU, conv3x3(c->c) ReLU, conv3x3(c->c) ReLU, maxpool 4 (28->7); the block
    [conv3x3 ReLU conv3x3 ReLU] with y = block(x) + x (skip="residual"), y = x + alpha*block(x)
    (skip="rezero") or y = block(x) (skip="none"); maxpool 2 (7->3); flatten; linear(9c->10).
    All convs padding 1. `model.skip` is the Residual / ReZero (or the bare block for "none");
    track_grad_norms turns on its (x_in, x_res) recording.
    """
    if skip not in SKIPS:
        raise ValueError(f"seed_net: skip must be one of {SKIPS}, got {skip!r}")
    rng, c = as_rng(rng), int(channels)
    features = nn.Sequential(
        _conv3x3(1, c, rng, dtype), nn.ReLU(),
        _conv3x3(c, c, rng, dtype), nn.ReLU(),
        _conv3x3(c, c, rng, dtype), nn.ReLU(),
        nn.MaxPool2d(4))
    block = nn.Sequential(_conv3x3(c, c, rng, dtype), nn.ReLU(),
                          _conv3x3(c, c, rng, dtype), nn.ReLU())
    if skip == "residual":
        block = nn.Residual(block, track_grad_norms=track_grad_norms)
    elif skip == "rezero":
        block = nn.ReZero(block, track_grad_norms=track_grad_norms, dtype=dtype)
    head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(9 * c, 10, rng=rng, dtype=dtype))
    return Net(features, block, head)


class ResNet(nn.Module):
    """stem -> `blocks` (a Sequential of blocks, e.g. BasicBlocks) -> head (global average
    pool, linear): resnet, plain_net and residual_net."""

    def __init__(self, stem, blocks, head):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def resnet(depth=8, channels=16, blocks=None, num_classes=10, in_channels=1, rng=0,
           dtype=np.float32, track_grad_norms=False):
    """A CIFAR-style ResNet of BasicBlocks for MNIST: x (N, in_channels, 28, 28) -> (N, 10).

    Three stages of c, 2c, 4c channels (strides 1, 2, 2: 28 -> 14 -> 7), each of n blocks,
    n = (depth - 2) / 6 (He et al.'s 6n+2 counting), or `blocks` = blocks per stage, e.g.
    (2, 2) for two stages. The first block of every later stage downsamples through a 1x1
    conv + BN projection shortcut.
    """
    if blocks is None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet: depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), "
                             f"got {depth}; or pass blocks=(n1, n2, ...)")
        blocks = (((depth - 2) // 6),) * 3
    if not blocks or any(int(n) < 1 for n in blocks):
        raise ValueError(f"resnet: blocks must be positive counts per stage, got {blocks!r}")
    rng, c = as_rng(rng), int(channels)
    stem = nn.Sequential(_conv3x3(in_channels, c, rng, dtype, bias=False),
                         nn.BatchNorm2d(c, dtype=dtype), nn.ReLU())
    body, c_in = nn.Sequential(), c
    for stage, n in enumerate(blocks):
        c_out = c * 2 ** stage
        for i in range(int(n)):
            stride = 2 if stage > 0 and i == 0 else 1
            body.append(nn.BasicBlock(c_in, c_out, stride, rng=rng, dtype=dtype,
                                      track_grad_norms=track_grad_norms))
            c_in = c_out
    head = nn.Sequential(nn.GlobalAvgPool2d(), nn.Linear(c_in, num_classes, rng=rng,
                                                         dtype=dtype))
    return ResNet(stem, body, head)


def _depth_net(depth, channels, residual, batch_norm, rng, dtype, track_grad_norms):
    """Shared body of plain_net and residual_net (identical convs, same draws from rng)."""
    if int(depth) < 1:
        raise ValueError(f"{'residual_net' if residual else 'plain_net'}: depth must be >= 1 "
                         f"block, got {depth}")
    rng, c = as_rng(rng), int(channels)
    stem = nn.Sequential(_conv3x3(1, c, rng, dtype), nn.ReLU(), nn.MaxPool2d(2))
    body = nn.Sequential()
    for _ in range(int(depth)):
        layers = [_conv3x3(c, c, rng, dtype, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(c, dtype=dtype)] if batch_norm else []
        layers += [nn.ReLU(), _conv3x3(c, c, rng, dtype, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(c, dtype=dtype)] if batch_norm else []
        block = nn.Sequential(*layers)
        if residual:
            body.append(nn.Residual(block, relu=True, track_grad_norms=track_grad_norms))
        else:
            body.append(nn.Sequential(block, nn.ReLU()))
    head = nn.Sequential(nn.GlobalAvgPool2d(), nn.Linear(c, 10, rng=rng, dtype=dtype))
    return ResNet(stem, body, head)


def plain_net(depth, channels=16, batch_norm=True, rng=0, dtype=np.float32):
    """The depth study's plain network: x (N, 1, 28, 28) -> (N, 10).

    stem conv3x3(1->c) ReLU maxpool 2 (28->14); `depth` blocks relu(block(x)) with block =
    conv3x3-[BN]-ReLU-conv3x3-[BN]; global average pool; linear(c->10). 2*depth+1 convs.
    """
    return _depth_net(depth, channels, False, batch_norm, rng, dtype, False)


def residual_net(depth, channels=16, batch_norm=True, rng=0, dtype=np.float32,
                 track_grad_norms=False):
    """plain_net with every block wrapped as Residual(block, relu=True): relu(x + block(x)).

    Same convs and the same weights as plain_net for the same rng; `.blocks[i]` is the i-th
    Residual (its grad_norms are recorded when track_grad_norms is set).
    """
    return _depth_net(depth, channels, True, batch_norm, rng, dtype, track_grad_norms)

"""The disentangled image-to-image translation model of MS-ODE's similarity (paper section 2.2).

A 2D network on multi-slice input (``slices`` adjacent slices of a volume as channels, 5 in the
paper) that splits an image into *content* (anatomy, shared by every contrast) and *style* (how
the contrast renders it), after the diverse image-to-image translation framework the paper extends:

* content encoder E^c, one for all contrasts, fully convolutional: a feature map at half the input
  resolution (instance-normalised, so a contrast's global gain and offset cannot reach it);
* style encoder E^s(x, i): convolutions, global average pooling, a fully connected layer; the
  contrast code i enters as a one-hot vector concatenated to the input channels (as the paper);
* generator G(c, s, i): the one-hot code concatenated to the content channels, the style through
  adaptive instance normalisation (an MLP of (s, i) gives each residual block's scale and shift),
  then a transposed convolution back to the input size;
* a patch discriminator with one output map per contrast (the map of the claimed contrast is read).

Only E^c is used for registration (:mod:`.content_similarity`); G, E^s and the discriminator exist
to train it (:mod:`..training.translation_train`).  The settings travel inside the state_dict as a
JSON byte tensor, so a weights file is self-describing and still loads with ``weights_only=True``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InvalidParameterError

CONFIG_KEY = "_translation_config"


@dataclass
class TranslationConfig:
    #: names of the contrast groups the one-hot code indexes (training data decides what they are)
    contrasts: tuple = ("t1", "synthetic")
    #: adjacent slices given as channels (the paper: 5)
    slices: int = 5
    content_channels: int = 32
    style_dim: int = 8
    width: int = 16
    residual_blocks: int = 2
    #: in-plane spacing (mm) of the slices the model was trained on; volumes are resampled to it
    spacing_mm: float = 3.0

    def __post_init__(self) -> None:
        self.contrasts = tuple(self.contrasts)
        if len(self.contrasts) < 2:
            raise InvalidParameterError("the translation model needs at least two contrast groups")
        if self.slices < 1 or self.slices % 2 == 0:
            raise InvalidParameterError(f"slices must be odd and ≥ 1 (a centre slice and its neighbours), got {self.slices}")

    @property
    def groups(self) -> int:
        return len(self.contrasts)


def one_hot_maps(code: torch.Tensor, groups: int, like: torch.Tensor) -> torch.Tensor:
    """The contrast codes [B] as constant one-hot channels [B, groups, H, W] shaped like ``like``."""
    onehot = F.one_hot(code.long(), groups).to(like.dtype)
    return onehot[:, :, None, None].expand(-1, -1, *like.shape[-2:])


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with a skip; normalised by instance norm, or by AdaIN when the caller
    supplies per-sample scale and shift (the generator's style path)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="reflect")

    @staticmethod
    def _norm(x: torch.Tensor, affine: torch.Tensor | None) -> torch.Tensor:
        x = F.instance_norm(x)
        if affine is None:
            return x
        scale, shift = affine.chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]

    def forward(self, x: torch.Tensor, affine1=None, affine2=None) -> torch.Tensor:
        y = F.relu(self._norm(self.conv1(x), affine1))
        return x + self._norm(self.conv2(y), affine2)


class ContentEncoder(nn.Module):
    """E^c: [B, slices, H, W] → content [B, content_channels, H/2, W/2] (H, W even)."""

    def __init__(self, config: TranslationConfig):
        super().__init__()
        w, c = config.width, config.content_channels
        self.stem = nn.Conv2d(config.slices, w, 5, padding=2, padding_mode="reflect")
        self.down = nn.Conv2d(w, c, 4, stride=2, padding=1, padding_mode="reflect")
        self.blocks = nn.ModuleList(ResidualBlock(c) for _ in range(config.residual_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.instance_norm(self.stem(x)))
        h = F.relu(F.instance_norm(self.down(h)))
        for block in self.blocks:
            h = block(h)
        return h


class StyleEncoder(nn.Module):
    """E^s(x, i): convolutions on (x, one-hot i), global average pooling, a fully connected layer."""

    def __init__(self, config: TranslationConfig):
        super().__init__()
        w, g = config.width, config.groups
        # no instance norm here: it would erase the very intensity statistics style stands for
        self.convs = nn.Sequential(
            nn.Conv2d(config.slices + g, w, 5, padding=2, padding_mode="reflect"), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4 * w, 4 * w, 4, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4 * w, config.style_dim)
        self.groups = g

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        h = self.convs(torch.cat([x, one_hot_maps(code, self.groups, x)], 1))
        return self.fc(h.mean(dim=(2, 3)))


class Generator(nn.Module):
    """G(c, s, i) → image [B, slices, H, W] in [0, 1] (the training images' intensity range)."""

    def __init__(self, config: TranslationConfig):
        super().__init__()
        c, w, g = config.content_channels, config.width, config.groups
        self.groups = g
        self.entry = nn.Conv2d(c + g, c, 3, padding=1, padding_mode="reflect")
        self.blocks = nn.ModuleList(ResidualBlock(c) for _ in range(config.residual_blocks))
        # per block: (scale, shift) for each of its two convolutions
        self.mlp = nn.Sequential(nn.Linear(config.style_dim + g, 4 * c), nn.ReLU(),
                                 nn.Linear(4 * c, config.residual_blocks * 4 * c))
        self.up = nn.ConvTranspose2d(c, w, 4, stride=2, padding=1)
        self.out = nn.Conv2d(w, config.slices, 5, padding=2, padding_mode="reflect")

    def forward(self, content: torch.Tensor, style: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(code.long(), self.groups).to(style.dtype)
        params = self.mlp(torch.cat([style, onehot], 1)).chunk(2 * len(self.blocks), dim=1)
        h = F.relu(self.entry(torch.cat([content, one_hot_maps(code, self.groups, content)], 1)))
        for k, block in enumerate(self.blocks):
            h = block(h, params[2 * k], params[2 * k + 1])
        h = F.relu(self.up(h))
        return torch.sigmoid(self.out(h))


class PatchDiscriminator(nn.Module):
    """Real/fake score per patch, one map per contrast group; ``forward`` returns the map of ``code``."""

    def __init__(self, config: TranslationConfig):
        super().__init__()
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.slices, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, config.groups, 3, padding=1))

    def forward(self, x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        maps = self.body(x)
        return maps.gather(1, code.long()[:, None, None, None].expand(-1, 1, *maps.shape[-2:]))


class Translator(nn.Module):
    """E^c, E^s and G together: what is trained on the generator side and what is shipped."""

    def __init__(self, config: TranslationConfig | None = None):
        super().__init__()
        self.config = config or TranslationConfig()
        self.content = ContentEncoder(self.config)
        self.style = StyleEncoder(self.config)
        self.generator = Generator(self.config)

    def state_dict_with_config(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        state[CONFIG_KEY] = torch.tensor(list(json.dumps(asdict(self.config)).encode()), dtype=torch.uint8)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Translator":
        if CONFIG_KEY not in state:
            raise InvalidParameterError("these weights are not a translation model (no stored configuration)")
        config = TranslationConfig(**json.loads(bytes(state[CONFIG_KEY].tolist()).decode()))
        model = cls(config)
        model.load_state_dict({k: v for k, v in state.items() if k != CONFIG_KEY})
        return model


class TranslationGAN(nn.Module):
    """The translator and its discriminator in one module, so one checkpoint holds both."""

    def __init__(self, config: TranslationConfig | None = None):
        super().__init__()
        self.translator = Translator(config)
        self.discriminator = PatchDiscriminator(self.translator.config)

    @property
    def config(self) -> TranslationConfig:
        return self.translator.config

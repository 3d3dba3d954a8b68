"""GPU-decode arithmetic run on the CPU; the ImageNet evaluation protocols (He et al. 2015)."""

from __future__ import annotations

from pathlib import Path

import torch
from image_files import encode, rgb, write_tree
from PIL import Image
from torch import nn

from reslab.data import ClassificationPresetTrain, InputConfig, index_source
from reslab.data.gpu import EncodedDataset, GpuDecodeBatches
from reslab.data.multicrop import multiscale_probs, single_crop_probs, ten_crop_probs
from reslab.data.stream import ImageDataset, StreamingBatches


def test_gpu_path_matches_the_cpu_path_when_run_on_the_cpu(tmp_path: Path) -> None:
    """The same boxes and flips (same per-sample seeds), the same resize: the device path's
    batches equal the worker path's up to rounding."""
    root = tmp_path / "jpegs"
    write_tree(
        root,
        {
            s: {
                c: {
                    f"{i}.jpg": encode(
                        Image.fromarray(rgb(40 + 3 * i, 64 - 2 * i, i)), "JPEG", quality=95
                    )
                    for i in range(6)
                }
                for c in "ab"
            }
            for s in ("train", "test")
        },
    )
    idx = index_source(root, cache_dir=tmp_path / "c")
    cfg = InputConfig(size=(24, 24), resize=24)
    cpu = StreamingBatches(
        ImageDataset(idx, "train", ClassificationPresetTrain(cfg, "photo"), seed=4),
        batch_size=4,
        seed=4,
        num_workers=0,
    )
    dev = GpuDecodeBatches(
        EncodedDataset(idx, "train", seed=4),
        size=(24, 24),
        batch_size=4,
        seed=4,
        num_workers=0,
        device="cpu",
    )
    pairs = list(zip(cpu, dev, strict=True))
    assert len(pairs) == 3
    for (xa, ya), (xb, yb) in pairs:
        assert torch.equal(ya, yb) and xb.shape == xa.shape == (4, 3, 24, 24)
        diff = (xa.int() - xb.int()).abs()
        assert diff.float().mean() < 0.6 and int(diff.max()) <= 3, diff.max()


class _Net(nn.Module):
    """Fully convolutional up to a global average pool, like the zoo's ResNets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_single_ten_crop_and_multiscale_follow_the_protocols() -> None:
    from torchvision.transforms.v2 import functional as F

    model = _Net().eval()
    cfg = InputConfig(size=(32, 32), resize=40)
    norm = cfg.normalizer()
    images = [
        torch.from_numpy(rgb(50 + 10 * k, 70, k)).permute(2, 0, 1).contiguous() for k in range(2)
    ]
    with torch.no_grad():
        one = single_crop_probs(model, images, cfg)
        want = torch.softmax(
            model(norm(torch.stack([cfg.eval_transform()(im) for im in images]))), -1
        )
        assert torch.allclose(one, want, atol=1e-6)
        ten = ten_crop_probs(model, images, cfg)
        r = F.resize(images[0], [40], antialias=True)
        crops = torch.stack(F.ten_crop(r, [32, 32]))
        assert crops.shape[0] == 10
        assert torch.allclose(ten[0], torch.softmax(model(norm(crops)), -1).mean(0), atol=1e-6)
        scales = (32, 48, 64)
        multi = multiscale_probs(model, images, cfg, scales)
        per = [
            torch.softmax(model(norm(F.resize(images[1], [s], antialias=True)[None])), -1)[0]
            for s in scales
        ]
        assert torch.allclose(multi[1], torch.stack(per).mean(0), atol=1e-6)
        assert torch.allclose(one.sum(1), torch.ones(2)) and torch.allclose(
            multi.sum(1), torch.ones(2)
        )
        flipped = multiscale_probs(model, images, cfg, scales, flip=True)
        assert not torch.allclose(flipped, multi)  # the mirror is averaged in

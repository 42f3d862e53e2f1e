"""Checks cifar-prep's output for an image folder against torchvision's ImageFolder.

    python check_folder.py ROOT OUT_DIR NAME SPLIT...

For each split, ImageFolder(ROOT/SPLIT) with ToTensor() + Normalize((0.5,)*3, (0.5,)*3) must
give the same classes, the same labels and the same values, index by index, as
OUT_DIR/NAME-SPLIT.safetensors (read with the `safetensors` package). Exits non-zero on mismatch.
"""
import json
import sys

import numpy as np
import torchvision
import torchvision.transforms as T
from safetensors import safe_open
from safetensors.numpy import load_file

root, out, name, splits = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
tf = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
for split in splits:
    path = f"{out}/{name}-{split}.safetensors"
    ds = torchvision.datasets.ImageFolder(f"{root}/{split}", transform=tf)
    tensors = load_file(path)
    with safe_open(path, "np") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == ds.classes, (meta["classes"], ds.classes)
    images, labels = tensors["images"], tensors["labels"]
    assert len(labels) == len(ds), (len(labels), len(ds))
    for i in range(len(ds)):
        x, y = ds[i]
        assert labels[i] == y, f"{split}[{i}]: label {labels[i]} vs {y} ({ds.samples[i][0]})"
        diff = np.abs(images[i] - x.numpy()).max()
        assert diff == 0, f"{split}[{i}] ({ds.samples[i][0]}): values differ by {diff}"
    print(f"{split}: {len(ds)} images match ImageFolder, classes {ds.classes}")

"""Checks cifar-prep's output against torchvision reading the same python batches.

    python check_prep.py ROOT F32_DIR U8_DIR

ROOT holds cifar-10-batches-py/. Reads the tensor files with the `safetensors` package (numpy
flavour), so a failure here also means others could not read them. Exits non-zero on mismatch.
"""
import json
import sys

import numpy as np
import torchvision
import torchvision.transforms as T
from safetensors import safe_open
from safetensors.numpy import load_file


class CIFAR10(torchvision.datasets.CIFAR10):
    # The rebuilt tarballs carry other md5 sums than the originals (as in seed_baseline.py).
    def _check_integrity(self):
        return True

    def _load_meta(self):
        import os, pickle
        with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


root, f32_dir, u8_dir = sys.argv[1:4]
tf = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
for split, train in (("train", True), ("test", False)):
    ref = CIFAR10(root=root, train=train, download=False, transform=tf)
    f32 = load_file(f"{f32_dir}/cifar10-{split}.safetensors")
    u8 = load_file(f"{u8_dir}/cifar10-{split}.safetensors")
    images, labels = f32["images"], f32["labels"]
    assert images.dtype == np.float32 and images.shape == (len(ref), 3, 32, 32), images.shape
    assert labels.dtype == np.int64 and (labels == np.array(ref.targets)).all(), "labels differ"
    expect = np.stack([ref[i][0].numpy() for i in range(len(ref))])
    diff = float(np.abs(expect - images).max())
    assert diff <= 1e-6, f"{split}: max |difference| {diff}"
    raw = ref.data.transpose(0, 3, 1, 2)  # torchvision keeps HWC uint8
    assert (u8["images"] == raw).all(), f"{split}: u8 pixels differ"
    with safe_open(f"{f32_dir}/cifar10-{split}.safetensors", "np") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == ref.classes, meta["classes"]
    assert json.loads(meta["mean"]) == [0.5] * 3 and meta["split"] == split
    print(f"{split}: {len(ref)} images, labels equal, max |f32 - torchvision| = {diff:g}, u8 equal")

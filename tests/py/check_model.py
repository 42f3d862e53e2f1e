"""Runs a model trained by cifar-train in PyTorch, with no code of the project's.

    python check_model.py TEST_FILE EXPORT ACCURACY [SNIPPET]

Evaluates the TorchScript file EXPORT (`torch.jit.load`) on TEST_FILE (a prepared test split,
read with `safetensors`) and, when SNIPPET (docs/cli.md's Python block that loads a checkpoint
into the tutorial's `Net` as `net`) is given, that net too. Each must reach exactly ACCURACY,
the accuracy cifar-train reported.
"""
import sys

import torch
from safetensors.torch import load_file

test_file, export, expected = sys.argv[1], sys.argv[2], float(sys.argv[3])
snippet = sys.argv[4] if len(sys.argv) > 4 else ""
data = load_file(test_file)
images, labels = data["images"], data["labels"]


def accuracy(model, name):
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    print(f"{name}: {correct} of {len(labels)} correct; cifar-train reported {expected:.6f}")
    assert abs(correct / len(labels) - expected) < 1e-9, f"{name}: {correct / len(labels)} != {expected}"


accuracy(torch.jit.load(export), "torchscript")
if snippet:
    scope = {}
    exec(snippet, scope)
    accuracy(scope["net"], "checkpoint")

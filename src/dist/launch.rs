//! Starting local ranks: `cifar-train --nproc-per-node N`, as `torchrun --standalone` does.

"""Resuming as torchdata's StatefulDataLoader resumes: from any point, epoch ends included, with
`set_epoch` composing with the state loaded."""
import pytest
import torch
import torchvision.transforms as T

import cifar_fast

AUGMENTED = T.Compose([T.RandomCrop(32, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(),
                       T.ToTensor()])


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, z) and torch.equal(y, w) for (x, y), (z, w) in zip(a, b))


def make(root, workers=2, seed=3):
    ds = cifar_fast.CIFAR10(root, train=True, transform=AUGMENTED)
    return cifar_fast.DataLoader(ds, batch_size=8, shuffle=True, num_workers=workers, seed=seed)


@pytest.fixture
def whole(root):
    loader = make(root)
    return [batches(loader) for _ in range(3)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_state_taken_after_an_epoch_resumes_at_the_next(root, whole, workers):
    loader = make(root, workers)
    batches(loader)
    state = loader.state_dict()
    resumed = make(root, workers, seed=99)
    resumed.load_state_dict(state)
    assert same(batches(resumed), whole[1])
    assert same(batches(resumed), whole[2])


def test_a_state_taken_at_the_last_batch_resumes_at_the_next_epoch(root, whole):
    loader = make(root)
    for i, _ in enumerate(loader):
        if i == len(loader) - 1:
            state = loader.state_dict()
    resumed = make(root, seed=99)
    resumed.load_state_dict(state)
    assert same(batches(resumed), whole[1]), "the epoch after the one saved, whole"


def test_set_epoch_after_loading_keeps_the_position_of_that_epoch(root, whole):
    loader = make(root)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    del it
    resumed = make(root, seed=99)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # the training loop's own call, as with DistributedSampler
    assert same(batches(resumed), whole[0][5:])
    resumed.set_epoch(1)
    assert same(batches(resumed), whole[1])


def test_set_epoch_of_another_epoch_starts_that_one_whole(root, whole):
    loader = make(root)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = loader.state_dict()
    del it
    resumed = make(root, seed=99)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert same(batches(resumed), whole[2])


def test_a_training_loop_that_saves_at_epoch_end_and_calls_set_epoch_trains_each_epoch_once(root, whole):
    # The loop users write: the epoch counter and the loader's state saved together after each
    # epoch, then after a restart the loop goes on from the saved counter.
    loader = make(root)
    loader.set_epoch(0)
    batches(loader)
    saved = dict(epoch=1, loader=loader.state_dict())
    resumed = make(root, seed=99)
    resumed.load_state_dict(saved["loader"])
    got = []
    for epoch in range(saved["epoch"], 3):
        resumed.set_epoch(epoch)
        got.append(batches(resumed))
    assert same(got[0], whole[1]) and same(got[1], whole[2])


def test_state_dict_follows_every_batch_taken(root):
    loader = make(root)
    assert loader.state_dict()["batches_yielded"] == 0
    it = iter(loader)
    for k in range(1, 4):
        next(it)
        assert loader.state_dict()["batches_yielded"] == k and loader.state_dict()["epoch"] == 0


@pytest.mark.parametrize("epochs_before", [0, 1])
def test_a_samplers_epoch_resumes_in_the_order_it_was_saved_in(root, epochs_before):
    # RandomSampler draws its order from torch's generator at each iter(): a resumed loader
    # (another process, another generator state) replays the saved epoch's order, as
    # StatefulDataLoader restores its sampler, instead of drawing a new one.
    ds = cifar_fast.CIFAR10(root, train=True, transform=T.ToTensor())
    make = lambda: cifar_fast.DataLoader(ds, batch_size=8, sampler=torch.utils.data.RandomSampler(ds),
                                         num_workers=2)
    torch.manual_seed(5)
    loader = make()
    for _ in range(epochs_before):
        batches(loader)
    it = iter(loader)
    seen = [next(it) for _ in range(4)]
    state = loader.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in it]
    torch.manual_seed(6)
    resumed = make()
    resumed.load_state_dict(state)
    again = batches(resumed)
    assert same(again, rest) and len(again) == len(loader) - 4
    labels = torch.cat([y for _, y in seen] + [y for _, y in again])
    assert sorted(labels.tolist()) == sorted(ds.targets), "each sample once in the epoch"
    assert len(batches(resumed)) == len(loader), "the epoch after is whole, drawn anew"

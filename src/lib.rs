/*!
Fast CIFAR training data: from the official tarballs to batches on the GPU with no wait.

# Brief overview

The crate follows the data, one module a stage (the first five come from the `cifar-data`
crate, which needs no libtorch, and are re-exported here):

* [`prep`] reads CIFAR-10/100 tarballs (binary or pickled, never executing a pickle), or image
  folders in `ImageFolder`'s layout, and writes one safetensors file per split:
  `images [N,3,H,W]` (32×32 for CIFAR) and `labels [N]`. The `cifar-prep` binary is a thin
  front for [`prep::prepare`].
* [`store`] opens such a file: [`TensorFile`] validates it, then memory-maps it.
* [`source`] is where samples come from: the [`Source`] trait, [`Dataset`] over a tensor file,
  and [`ImageFolder`] over `root/<class>/<image>.png` for your own data.
* [`sampler`] decides each epoch's order from `(seed, epoch)`; [`augment`] crops and flips.
* Images of every size: [`images`] are their sources ([`EncodedImages`] over an encoded tensor
  file, [`FolderImages`] over a folder), [`geometry`] draws each sample's crop, resize and flip
  (torchvision's `RandomResizedCrop`, `Resize`, `CenterCrop`), and [`decode`] decodes only
  that crop (libjpeg-turbo) and resizes it as Pillow does; [`Loader::builder_images`] takes them.
* [`loader`]: the [`Loader`]'s worker threads fill reusable (pinned, on CUDA) buffers ahead of
  the consumer and hand them out in order as [`Batch`]es of tch tensors.
* [`train`] is the tutorial's training loop on top, which the `cifar-train` binary runs:
  [`train::run`] with a [`train::TrainConfig`], stopped early by an [`Interrupt`].
* [`dist`] trains data-parallel across processes and machines on c10d, PyTorch's distributed
  engine, which [`bridge`] (a small C++ file beside tch) reaches in libtorch.


```no_run
use cifar_fast::{Augment, Dataset, Loader};
use tch::Device;

let train = Dataset::open("data/cifar10-train.safetensors")?;
let mut loader = Loader::builder(train)
    .batch_size(32)
    .shuffle(true)
    .seed(7)
    .num_workers(2)
    .prefetch(4)
    .augment(Augment::standard())
    .device(Device::cuda_if_available())
    .build()?;
for epoch in 0..10 {
    for batch in loader.epoch(epoch) {
        let batch = batch?;
        // batch.images: [32, 3, 32, 32] f32, batch.labels: [32] i64, on the device
    }
}
# Ok::<(), cifar_fast::Error>(())
```
*/
#![deny(missing_docs)]

// The Rust examples of the README and the guides are doctests: they compile against this API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
#[cfg(doctest)]
#[doc = include_str!("../docs/library.md")]
struct LibraryGuideExamples;
#[cfg(doctest)]
#[doc = include_str!("../docs/distributed.md")]
struct DistributedGuideExamples;

pub use cifar_data::{
    augment, decode, error, files, geometry, image_folder, images, pipeline, prep, preview, sampler, source,
    store,
};
pub mod bridge;
pub mod dist;
pub mod interrupt;
pub mod loader;
pub mod train;

pub use cifar_data::{
    Augment, Dataset, EncodedFile, EncodedImages, Error, FolderImages, ImageFolder, ImageSource,
    ImageTransform, Padding, Result, SizePolicy, Source, TensorFile,
};
pub use interrupt::Interrupt;
pub use loader::{Batch, Epoch, Loader, LoaderBuilder, default_prefetch};

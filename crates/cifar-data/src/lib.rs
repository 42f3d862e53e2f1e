/*!
CIFAR data without tensors: the official tarballs into memory-mapped safetensors files, and the
parts of a loader that need no tensor library.

# Brief overview

* [`prep`] reads CIFAR-10/100 tarballs (binary or pickled, never executing a pickle), or image
  folders in `ImageFolder`'s layout ([`prep::folder`]), and writes one safetensors file per
  split: `images [N,3,H,W]` (32×32 for CIFAR) and `labels [N]`. The `cifar-prep` binary is a
  thin front for [`prep::prepare`].
* [`store`] opens such a file: [`TensorFile`] validates it, then memory-maps it.
* [`source`] is where samples come from: the [`Source`] trait, [`Dataset`] over a tensor file,
  and [`ImageFolder`] over `root/<class>/<image>.png` for your own data.
* [`sampler`] decides each epoch's order from `(seed, epoch)`; [`augment`] crops and flips.
* [`pipeline`] is the loader's core: worker threads fill a front's buffers ahead of the
  consumer and hand them out in order (the tch `Loader` and the Python package are its fronts).
* [`preview`] draws grids of images with class names, to look at the data.

The `cifar-fast` crate builds its tch loader and the training loop on these;
this crate stays free of libtorch, so `cifar-prep` (which uses it alone) starts in milliseconds.
*/
#![deny(missing_docs)]

pub mod augment;
pub mod decode;
pub mod error;
pub mod files;
pub mod geometry;
pub mod image_folder;
pub mod images;
pub mod pipeline;
pub mod prep;
pub mod preview;
pub mod sampler;
pub mod source;
pub mod store;

pub use augment::{Augment, Padding};
pub use error::{Error, Result};
pub use geometry::{Geometry, ImageTransform};
pub use image_folder::{ImageFolder, SizePolicy};
pub use images::{EncodedImages, FolderImages, ImageSource};
pub use source::{Dataset, Source};
pub use store::TensorFile;
pub use store::encoded::EncodedFile;

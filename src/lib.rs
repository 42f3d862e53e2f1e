/*!
Fast CIFAR training data: from the official tarballs to batches on the GPU with no wait.

# Brief overview

The crate follows the data, one module a stage:

* [`prep`] reads CIFAR-10/100 tarballs (binary or pickled, never executing a pickle) and writes
  one safetensors file per split: `images [N,3,32,32]` and `labels [N]`. The `cifar-prep`
  binary is a thin front for [`prep::prepare`].
* [`store`] opens such a file: [`TensorFile`] validates it, then memory-maps it.
*/
#![deny(missing_docs)]

pub mod error;
pub mod prep;
pub mod store;

pub use error::{Error, Result};
pub use store::TensorFile;

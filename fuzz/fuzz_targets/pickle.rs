//! Any bytes given to the pickle reader and the batch parser: an error or a value, never a
//! panic, a hang or an allocation beyond the input's size.
#![no_main]
use std::path::Path;

use cifar_data::prep::layout::{Kind, parse_batch, parse_meta};
use cifar_data::prep::pickle;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pickle::parse(data);
    let _ = parse_batch(Kind::Cifar10, data, Path::new("fuzz"));
    let _ = parse_batch(Kind::Cifar100, data, Path::new("fuzz"));
    let _ = parse_meta("batches.meta", data, Path::new("fuzz"));
});

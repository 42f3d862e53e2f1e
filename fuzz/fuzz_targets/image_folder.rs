//! Any bytes as a (gzipped) tar of an image folder, read as `cifar-prep` reads one: listed as
//! its extraction would be (links, repeated names, refusals), then every listed image's member
//! read and decoded under a small pixel limit.
#![no_main]
use std::collections::BTreeMap;
use std::path::Path;

use cifar_data::prep::image::decode;
use cifar_data::prep::listing::{Bytes, list_archive, read_members};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let gzipped = data.starts_with(&[0x1f, 0x8b]);
    let input = Path::new("fuzz.tar");
    let Ok(listing) = list_archive(data, gzipped, input) else { return };
    let wanted: BTreeMap<usize, u64> = listing
        .images
        .iter()
        .filter_map(|i| match i.bytes {
            Bytes::Member { number, size } => Some((number, size)),
            Bytes::File(_) => None,
        })
        .collect();
    let _ = read_members(data, gzipped, input, &wanted, |_, bytes| {
        let _ = decode(&bytes, Some((8, 8)), 1 << 16, input);
        Ok(true)
    });
});

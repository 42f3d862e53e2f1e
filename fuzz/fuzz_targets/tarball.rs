//! Any bytes as a (gzipped) tar of CIFAR members, each member then parsed as `cifar-prep` does.
#![no_main]
use std::path::Path;

use cifar_data::prep::layout::{Role, parse_batch, parse_meta};
use cifar_data::prep::tarball::for_each_archived_member;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let gzipped = data.starts_with(&[0x1f, 0x8b]);
    let _ = for_each_archived_member(data, gzipped, Path::new("fuzz.tar.gz"), |role, member, path, bytes| {
        match role {
            Role::Batch { kind, .. } => parse_batch(kind, &bytes, path).map(drop),
            Role::Meta { .. } => parse_meta(member, &bytes, path).map(drop),
        }
    });
});

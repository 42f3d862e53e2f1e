//! An image-folder archive means what extracting it means: `cifar-prep` on the archive gives
//! the tensors that `tar x` followed by `cifar-prep` on the folder gives (hard links, repeated
//! names, links inside it), or refuses with one error; never merges or drops silently.
mod common;

use std::path::Path;
use std::process::Command;

use cifar_fast::TensorFile;
use common::*;

fn png(seed: u32) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("cifar-fast-png-{}-{seed}", std::process::id()));
    let p = dir.join("x.png");
    write_image(&p, 8, 8, seed);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    bytes
}

fn header(size: usize, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    h
}

/// A tar builder's member kinds, raw names included.
enum M<'a> {
    File(&'a [u8], Vec<u8>),
    Hard(&'a str, &'a str),
    Sym(&'a str, &'a str),
}

fn write_tar(path: &Path, members: Vec<M>) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    for m in members {
        match m {
            M::File(name, bytes) => {
                // The name's bytes as given, '..' and non-UTF-8 ones included (which the
                // builder's own path setters refuse).
                let mut h = header(bytes.len(), tar::EntryType::Regular);
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                tar.append(&h, &bytes[..]).unwrap();
            }
            M::Hard(name, target) => {
                let mut h = header(0, tar::EntryType::Link);
                tar.append_link(&mut h, name, target).unwrap();
            }
            M::Sym(name, target) => {
                let mut h = header(0, tar::EntryType::Symlink);
                tar.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    tar.into_inner().unwrap();
}

/// One split as written: its name, classes, labels and pixel bytes.
type SplitTensors = (String, Vec<String>, Vec<i64>, Vec<u8>);

/// Every split of the `name` files in `dir`.
fn tensors(dir: &Path, name: &str) -> Vec<SplitTensors> {
    ["train", "test"]
        .iter()
        .filter_map(|split| {
            let f = TensorFile::open(dir.join(format!("{name}-{split}.safetensors"))).ok()?;
            let bytes = (0..f.len()).flat_map(|i| f.image_bytes(i).to_vec()).collect();
            Some((split.to_string(), f.classes().to_vec(), f.labels().to_vec(), bytes))
        })
        .collect()
}

/// `cifar-prep` on the archive equals `tar x` then `cifar-prep` on the extracted folder.
fn same_as_extracted(dir: &Path, archive: &Path) -> usize {
    let extracted = dir.join("extracted");
    std::fs::create_dir_all(&extracted).unwrap();
    let x = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(&extracted).output().unwrap();
    assert!(x.status.success(), "{}", text(&x));
    let (a, b) = (dir.join("from-archive"), dir.join("from-folder"));
    let o = run(prep_exe(), &[&archive, &"--out", &a, &"--name", &"set", &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(prep_exe(), &[&extracted.join("set"), &"--out", &b, &"--name", &"set", &"--dtype", &"u8"]);
    assert!(o.status.success(), "{}", text(&o));
    let (ta, tb) = (tensors(&a, "set"), tensors(&b, "set"));
    assert_eq!(ta, tb, "the archive and its extraction differ");
    ta.iter().map(|t| t.2.len()).sum()
}

#[test]
fn hard_links_repeated_names_and_inner_symlinks_are_what_extraction_gives() {
    let dir = scratch("archive_links");
    let archive = dir.join("set.tar");
    write_tar(
        &archive,
        vec![
            M::File(b"set/train/cat/a.png", png(1)),
            M::File(b"set/train/cat/b.png", png(2)),
            M::File(b"set/train/dog/c.png", png(3)),
            // GNU tar stores a file's second name so: 4 images where extraction gives 4.
            M::Hard("set/train/dog/a-again.png", "set/train/cat/a.png"),
            // The later of two members of one name is the one extracted.
            M::File(b"set/train/cat/b.png", png(4)),
            M::Sym("set/train/dog/linked.png", "../cat/b.png"),
            M::File(b"set/test/cat/t.png", png(5)),
            M::File(b"set/test/dog/u.png", png(6)),
        ],
    );
    assert_eq!(same_as_extracted(&dir, &archive), 5 + 2);
}

#[test]
fn gnu_tars_own_hard_links_are_kept() {
    let dir = scratch("archive_gnu_links");
    let root = dir.join("src/set");
    for (split, class, i) in
        [("train", "cat", 0), ("train", "dog", 1), ("test", "cat", 2), ("test", "dog", 3)]
    {
        write_image(&root.join(format!("{split}/{class}/{i}.png")), 8, 8, i);
    }
    std::fs::hard_link(root.join("train/cat/0.png"), root.join("train/dog/0-link.png")).unwrap();
    let archive = dir.join("set.tar.gz");
    let o = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.join("src"))
        .arg("set")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(same_as_extracted(&dir, &archive), 5);
}

#[test]
fn what_extraction_would_not_give_is_refused_naming_the_member() {
    let dir = scratch("archive_refused");
    let cases: Vec<(&str, Vec<M>, &str)> = vec![
        (
            "non-utf8",
            vec![M::File(b"set/train/\xff/a.png", png(1)), M::File(b"set/train/\xfe/b.png", png(2))],
            "not UTF-8",
        ),
        (
            "outside",
            vec![
                M::File(b"set/train/cat/a.png", png(1)),
                M::Sym("set/train/cat/p.png", "../../../../etc/passwd"),
            ],
            "outside the archive",
        ),
        (
            "absolute",
            vec![M::File(b"set/train/cat/a.png", png(1)), M::Sym("set/train/cat/p.png", "/etc/hostname")],
            "outside the archive",
        ),
        (
            "climbs",
            vec![M::File(b"set/train/cat/a.png", png(1)), M::File(b"set/train/../../b.png", png(2))],
            "climbs out",
        ),
        (
            "dir-link",
            vec![M::File(b"set/train/cat/a.png", png(1)), M::Sym("set/train/dog", "cat")],
            "links to folders are not followed",
        ),
        (
            "dangling",
            vec![M::File(b"set/train/cat/a.png", png(1)), M::Sym("set/train/cat/gone.png", "nothing.png")],
            "does not hold",
        ),
        (
            "late-link",
            vec![
                M::Hard("set/train/cat/a.png", "set/train/cat/b.png"),
                M::File(b"set/train/cat/b.png", png(1)),
            ],
            "no earlier member",
        ),
    ];
    for (name, members, says) in cases {
        let archive = dir.join(format!("{name}.tar"));
        write_tar(&archive, members);
        let out = dir.join(format!("out-{name}"));
        let o = run(prep_exe(), &[&archive, &"--out", &out]);
        let msg = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {msg}");
        assert!(msg.contains(says) && msg.contains(&format!("{name}.tar")), "{name}: {msg}");
        assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none(), "{name}: output left");
    }
}

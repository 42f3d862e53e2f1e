//! Pictures of the data and of a run: the class grid of `cifar-prep --preview`, the batch of
//! `cifar-train --preview-batch`, and the charts of `--plot`.
mod common;

use cifar_fast::prep::layout::CIFAR10_CLASSES as CLASSES;
use cifar_fast::preview::{
    cell_origin, denormalize, grid_size, label_width, labelled_cell_origin, labelled_grid_size,
};
use cifar_fast::{Augment, Dataset, Loader, TensorFile};
use common::*;

/// Asserts that the `scale`-times enlarged planar image `chw` is at (`x`, `y`) of `img`.
fn assert_cell(img: &image::RgbImage, x: u32, y: u32, chw: &[u8], scale: u32, what: &str) {
    for py in 0..32 * scale {
        for px in 0..32 * scale {
            let i = (py / scale * 32 + px / scale) as usize;
            let want = [chw[i], chw[1024 + i], chw[2048 + i]];
            assert_eq!(img.get_pixel(x + px, y + py).0, want, "{what}: pixel ({px}, {py})");
        }
    }
}

#[test]
fn the_class_grid_has_a_row_per_class_of_its_first_images_scaled_3x() {
    let dir = scratch("preview_grid");
    let tgz = dir.join("c.tar.gz");
    tar_gz(&tgz, &cifar10_members(20, 2, false));
    let png = dir.join("grid.png");
    let o = run(prep_exe(), &[&tgz, &"--out", &dir, &"--preview", &png]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(&png).unwrap().to_rgb8();
    let file = TensorFile::open(dir.join("cifar10-train.safetensors")).unwrap();
    let label_w = label_width(file.classes());
    assert_eq!(img.dimensions(), grid_size(label_w, 3, 10, 10));
    assert!(label_w >= 10 * 8 * 2, "room for 'automobile' at 16 px a letter");
    // Cells (class c, image k) hold the k-th image of class c by index, pixel for pixel.
    for (c, k) in [(0usize, 0usize), (3, 4), (9, 9)] {
        let i = (0..file.len()).filter(|&i| file.labels()[i] == c as i64).nth(k).unwrap();
        let (_, pixels) = records(i / 20, 20, 10);
        let source = &pixels[(i % 20) * IMG..(i % 20 + 1) * IMG];
        let (x, y) = cell_origin(label_w, 3, c as u32, k as u32);
        assert_cell(&img, x, y, source, 3, &format!("class {c}, image {k}"));
    }
    // The names are drawn: the name column is not blank.
    let ink = (0..label_w)
        .flat_map(|x| (0..img.height()).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0 == [0, 0, 0]);
    assert!(ink.count() > 100);
}

#[test]
fn the_batch_preview_is_the_first_batch_as_the_model_gets_it() {
    let dir = learnable_data(&scratch("preview_batch"), 12);
    let png = dir.join("batch.png");
    let args = ["--batch-size", "8", "--max-steps", "1", "--augment", "--seed", "3", "--device", "cpu"];
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"--data", &dir, &"--preview-batch", &png];
    all.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    let o = run(train_exe(), &all);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("wrote {}", png.display())), "{}", text(&o));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), labelled_grid_size(3, 1, 8));
    let data = Dataset::open(dir.join("cifar10-train.safetensors")).unwrap();
    let (mean, std) = (data.file().mean(), data.file().std());
    let mut loader =
        Loader::builder(data).batch_size(8).seed(3).augment(Augment::standard()).build().unwrap();
    let first = collect(loader.epoch(0)).remove(0);
    for k in [0usize, 5, 7] {
        let chw = denormalize(&first.1[k * IMG..(k + 1) * IMG], mean, std);
        let (x, y) = labelled_cell_origin(3, 0, k as u32);
        assert_cell(&img, x, y, &chw, 3, &format!("batch image {k}"));
        // Its class name is written under it: as many letters' worth of ink as the name has.
        let name = &CLASSES[first.2[k] as usize];
        let ink = |x0: u32, x1: u32| {
            (x0..x1)
                .flat_map(|x| (y + 97..y + 105).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0 == [0, 0, 0])
                .count()
        };
        let letters = name.len() as u32;
        assert!(ink(x, x + 8 * letters) > 4 * name.len(), "batch image {k}: no caption {name:?}");
        assert_eq!(ink(x + 8 * letters, x + 96), 0, "batch image {k}: caption longer than {name:?}");
    }
}

#[test]
fn the_charts_parse_and_the_confusion_matrix_adds_up() {
    let dir = learnable_data(&scratch("preview_plots"), 40);
    let (plots, metrics) = (dir.join("plots"), dir.join("m.jsonl"));
    let o = run(
        train_exe(),
        &[
            &"--data",
            &dir,
            &"--device",
            &"cpu",
            &"--batch-size",
            &"8",
            &"--epochs",
            &"2",
            &"--log-every",
            &"5",
            &"--plot",
            &plots,
            &"--metrics",
            &metrics,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    for name in ["loss.svg", "speed.svg", "data-wait.svg", "accuracy.svg", "confusion.svg"] {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{name} is not SVG: {e}"));
        assert!(text(&o).contains(&format!("wrote {}", plots.join(name).display())), "{}", text(&o));
    }
    // Integer axes print integers: the epochs are 1 and 2, the steps whole numbers.
    let labels = |name: &str| -> Vec<String> {
        let svg = std::fs::read_to_string(plots.join(name)).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect()
    };
    let acc = labels("accuracy.svg");
    assert!(acc.contains(&"1".to_string()) && acc.contains(&"2".to_string()), "{acc:?}");
    assert!(!acc.iter().any(|t| t == "1.5" || t == "1.0"), "{acc:?}");
    let loss = labels("loss.svg");
    let steps: Vec<&String> = loss.iter().filter(|t| t.parse::<f64>().is_ok_and(|v| v >= 5.0)).collect();
    assert!(!steps.is_empty() && steps.iter().all(|t| t.parse::<u64>().is_ok()), "{loss:?}");
    let svg = std::fs::read_to_string(plots.join("confusion.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let texts: Vec<&str> =
        doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).collect();
    let counts: Vec<u64> = texts.iter().filter_map(|t| t.trim().parse().ok()).collect();
    assert_eq!(counts.len(), 100, "a count in each of the 10x10 cells");
    assert_eq!(counts.iter().sum::<u64>(), 40, "the counts sum to the test set");
    for class in ["airplane", "truck"] {
        assert_eq!(texts.iter().filter(|t| t.trim() == class).count(), 2, "{class} on both axes");
    }
    // Row by row, so the diagonal is counts[11 * c]; it matches the reported accuracy.
    let diagonal: u64 = (0..10).map(|c| counts[11 * c]).sum();
    let summary: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&metrics).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(diagonal as f64 / 40.0, summary["test_accuracy"].as_f64().unwrap());
    for (c, class) in ["airplane", "automobile"].iter().enumerate() {
        let row: u64 = counts[10 * c..10 * c + 10].iter().sum();
        let acc = summary["per_class_accuracy"][class].as_f64().unwrap();
        assert_eq!(counts[11 * c] as f64 / row as f64, acc, "{class}");
    }
}

//! `--plot DIR`: SVG charts of a run, drawn with plotters (SVG needs no font files: the text
//! goes into the file as text): the loss, test accuracy, speed and data wait, and the test
//! set's confusion matrix.
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Evaluation;
use crate::error::{Error, Result};

/// What a run logged, for the charts: a point every second or so of training, and at each
/// epoch's end.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// `(global step, mean loss since the last point)`.
    pub loss: Vec<(usize, f64)>,
    /// `(global step, images/s, data-wait share)` since the last point.
    pub speed: Vec<(usize, f64, f64)>,
    /// `(epoch, test accuracy)` after each evaluation.
    pub accuracy: Vec<(u64, f64)>,
}

fn fail(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::format(path, format!("cannot draw: {e}"))
}

/// An exponential moving average (weight 0.7 on the past), for the smoothed loss.
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let mut avg = None;
    values
        .iter()
        .map(|&v| {
            let a = avg.map_or(v, |a: f64| 0.7 * a + 0.3 * v);
            avg = Some(a);
            a
        })
        .collect()
}

/// A line's name, its `(x, y)` points (x a step or epoch number) and its colour.
type Series<'a> = (&'a str, Vec<(i64, f64)>, RGBColor);

fn line_chart(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Series<'_>]) -> Result<()> {
    let err = fail(path);
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let points = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (i64::MAX, i64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0, 1, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1.max(x0 + 1), (y0 - pad)..(y1 + pad))
        .map_err(|e| err(e.to_string()))?;
    // Integer x labels, at most one per integer (an axis of 2 epochs gets 1 and 2, not 1.5).
    let labels = (x1.max(x0 + 1) - x0 + 1).clamp(2, 10) as usize;
    chart
        .configure_mesh()
        .x_labels(labels)
        .x_label_formatter(&|x| x.to_string())
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (name, pts, color) in series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        // A line of few points (accuracy over a few epochs; one is no line at all) shows them.
        if pts.len() <= 30 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// The confusion matrix: true class down, predicted class across, the count in each cell,
/// shaded by its share of the row.
pub fn confusion_chart(path: &Path, eval: &Evaluation, classes: &[String]) -> Result<()> {
    let err = fail(path);
    let n = eval.confusion.len();
    let (cell, left, top) = (56i32, 120i32, 70i32);
    let size = (left + cell * n as i32 + 20, top + cell * n as i32 + 110);
    let root = SVGBackend::new(path, (size.0 as u32, size.1 as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let style = ("sans-serif", 13).into_font();
    let draw = |e: &dyn Fn() -> std::result::Result<(), String>| e();
    draw(&|| {
        root.draw(&Text::new(
            "confusion matrix (rows: true class, columns: predicted)",
            (10, 20),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(|e| e.to_string())
    })
    .map_err(&err)?;
    for (t, row) in eval.confusion.iter().enumerate() {
        let total: u64 = row.iter().sum::<u64>().max(1);
        let name = classes.get(t).cloned().unwrap_or_else(|| format!("class {t}"));
        let y = top + cell * t as i32;
        root.draw(&Text::new(name, (8, y + cell / 2 - 6), style.clone())).map_err(|e| err(e.to_string()))?;
        for (p, &count) in row.iter().enumerate() {
            let x = left + cell * p as i32;
            let share = count as f64 / total as f64;
            let shade = (255.0 * (1.0 - 0.8 * share)) as u8;
            root.draw(&Rectangle::new(
                [(x, y), (x + cell - 1, y + cell - 1)],
                RGBColor(shade, shade, 255).filled(),
            ))
            .map_err(|e| err(e.to_string()))?;
            root.draw(&Text::new(count.to_string(), (x + 8, y + cell / 2 - 6), style.clone()))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    let below = top + cell * n as i32 + 8;
    for p in 0..n {
        let name = classes.get(p).cloned().unwrap_or_else(|| format!("class {p}"));
        let rotated = ("sans-serif", 13).into_font().transform(FontTransform::Rotate90);
        root.draw(&Text::new(name, (left + cell * p as i32 + cell / 2 - 6, below), rotated))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// The charts' file names.
pub const CHARTS: [&str; 5] = ["loss.svg", "speed.svg", "data-wait.svg", "accuracy.svg", "confusion.svg"];

/// A chart's file name and why it was not drawn.
pub type NotDrawn = (String, String);

/// Writes every chart the run has data for into `dir`; returns the files written, and the
/// charts not drawn with the reason. A directory this made is not left behind empty, and a
/// failure leaves none of the charts it began.
pub fn write_all(
    dir: &Path,
    history: &History,
    eval: Option<&Evaluation>,
    classes: &[String],
) -> Result<(Vec<PathBuf>, Vec<NotDrawn>)> {
    let existed = dir.exists();
    let (mut files, mut skipped) = (Vec::new(), Vec::new());
    let drawn = write_charts(dir, history, eval, classes, &mut files, &mut skipped);
    if drawn.is_err() {
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        files.clear();
    }
    if !existed && files.is_empty() {
        let _ = std::fs::remove_dir(dir);
    }
    drawn.map(|()| (files, skipped))
}

fn write_charts(
    dir: &Path,
    history: &History,
    eval: Option<&Evaluation>,
    classes: &[String],
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<NotDrawn>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let steps = |v: &[(usize, f64)]| v.iter().map(|&(s, y)| (s as i64, y)).collect::<Vec<_>>();
    if history.loss.len() >= 2 {
        let raw: Vec<f64> = history.loss.iter().map(|p| p.1).collect();
        let smoothed: Vec<(usize, f64)> = history.loss.iter().map(|p| p.0).zip(smooth(&raw)).collect();
        let path = dir.join("loss.svg");
        line_chart(
            &path,
            "training loss",
            "step",
            "cross-entropy",
            &[
                ("mean loss", steps(&history.loss), RGBColor(255, 153, 153)),
                ("smoothed", steps(&smoothed), RED),
            ],
        )?;
        files.push(path);
        let path = dir.join("speed.svg");
        let ips: Vec<(usize, f64)> = history.speed.iter().map(|p| (p.0, p.1)).collect();
        line_chart(&path, "training speed", "step", "images/s", &[("images/s", steps(&ips), BLUE)])?;
        files.push(path);
        let path = dir.join("data-wait.svg");
        let wait: Vec<(usize, f64)> = history.speed.iter().map(|p| (p.0, 100.0 * p.2)).collect();
        line_chart(
            &path,
            "share of step time waiting on data",
            "step",
            "%",
            &[("data wait", steps(&wait), GREEN)],
        )?;
        files.push(path);
    } else {
        let why = "the run trained too briefly for two points (one a second of training)";
        for name in ["loss.svg", "speed.svg", "data-wait.svg"] {
            skipped.push((name.to_string(), why.to_string()));
        }
    }
    if !history.accuracy.is_empty() {
        let path = dir.join("accuracy.svg");
        let acc: Vec<(i64, f64)> = history.accuracy.iter().map(|&(e, a)| (e as i64 + 1, 100.0 * a)).collect();
        line_chart(&path, "test accuracy", "epoch", "%", &[("test accuracy", acc, MAGENTA)])?;
        files.push(path);
    } else {
        skipped.push(("accuracy.svg".into(), "no epoch finished with an evaluation".into()));
    }
    match eval {
        Some(eval) if eval.confusion.is_empty() => skipped.push((
            "confusion.svg".into(),
            format!("more than {} classes", super::evaluate::MAX_CONFUSION_CLASSES),
        )),
        Some(eval) => {
            let path = dir.join("confusion.svg");
            confusion_chart(&path, eval, classes)?;
            files.push(path);
        }
        None => skipped.push(("confusion.svg".into(), "the model was not evaluated".into())),
    }
    Ok(())
}

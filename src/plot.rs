//! PNG charts with plotters: lines (accuracy over time or bytes) and histograms (staleness).
//! Text uses an embedded ASCII subset of DejaVu Sans (`data/font/`), so charts render on
//! machines without fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// A chart that could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

static FONT: &[u8] = include_bytes!("../data/font/DejaVuSans-subset.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Registration only fails on a malformed font, which the tests would catch.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Colours for series, readable on white.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError { path: path.display().to_string(), message }
}

/// Series of (x, y) points with their names.
pub type Series = [(String, Vec<(f64, f64)>)];

/// A line chart: one line per series, with a legend.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &Series,
) -> Result<(), PlotError> {
    register_font();
    let e = err(path);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    draw_lines(&root, title, 22, x_label, y_label, series).map_err(&e)?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

/// One panel of [`line_panels`].
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: &'a Series,
}

/// Line charts side by side under one title.
pub fn line_panels(path: &Path, title: &str, panels: &[Panel<'_>]) -> Result<(), PlotError> {
    register_font();
    let e = err(path);
    let n = panels.len().max(1);
    let root = BitMapBackend::new(path, (640 * n as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|x| e(x.to_string()))?;
    for (p, area) in panels.iter().zip(root.split_evenly((1, n)).iter()) {
        draw_lines(area, p.title, 17, p.x_label, p.y_label, p.series).map_err(&e)?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    title_size: u32,
    x_label: &str,
    y_label: &str,
    series: &Series,
) -> Result<(), String> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) =
        (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    // Time-like axes start at zero; others span their data.
    let x0 = if x0 >= 0.0 && x0 <= 0.2 * x1 { 0.0 } else { x0 };
    let xpad = ((x1 - x0) * 0.02).max(1e-9);
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let s = |x: DrawingAreaErrorKind<_>| x.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", title_size))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1 + xpad, (y0 - pad)..(y1 + pad))
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(s)?;
    for (i, (name, p)) in series.iter().enumerate() {
        let c = color(i);
        chart
            .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
            .map_err(s)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if p.len() <= 30 {
            // Few points (a sweep): mark each measurement.
            chart.draw_series(p.iter().map(|&pt| Circle::new(pt, 3, c.filled()))).map_err(s)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(s)?;
    Ok(())
}

/// Histograms side by side: one panel per series, bars over the bins 0..counts.len().
pub fn histograms(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
) -> Result<(), PlotError> {
    register_font();
    let e = err(path);
    let cols = series.len().clamp(1, 4);
    let rows = series.len().div_ceil(cols).max(1);
    let root = BitMapBackend::new(path, (300 * cols as u32, 240 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|x| e(x.to_string()))?;
    let panels = root.split_evenly((rows, cols));
    for (i, ((name, counts), area)) in series.iter().zip(panels.iter()).enumerate() {
        let top = counts.iter().copied().fold(0.0, f64::max).max(1e-9);
        let bins = counts.len().max(1) as u32;
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((0u32..bins).into_segmented(), 0.0..top * 1.1)
            .map_err(|x| e(x.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc(x_label)
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let c = color(i);
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(c.filled())
                    .margin(1)
                    .data(counts.iter().enumerate().map(|(b, &v)| (b as u32, v))),
            )
            .map_err(|x| e(x.to_string()))?;
    }
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.png");
        lines(
            &p,
            "accuracy",
            "seconds",
            "accuracy",
            &[("asp".into(), vec![(0.0, 0.1), (1.0, 0.5), (2.0, 0.7)])],
        )
        .unwrap();
        let h = dir.path().join("h.png");
        histograms(
            &h,
            "staleness",
            "staleness",
            &[("asp".into(), vec![0.5, 0.3, 0.2]), ("bsp".into(), vec![1.0])],
        )
        .unwrap();
        for f in [p, h] {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        }
    }
}

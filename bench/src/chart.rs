//! The PNG chart of the latency percentiles: one curve per distribution of row 2, latency
//! (log scale) over the percentile (spaced as `log10(1 / (1 - q))`, so 90%, 99% and 99.9% are
//! equally far apart), with the targets as dashed lines. Drawn by plotters' bitmap backend
//! into a buffer, text through ab_glyph with DejaVu Sans read at run time, encoded with `png`.

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::latency::{Series, TARGET_STREAM_P99_MS, TARGET_VIEW_P99_MS};
use crate::report::Machine;

/// The font the chart's text is drawn with.
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 720;

/// A font registered for the chart.
#[derive(Debug, Clone, Copy)]
pub struct Font(());

/// Reads and registers the chart's font; fails with what to install when it is missing.
pub fn load_font() -> Result<Font> {
    let bytes = std::fs::read(FONT_PATH).with_context(|| {
        format!(
            "the latency chart needs the font {FONT_PATH}: install the Debian package \
             fonts-dejavu-core (`apt-get install fonts-dejavu-core`), or leave out row 2 (--only)"
        )
    })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT_PATH} is not a usable TrueType font"))?;
    Ok(Font(()))
}

/// Curve colours, in the order of the series.
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(127, 127, 127),
];

/// The chart's second line: the load, when, and on what.
pub fn subtitle(rate: u64, secs: f64, started_at: &str, machine: &Machine) -> String {
    format!(
        "{rate} transactions/s offered for {secs} s; run of {started_at} on {} × {} (load average {:.2} at the start)",
        machine.cpus, machine.cpu, machine.load_start[0]
    )
}

/// Draws `series` and returns the PNG file's bytes.
pub fn latency_png(_font: Font, series: &[Series], subtitle: &str) -> Result<Vec<u8>> {
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(&mut pixels, series, subtitle).map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // A chart is mostly flat colour: the strongest settings keep the file small.
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&pixels))
        .context("encoding the chart as PNG")?;
    Ok(png)
}

fn draw(
    pixels: &mut [u8],
    series: &[Series],
    subtitle: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(pixels, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title_area, plot_area) = root.split_vertically(70);
    title_area.draw(&Text::new(
        "Latency percentiles (row 2 of cdc-bench)",
        (20, 12),
        (FAMILY, 26).into_font(),
    ))?;
    title_area.draw(&Text::new(
        subtitle.to_owned(),
        (20, 44),
        (FAMILY, 16).into_font().color(&RGBColor(90, 90, 90)),
    ))?;

    let all = series
        .iter()
        .flat_map(|s| s.curve.iter().map(|&(_, ms)| ms));
    let top = all
        .clone()
        .fold(TARGET_VIEW_P99_MS, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.6;
    let bottom = all
        .filter(|&ms| ms > 0.0)
        .fold(f64::INFINITY, f64::min)
        .clamp(0.01, 1.0)
        / 1.5;
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..3f64, (bottom..top).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(4)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|ms| {
            if *ms < 1.0 {
                format!("{ms:.2} ms")
            } else {
                format!("{ms:.0} ms")
            }
        })
        .x_desc("percentile")
        .y_desc("latency (log scale)")
        .label_style((FAMILY, 16))
        .axis_desc_style((FAMILY, 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = s
            .curve
            .iter()
            .map(|&(q, ms)| (-(1.0 - q).max(1e-3).log10(), ms.max(bottom)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(3)))?
            .label(format!(
                "{}: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms (n = {})",
                s.label, s.p50_ms, s.p99_ms, s.max_ms, s.n
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    for (ms, to, color) in [
        (TARGET_STREAM_P99_MS, "stream", COLORS[0]),
        (TARGET_VIEW_P99_MS, "view", COLORS[1]),
    ] {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, ms), (3.0, ms)],
                8,
                6,
                color.stroke_width(1),
            ))?
            .label(format!("target: p99 ≤ {ms:.0} ms to the {to}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(1))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font((FAMILY, 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// The percentile at axis position `x = log10(1 / (1 - q))`: 0 → 0%, 1 → 90%, 2 → 99%, …
fn percentile_label(x: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as usize).saturating_sub(2);
    format!("{q:.digits$}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
    }
}

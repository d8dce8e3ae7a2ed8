//! The latency chart: one percentile curve per pass, as an SVG.

use std::path::Path;

use plotters::prelude::*;

use super::report::Report;
use super::BenchError;

/// Chart size in pixels.
const SIZE: (u32, u32) = (960, 600);
/// The x axis ends at p99.9: three nines.
const MAX_NINES: f64 = 3.0;
/// Empty space added below the curves, as a share of their span (log).
const LEGEND_ROOM: f64 = 0.6;
/// Line colours, one per pass in order (Tableau's ten, then black): easy
/// to tell apart, and none too pale on white.
const COLORS: [RGBColor; 11] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
];

/// Writes the latency distribution of every pass with replies to `path`.
///
/// The x axis counts nines (`-log10(1 - quantile)`), so p50, p90, p99 and
/// p99.9 are evenly spaced and the tail gets the room it deserves; the y
/// axis is logarithmic because the echo and the KV passes are an order of
/// magnitude apart. Baselines are dashed, idemq's passes solid.
pub(super) fn write_svg(report: &Report, path: &Path) -> Result<(), BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Plot {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let curves: Vec<_> = report
        .scenarios
        .iter()
        .filter(|s| !s.curve.is_empty())
        .collect();
    let values = curves
        .iter()
        .flat_map(|s| s.curve.iter().map(|&(_, ms)| ms));
    let (low, high) = values.fold((f64::MAX, 0.0f64), |(low, high), ms| {
        (low.min(ms), high.max(ms))
    });
    if curves.is_empty() || high <= 0.0 {
        return Err(failed(&"no pass has latencies to draw"));
    }
    // Room below the fastest curve for the legend, in the lower right.
    let low = low.max(0.001);
    let high = high * 1.25;
    let low = low / 10f64.powf((high / low).log10() * LEGEND_ROOM);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let title = format!(
        "idemq-bench: latency by percentile ({} requests per pass, concurrency {}, {} B; \
         baselines dashed)",
        report.settings.count, report.settings.concurrency, report.settings.payload_bytes
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..MAX_NINES, (low..high).log_scale())
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(4)
        .x_label_formatter(&|nines| percentile_label(*nines))
        .y_label_formatter(&|ms| format!("{ms}"))
        .draw()
        .map_err(|e| failed(&e))?;
    for (index, scenario) in curves.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let style = color.stroke_width(2);
        let points = scenario.curve.iter().copied();
        let series = if scenario.name.starts_with("idemq") {
            chart.draw_series(LineSeries::new(points, style))
        } else {
            chart.draw_series(DashedLineSeries::new(points, 6, 4, style))
        };
        series
            .map_err(|e| failed(&e))?
            .label(scenario.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))
}

/// `0` -> "p0", `1` -> "p90", `2` -> "p99", `3` -> "p99.9".
fn percentile_label(nines: f64) -> String {
    let percent = 100.0 * (1.0 - 10f64.powf(-nines));
    format!("p{}", (percent * 10.0).round() / 10.0)
}

//! The incident report's plot (SVG, plotters): open connections of each backend against its
//! `max_conns` over time, and refusals per second below, with the scenario's steps marked.

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;

/// One status sample.
#[derive(Clone, Debug, Default)]
pub struct Point {
    pub t: f64,
    /// backend → (open, max_conns)
    pub backends: BTreeMap<String, (u64, u64)>,
    /// refusals (all reasons, all backends) so far
    pub refused: u64,
}

const COLORS: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(44, 160, 44), RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(23, 190, 207)];

/// Draws `points` with vertical `marks` (time, label) into an SVG file.
pub fn draw(path: &Path, title: &str, points: &[Point], marks: &[(f64, String)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(420);
    let t_max = points.last().map_or(1.0, |p| p.t).max(1.0);
    let y_max = points.iter().flat_map(|p| p.backends.values().map(|(o, m)| (*o).max(*m))).max().unwrap_or(1) as f64 * 1.15;
    let mut chart =
        ChartBuilder::on(&top).caption(title, ("sans-serif", 20)).margin(10).x_label_area_size(30).y_label_area_size(50).build_cartesian_2d(0.0..t_max, 0.0..y_max.max(1.0))?;
    chart.configure_mesh().x_desc("seconds").y_desc("open connections").draw()?;
    let names: Vec<String> = points.iter().flat_map(|p| p.backends.keys().cloned()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for (i, name) in names.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let open: Vec<(f64, f64)> = points.iter().filter_map(|p| p.backends.get(name).map(|(o, _)| (p.t, *o as f64))).collect();
        chart
            .draw_series(LineSeries::new(open, color.stroke_width(2)))?
            .label(format!("{name} open"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    // max_conns: the same for every backend in the lab's scenario; drawn once per distinct step.
    let limit: Vec<(f64, f64)> = points.iter().filter_map(|p| p.backends.values().map(|(_, m)| *m).min().map(|m| (p.t, m as f64))).collect();
    chart.draw_series(LineSeries::new(limit, RED.stroke_width(2)))?.label("max_conns").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    for (t, label) in marks {
        chart.draw_series(LineSeries::new(vec![(*t, 0.0), (*t, y_max)], BLACK.mix(0.4)))?;
        chart.draw_series(std::iter::once(Text::new(label.clone(), (*t, y_max * 0.97), ("sans-serif", 12))))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw()?;

    let rates: Vec<(f64, f64)> = points
        .windows(2)
        .map(|w| {
            let dt = (w[1].t - w[0].t).max(1e-3);
            (w[1].t, w[1].refused.saturating_sub(w[0].refused) as f64 / dt)
        })
        .collect();
    let r_max = rates.iter().map(|r| r.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&bottom).margin(10).x_label_area_size(30).y_label_area_size(50).build_cartesian_2d(0.0..t_max, 0.0..r_max)?;
    chart.configure_mesh().x_desc("seconds").y_desc("refused / s").draw()?;
    chart
        .draw_series(LineSeries::new(rates, RED.stroke_width(2)))?
        .label("refused connections per second (RST)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    for (t, _) in marks {
        chart.draw_series(LineSeries::new(vec![(*t, 0.0), (*t, r_max)], BLACK.mix(0.4)))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::UpperRight).draw()?;
    root.present()?;
    Ok(())
}

/// A plain line chart (the benchmarks' plots): one line with points per named series.
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    // Points that are not finite are left out: plotters loops or overflows on such a range (a
    // bench's short run can divide by a zero baseline).
    let series: Vec<(String, Vec<(f64, f64)>)> = series.iter().map(|(n, p)| (n.clone(), p.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect())).collect();
    let series = &series[..];
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    let x_max = all().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let y_min = all().map(|p| p.1).fold(0.0, f64::min) * 1.15;
    let y_max = (all().map(|p| p.1).fold(0.0, f64::max) * 1.15).max(y_min + 1e-3);
    let mut chart =
        ChartBuilder::on(&root).caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(36).y_label_area_size(64).build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).position(SeriesLabelPosition::UpperLeft).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod line_tests {
    /// A bench's short run draws from one point, zeros or a value that is not finite: the plot
    /// is drawn, not a panic inside plotters.
    #[test]
    fn degenerate_series_draw() {
        let dir = std::env::temp_dir().join(format!("sluice-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (i, points) in [vec![(500.0, 0.0)], vec![(500.0, f64::INFINITY)], vec![(500.0, f64::NAN), (600.0, 3.0)], vec![(0.0, -2.0)], vec![]].into_iter().enumerate() {
            super::lines(&dir.join(format!("{i}.svg")), "t", "x", "y", &[("s".to_owned(), points)]).expect("drawn");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

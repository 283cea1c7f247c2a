//! # kron-plot
//!
//! Renders the curves that kron's examples write (a CSV with the columns
//! `optimizer,epoch,step,seconds,train_loss,test_loss,test_accuracy`) to two SVG figures: the
//! training loss against optimizer steps and against training seconds, one line per optimizer,
//! on a logarithmic loss axis. It draws with plotters' SVG backend only, which writes text as
//! SVG `<text>` elements and so needs no font files or system font libraries.
//!
//! ```no_run
//! use std::path::Path;
//!
//! let curves = kron_plot::read_csv(Path::new("out/autoencoder.csv")).unwrap();
//! let written = kron_plot::render(&curves, Path::new("book/src/figures/autoencoder"), "autoencoder")
//!     .unwrap();
//! assert_eq!(written.len(), 2); // autoencoder-steps.svg, autoencoder-seconds.svg
//! ```

use std::error::Error;
use std::fmt;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

/// The columns the examples write, in their order.
pub const COLUMNS: [&str; 7] = [
    "optimizer",
    "epoch",
    "step",
    "seconds",
    "train_loss",
    "test_loss",
    "test_accuracy",
];

/// One evaluation point of one optimizer's run.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Optimizer steps taken.
    pub step: f64,
    /// Training seconds so far.
    pub seconds: f64,
    /// Loss on the fixed training subset.
    pub train_loss: f64,
}

/// One optimizer's curve, in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// The optimizer's name, as in the CSV.
    pub optimizer: String,
    /// Its points.
    pub points: Vec<Point>,
}

/// A CSV that cannot be read as the examples' curves.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvError {
    /// The 1-based line, or 0 for the file as a whole.
    pub line: usize,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for CsvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.detail)
        } else {
            write!(f, "line {}: {}", self.line, self.detail)
        }
    }
}

impl Error for CsvError {}

/// Parses the text of an examples' CSV into one curve per optimizer, in order of first
/// appearance. The header must name at least the columns `optimizer`, `step`, `seconds` and
/// `train_loss` (in any order); other columns are ignored.
pub fn parse_csv(text: &str) -> Result<Vec<Curve>, CsvError> {
    let mut lines = text.lines().enumerate();
    let (_, header) = lines.next().ok_or(CsvError {
        line: 0,
        detail: "the file is empty".into(),
    })?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        names.iter().position(|n| *n == name).ok_or(CsvError {
            line: 1,
            detail: format!("no column {name:?} in the header {header:?}"),
        })
    };
    let (c_opt, c_step, c_sec, c_loss) = (
        col("optimizer")?,
        col("step")?,
        col("seconds")?,
        col("train_loss")?,
    );
    let mut curves: Vec<Curve> = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let lineno = i + 1;
        if fields.len() != names.len() {
            return Err(CsvError {
                line: lineno,
                detail: format!(
                    "{} fields where the header has {}",
                    fields.len(),
                    names.len()
                ),
            });
        }
        let num = |c: usize| {
            fields[c].parse::<f64>().map_err(|e| CsvError {
                line: lineno,
                detail: format!(
                    "column {:?}: {:?} is not a number ({e})",
                    names[c], fields[c]
                ),
            })
        };
        let point = Point {
            step: num(c_step)?,
            seconds: num(c_sec)?,
            train_loss: num(c_loss)?,
        };
        let name = fields[c_opt];
        match curves.iter_mut().find(|c| c.optimizer == name) {
            Some(c) => c.points.push(point),
            None => curves.push(Curve {
                optimizer: name.to_string(),
                points: vec![point],
            }),
        }
    }
    if curves.is_empty() {
        return Err(CsvError {
            line: 0,
            detail: "the file has a header but no rows".into(),
        });
    }
    Ok(curves)
}

/// Reads and parses an examples' CSV; errors name the file.
pub fn read_csv(path: &Path) -> Result<Vec<Curve>, Box<dyn Error>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_csv(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// The horizontal axis of a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// Optimizer steps.
    Steps,
    /// Training seconds (evaluation excluded).
    Seconds,
}

impl XAxis {
    /// The suffix of the figure's file name.
    pub fn suffix(self) -> &'static str {
        match self {
            XAxis::Steps => "steps",
            XAxis::Seconds => "seconds",
        }
    }

    fn value(self, p: &Point) -> f64 {
        match self {
            XAxis::Steps => p.step,
            XAxis::Seconds => p.seconds,
        }
    }

    fn label(self) -> &'static str {
        match self {
            XAxis::Steps => "optimizer steps",
            XAxis::Seconds => "training seconds",
        }
    }
}

/// Line colours, one per optimizer in order (then repeating): colour-blind-safe hues.
const COLORS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

/// The points of a curve that a logarithmic loss axis can show: finite, with a positive loss.
fn plottable(c: &Curve, x: XAxis) -> Vec<(f64, f64)> {
    c.points
        .iter()
        .map(|p| (x.value(p), p.train_loss))
        .filter(|(a, l)| a.is_finite() && l.is_finite() && *l > 0.0)
        .collect()
}

/// Draws one figure: training loss (log scale) against `x`, one line per curve, to `path`.
pub fn render_one(
    curves: &[Curve],
    x: XAxis,
    title: &str,
    path: &Path,
) -> Result<(), Box<dyn Error>> {
    let series: Vec<(&str, Vec<(f64, f64)>)> = curves
        .iter()
        .map(|c| (c.optimizer.as_str(), plottable(c, x)))
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    if series.is_empty() {
        return Err(format!(
            "{}: no point with a finite, positive loss to plot",
            path.display()
        )
        .into());
    }
    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = all().map(|p| p.0).fold(0.0f64, f64::max);
    let x_max = if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all().map(|p| p.1).fold(0.0f64, f64::max);
    let (lo, hi) = if hi > lo * 1.01 {
        (lo / 1.1, hi * 1.1)
    } else {
        (lo / 2.0, hi * 2.0)
    };

    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(path, (760, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: training loss against {}", x.label()),
            ("sans-serif", 20),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0.0..x_max,
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )?;
    chart
        .configure_mesh()
        .x_desc(x.label())
        .y_desc("training loss (log scale)")
        .y_label_formatter(&|v| format_loss(*v))
        .x_label_formatter(&|v| format_x(*v))
        .label_style(("sans-serif", 13))
        .axis_desc_style(("sans-serif", 15))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(TRANSPARENT)
        .draw()?;
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 22, ly)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Tick values for a logarithmic axis from `lo` to `hi`: the multiples of powers of ten by the
/// coarsest set of mantissas (1; 1, 2, 5; 1 to 9; then finer) that gives at least four ticks,
/// or evenly spaced round values on a range too narrow for any of them.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    const SETS: [&[f64]; 4] = [
        &[1.0],
        &[1.0, 2.0, 5.0],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
        &[
            1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0,
        ],
    ];
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return Vec::new();
    }
    let (k0, k1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    for set in SETS {
        let ticks: Vec<f64> = (k0..=k1)
            .flat_map(|k| set.iter().map(move |m| m * 10f64.powi(k)))
            .filter(|v| *v >= lo && *v <= hi)
            .collect();
        if ticks.len() >= 4 {
            return ticks;
        }
    }
    // Less than a factor of two: evenly spaced round values.
    let raw = (hi - lo) / 5.0;
    let unit = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * unit)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * unit);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// A loss tick label: three significant digits.
fn format_loss(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else {
        format!("{v:.3e}")
    }
}

/// A step or seconds tick label, without trailing zeros.
fn format_x(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Draws both figures for `curves`: `{prefix}-steps.svg` and `{prefix}-seconds.svg`, with
/// `title` in their captions. Returns the paths written.
pub fn render(
    curves: &[Curve],
    prefix: &Path,
    title: &str,
) -> Result<Vec<PathBuf>, Box<dyn Error>> {
    let mut written = Vec::new();
    for x in [XAxis::Steps, XAxis::Seconds] {
        let mut name = prefix.file_name().unwrap_or_default().to_os_string();
        name.push(format!("-{}.svg", x.suffix()));
        let path = prefix.with_file_name(name);
        render_one(curves, x, title, &path)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "optimizer,epoch,step,seconds,train_loss,test_loss,test_accuracy\n\
        sgd,0,0,0.0000,2.30,2.31,0.1\n\
        sgd,1,50,1.5000,0.90,0.95,0.7\n\
        sgd,2,100,3.0000,0.50,0.60,0.8\n\
        kfac,0,0,0.0000,2.30,2.31,0.1\n\
        kfac,1,50,2.5000,0.20,0.30,0.9\n\
        kfac,2,100,5.0000,0.05,0.20,0.95\n\
        adam,0,0,0.0000,2.30,2.31,\n\
        adam,1,50,1.6000,0.40,0.45,\n";

    #[test]
    fn parses_one_curve_per_optimizer_in_order() {
        let c = parse_csv(CSV).unwrap();
        let names: Vec<&str> = c.iter().map(|c| c.optimizer.as_str()).collect();
        assert_eq!(names, ["sgd", "kfac", "adam"]);
        assert_eq!(c[1].points.len(), 3);
        assert_eq!(
            c[1].points[2],
            Point {
                step: 100.0,
                seconds: 5.0,
                train_loss: 0.05
            }
        );
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = parse_csv("optimizer,step,seconds\nsgd,1,2\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.detail.contains("train_loss"), "{e}");
        let e = parse_csv("optimizer,step,seconds,train_loss\nsgd,1,2,x\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("\"train_loss\""), "{e}");
        let e = parse_csv("optimizer,step,seconds,train_loss\nsgd,1,2\n").unwrap_err();
        assert!(e.detail.contains("3 fields"), "{e}");
        assert!(parse_csv("").is_err());
        assert!(parse_csv("optimizer,step,seconds,train_loss\n").is_err());
    }

    #[test]
    fn renders_two_svgs_with_text_and_one_line_per_optimizer() {
        let dir = std::env::temp_dir().join(format!("kron-plot-{}", std::process::id()));
        let curves = parse_csv(CSV).unwrap();
        let written = render(&curves, &dir.join("figs/demo"), "demo").unwrap();
        assert_eq!(
            written,
            [
                dir.join("figs/demo-steps.svg"),
                dir.join("figs/demo-seconds.svg")
            ]
        );
        for path in &written {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
            assert!(svg.contains("<text"), "no text elements");
            // Legend entries and axis titles are SVG text, not outlines: no font is needed.
            for name in ["sgd", "kfac", "adam", "training loss (log scale)"] {
                assert!(
                    svg.contains(&format!(">\n{name}\n</text>")),
                    "no text {name:?}"
                );
            }
            // One polyline per optimizer, plus one short line per legend entry.
            assert!(svg.matches("<polyline").count() >= 3, "{svg}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn points_a_log_axis_cannot_show_are_left_out() {
        let c =
            parse_csv("optimizer,step,seconds,train_loss\nsgd,0,0,0\nsgd,1,1,NaN\nsgd,2,2,0.5\n")
                .unwrap();
        assert_eq!(plottable(&c[0], XAxis::Steps), [(2.0, 0.5)]);
        let none = parse_csv("optimizer,step,seconds,train_loss\nsgd,0,0,0\n").unwrap();
        let dir = std::env::temp_dir().join(format!("kron-plot-empty-{}", std::process::id()));
        assert!(render_one(&none, XAxis::Steps, "t", &dir.join("x.svg")).is_err());
    }

    #[test]
    fn log_ticks_are_round_and_enough() {
        assert_eq!(log_ticks(0.5, 2000.0), [1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(log_ticks(0.9, 11.0), [1.0, 2.0, 5.0, 10.0]);
        assert_eq!(
            log_ticks(40.0, 110.0),
            [40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
        );
        assert_eq!(log_ticks(50.0, 60.0), [50.0, 52.0, 54.0, 56.0, 58.0, 60.0]);
        assert!(log_ticks(0.0, 1.0).is_empty());
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_loss(250.0), "250");
        assert_eq!(format_loss(2.5), "2.5");
        assert_eq!(format_loss(0.0123), "1.230e-2");
        assert_eq!(format_x(120.0), "120");
        assert_eq!(format_x(1.25), "1.25");
    }
}

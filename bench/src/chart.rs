//! The report's chart (PNG, plotters): per-packet cost against the
//! baseline, packets per second on one core, and the end-to-end figures of
//! every setup relative to a direct connection.
use std::path::Path;

use crate::{
    peers::Setup,
    per_packet::{Fam, Kind},
    report::Report,
    results::{Case, FlowTable, PerPacketId, Slot, Traffic},
    sys,
};
use plotters::{prelude::*, style::register_font};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One horizontal bar: label, value, and the series (colour) it belongs to.
struct Bar {
    label: String,
    value: f64,
    series: usize,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x3b, 0x6e, 0xa8),
    RGBColor(0xa0, 0xa0, 0xa0),
    RGBColor(0xe0, 0x8a, 0x2c),
    RGBColor(0x5a, 0xa0, 0x5a),
];

pub fn draw(report: &Report, path: &Path) -> Result<(), String> {
    if !Path::new(FONT).exists() {
        let missing = sys::ensure_packages(&[("fonts-dejavu-core", FONT)]);
        if !missing.is_empty() {
            return Err("no font for the chart (fonts-dejavu-core)".into());
        }
    }
    let bytes: &'static [u8] = Box::leak(std::fs::read(FONT).map_err(|e| e.to_string())?.into());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "bad font")?;

    let mut panels: Vec<(String, String, Vec<Bar>, Vec<&str>)> = Vec::new();
    let sections = &report.sections;
    if !sections.per_packet.is_empty() {
        let case = |traffic, frame_bytes, backends, slot, table| {
            PerPacketId::Case(
                Case::new(Fam::V4, Traffic::Kind(traffic), frame_bytes, backends, slot)
                    .table(table),
            )
        };
        let (e, full) = (FlowTable::Empty, FlowTable::NearlyFull);
        let wanted = [
            (
                PerPacketId::Baseline {
                    fam: Fam::V4,
                    frame_bytes: 64,
                },
                "baseline: parse, swap MACs, XDP_TX",
                1,
            ),
            (case(Kind::Syn, 64, 3, Slot::Clean, e), "ipv4 tcp syn", 0),
            (
                case(Kind::Est, 64, 3, Slot::Clean, e),
                "ipv4 tcp established",
                0,
            ),
            (case(Kind::Udp, 64, 3, Slot::Clean, e), "ipv4 udp", 0),
            (
                PerPacketId::Case(Case::new(
                    Fam::V6,
                    Traffic::Kind(Kind::Est),
                    74,
                    3,
                    Slot::Clean,
                )),
                "ipv6 tcp established",
                0,
            ),
            (
                case(Kind::Other, 64, 3, Slot::Clean, e),
                "non-service packet",
                0,
            ),
            (
                case(Kind::Est, 64, 1000, Slot::Clean, e),
                "established, 1000 backends",
                0,
            ),
            (
                case(Kind::Est, 64, 4, Slot::Clean, full),
                "established, clean slot, full flow table",
                0,
            ),
            (
                case(Kind::Est, 64, 4, Slot::StickyPinned, full),
                "established, sticky slot (LRU hit), full table",
                2,
            ),
            (
                case(Kind::Syn, 64, 4, Slot::StickyInsert, full),
                "syn, sticky slot (LRU insert), full table",
                2,
            ),
        ];
        let bars = wanted
            .iter()
            .filter_map(|(id, label, series)| {
                let r = sections.per_packet.iter().find(|r| r.id == *id)?;
                Some(Bar {
                    label: label.to_string(),
                    // Each row against its own baseline: ns read on the
                    // machine's slow level would not compare with ns read
                    // on its fast one.
                    value: r.case.as_ref().map_or(1.0, |c| c.x_baseline),
                    series: *series,
                })
            })
            .collect();
        panels.push((
            "Cost per packet, BPF_PROG_TEST_RUN (x its baseline, lower is better)".into(),
            "x baseline".into(),
            bars,
            vec![],
        ));
    }
    if !sections.pps.is_empty() {
        let bars = sections
            .pps
            .iter()
            .map(|r| Bar {
                label: r.label.to_string(),
                value: r.pps / 1e6,
                series: if r.id.is_baseline() { 1 } else { 0 },
            })
            .collect();
        panels.push((
            "Native XDP on a veth, live frames, one core unless labelled (Mpps, higher is better)"
                .into(),
            "Mpps".into(),
            bars,
            vec![],
        ));
    }
    if let Some(d) = sections.e2e.iter().find(|r| r.setup == Setup::Direct) {
        let mut bars = Vec::new();
        for r in &sections.e2e {
            for (series, v) in [
                r.https.conn_per_s / d.https.conn_per_s,
                r.http.conn_per_s / d.http.conn_per_s,
                r.bulk.gbit_per_s / d.bulk.gbit_per_s,
                r.upload.gbit_per_s / d.upload.gbit_per_s,
            ]
            .into_iter()
            .enumerate()
            {
                bars.push(Bar {
                    label: if series == 0 {
                        r.setup.id().to_string()
                    } else {
                        String::new()
                    },
                    value: v,
                    series,
                });
            }
        }
        panels.push((
            "End to end, relative to a direct connection (x, higher is better)".into(),
            "x direct".into(),
            bars,
            vec![
                "HTTPS conn/s",
                "HTTP conn/s",
                "bulk download",
                "bulk upload",
            ],
        ));
    }
    if panels.is_empty() {
        return Err("nothing to draw".into());
    }
    let heights: Vec<u32> = panels
        .iter()
        .map(|(_, _, bars, _)| 90 + 26 * bars.len() as u32)
        .collect();
    let total: u32 = heights.iter().sum();
    let root = BitMapBackend::new(path, (1200, total)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut rest = root.clone();
    for ((title, unit, bars, legend), h) in panels.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*h);
        rest = below;
        panel(&area, title, unit, bars, legend).map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    bars: &[Bar],
    legend: &[&str],
) -> Result<(), Box<dyn std::error::Error>> {
    let max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9);
    // The left part of the x range holds the labels.
    let left = -max * 0.75;
    let n = bars.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(28)
        .build_cartesian_2d(left..max * 1.18, n..0.0)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .light_line_style(TRANSPARENT)
        .x_labels(8)
        .x_label_formatter(&|v| {
            if *v < 0.0 {
                String::new()
            } else if max < 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        })
        .x_desc(unit)
        .label_style(("sans-serif", 13))
        .draw()?;
    for (i, b) in bars.iter().enumerate() {
        let y = i as f64;
        let color = COLORS[b.series % COLORS.len()];
        chart.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.15), (b.value, y + 0.85)],
            color.filled(),
        )))?;
        chart.draw_series(std::iter::once(Text::new(
            format!("{:.2}", b.value)
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string(),
            (b.value + max * 0.01, y + 0.2),
            ("sans-serif", 13),
        )))?;
        if !b.label.is_empty() {
            chart.draw_series(std::iter::once(Text::new(
                b.label.clone(),
                (left + max * 0.02, y + 0.2),
                ("sans-serif", 14),
            )))?;
        }
    }
    for (i, name) in legend.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    if !legend.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    Ok(())
}
